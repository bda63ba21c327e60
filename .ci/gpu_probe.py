"""GPU probe for the Triton GEMV: kernel-only times under CUDA graphs (launch overhead removed) and eager times.

    python .ci/gpu_probe.py            (run by .ci/gpu-check on a lent GPU machine)
    python .ci/gpu_probe.py --quick    (bf16, one shape: half a minute)

For each shape, dtype and M it rotates through weight copies whose bytes exceed the L2 several times, so
every call reads its weight from HBM, and prints: dense cuBLAS (F.linear on the float weight), the Triton
kernel, their ratio, the kernel's weight-read bandwidth as a fraction of the measured read bandwidth, and the
reference path (dequantize in fp32, then cuBLAS) that the dispatcher falls back to.
"""

import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from w8a16.ops import gpu  # noqa: E402
from w8a16.ops.reference import reference_linear  # noqa: E402

dev = torch.device("cuda")
props = torch.cuda.get_device_properties(dev)
print(f"{props.name}: {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB, L2 {props.L2_cache_size / 2**20:.0f} MiB")


def graph_time(fn, calls, reps=20):
    """Seconds per fn() call, from a CUDA graph of `calls` calls replayed `reps` times (launches excluded)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / calls)
    return statistics.median(times)


def eager_time(fn, calls):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(calls):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / 1e3 / calls


ROTATE = 512 << 20  # bytes of weight copies rotated through: several times the L2


def main() -> None:
    # read bandwidth: a sum over 2 GiB (read-only)
    big = torch.ones(1 << 29, device=dev)
    sum_s = graph_time(lambda: big.sum(), 4, 5)
    read_gbps = big.numel() * 4 / sum_s / 1e9
    print(f"read bandwidth (sum over 2 GiB): {read_gbps:.0f} GB/s")
    del big

    print(f"{'dtype':>5} {'K':>6} {'N':>6} {'M':>3} | {'dense us':>8} {'ours us':>8} {'ratio':>5} {'%read':>5} "
          f"{'ref us':>7} | {'eager dense':>11} {'eager ours':>10} {'ratio':>5} | config")
    QUICK = "--quick" in sys.argv
    for dtype in (torch.bfloat16,) if QUICK else (torch.bfloat16, torch.float16):
        for k, n in ((4096, 14336),) if QUICK else ((4096, 4096), (4096, 14336), (14336, 4096), (4096, 51200)):
            if dtype == torch.float16 and n == 51200:
                continue
            copies = max(2, -(-ROTATE // (n * k)))
            ws = [torch.randint(-127, 128, (n, k), dtype=torch.int8, device=dev) for _ in range(copies)]
            ss = [torch.rand(n, device=dev, dtype=dtype) / 100 for _ in range(copies)]
            dense = [(w.to(dtype) * s[:, None]) for w, s in zip(ws, ss)]
            for m in (1, 16, 256) if QUICK else (1, 4, 16, 64, 256) if n != 51200 else (1, 4):
                x = torch.randn(m, k, device=dev, dtype=dtype)
                ref = reference_linear(x.double(), ws[0], ss[0].double())
                out = gpu.triton_linear(x, ws[0], ss[0])
                err = float((out.double() - ref).abs().max() / ref.abs().max())
                it = {"d": 0, "q": 0}

                def run_dense():
                    it["d"] = (it["d"] + 1) % copies
                    return F.linear(x, dense[it["d"]])

                def run_ours():
                    it["q"] = (it["q"] + 1) % copies
                    return gpu.triton_linear(x, ws[it["q"]], ss[it["q"]])

                def run_ref():
                    it["q"] = (it["q"] + 1) % copies
                    return reference_linear(x, ws[it["q"]], ss[it["q"]])

                calls = copies * 2
                td, tq, tr = graph_time(run_dense, calls), graph_time(run_ours, calls), graph_time(run_ref, calls, 5)
                ed, eq = eager_time(run_dense, calls), eager_time(run_ours, calls)
                pct = 100 * (n * k + n * ss[0].element_size()) / tq / 1e9 / read_gbps
                kern = gpu._kernel(gpu.block_m_for(m))[0]
                cfg = str(getattr(kern, "best_config", None))
                cfg = cfg.replace("num_ctas: 1, ", "").replace(", maxnreg: None", "")
                print(f"{str(dtype)[6:]:>5} {k:>6} {n:>6} {m:>3} | {td*1e6:8.1f} {tq*1e6:8.1f} {td/tq:5.2f} "
                      f"{pct:5.0f} {tr*1e6:7.1f} | {ed*1e6:11.1f} {eq*1e6:10.1f} {ed/eq:5.2f} | {cfg} relerr {err:.1e}",
                      flush=True)
            del ws, ss, dense
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
