"""GPU sweep of the Triton kernel's GEMM tiles (M = 64 and 256), for choosing `gpu.CONFIGS` on a lent GPU.

    python .ci/gpu_sweep.py            (about 2 minutes on an H200)
    python .ci/gpu_sweep.py --tuned    (only the autotuned choice, at M = 32, 64, 128 and 256: 1 minute)

The autotuner can only pick among the tiles it is offered, and at M >= 64 the kernel ran at 0.37-0.81x cuBLAS
with the tiles of `gpu.CONFIGS`. This launches the kernel directly with each candidate (rows of x per program,
BLOCK_N, BLOCK_K, warps, stages), bf16, weights rotated past the L2, kernel time under CUDA graphs as in
gpu_probe.py, and prints each candidate's speed relative to cuBLAS on the bf16 weight, best first, with the
autotuned choice from `gpu.CONFIGS` for comparison.
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gpu_probe import ROTATE, dev, graph_time  # noqa: E402  (prints the card)

from w8a16.ops import gpu  # noqa: E402

# (rows of x per program, BLOCK_N, BLOCK_K, warps, stages)
CANDIDATES = {
    64: [(bm, n, k, w, st) for bm in (32, 64) for n, k, w, st in (
        (32, 128, 4, 4), (64, 64, 4, 4), (64, 128, 4, 3), (64, 128, 4, 4), (128, 64, 4, 4), (128, 64, 8, 4),
        (128, 128, 8, 3), (64, 256, 8, 3))],
    256: [(bm, n, k, w, st) for bm in (64, 128) for n, k, w, st in (
        (64, 64, 4, 4), (64, 128, 4, 3), (128, 64, 4, 4), (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3),
        (256, 64, 8, 3), (64, 64, 8, 5))],
}
if "--tuned" in sys.argv:
    CANDIDATES = {m: [] for m in (32, 64, 128, 256)}
dtype = torch.bfloat16
for k, n in ((4096, 4096), (4096, 14336), (14336, 4096)):
    copies = max(2, -(-ROTATE // (n * k)))
    ws = [torch.randint(-127, 128, (n, k), dtype=torch.int8, device=dev) for _ in range(copies)]
    ss = [torch.rand(n, device=dev, dtype=dtype) / 100 for _ in range(copies)]
    dense = [(w.to(dtype) * s[:, None]) for w, s in zip(ws, ss)]
    for m, candidates in CANDIDATES.items():
        x = torch.randn(m, k, device=dev, dtype=dtype)
        y = torch.empty(m, n, device=dev, dtype=dtype)
        it = {"i": 0}

        def run_dense():
            it["i"] = (it["i"] + 1) % copies
            return F.linear(x, dense[it["i"]])

        def run_tuned():
            it["i"] = (it["i"] + 1) % copies
            return gpu.triton_linear(x, ws[it["i"]], ss[it["i"]])

        calls = copies * 2
        td, t_tuned = graph_time(run_dense, calls), graph_time(run_tuned, calls)  # the first call autotunes
        tuned = gpu._tuned.get((x.device, dtype, dtype, n, k, gpu.block_m_for(m), True))
        results = [(f"autotuned bm={gpu.block_m_for(m)} {tuned}", t_tuned, None)]
        for bm, bn, bk, warps, stages in candidates:
            meta = dict(HAS_BIAS=False, IEEE=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
                        num_stages=stages)
            grid = (-(-n // bn), -(-m // bm))

            def run(meta=meta, grid=grid):
                it["i"] = (it["i"] + 1) % copies
                s = ss[it["i"]]
                gpu._jit()[grid](x, ws[it["i"]], s, s, y, m, n, k, **meta)

            try:
                run()
                ref = F.linear(x.float(), ws[it["i"]].float() * ss[it["i"]].float()[:, None])
                err = float((y.float() - ref).abs().max() / ref.abs().max())
                results.append((f"bm={bm} bn={bn} bk={bk} w={warps} st={stages}", graph_time(run, calls), err))
            except Exception as e:  # out of shared memory and the like: say so, go on
                print(f"  {k}x{n} M={m} bm={bm} bn={bn} bk={bk} w={warps} st={stages}: {type(e).__name__}: "
                      f"{str(e)[:120]}", flush=True)
        results.sort(key=lambda r: r[1])
        print(f"bf16 in={k} out={n} M={m}: cuBLAS {td * 1e6:.1f} us", flush=True)
        for name, t, err in results[:6] + [r for r in results[6:] if r[0].startswith("autotuned")]:
            print(f"  {td / t:5.2f}x  {t * 1e6:7.1f} us  {name}" + ("" if err is None else f"  relerr {err:.1e}"),
                  flush=True)
    del ws, ss, dense
    torch.cuda.empty_cache()
