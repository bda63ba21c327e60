"""The W8A16 matmul for GPUs: a Triton kernel that reads int8 weight tiles and multiplies on the tensor cores.

Why: at decode (M = 1 to a few rows of x) a matmul is bound by reading its weight, and int8 is half the bytes of
bf16. The always-correct CUDA path (`reference.reference_linear`) first writes an fp32 copy of the weight and
then lets cuBLAS read it back, moving about nine times the bytes of the int8 weight: on an H200 it ran 10–23×
slower than cuBLAS on the float weight. Here each program computes a ``BLOCK_M × BLOCK_N`` tile of y: per step
it loads a ``BLOCK_N × BLOCK_K`` int8 weight tile, widens it to x's dtype in registers (exact, |q| ≤ 127) and
multiplies on the tensor cores, which accumulate in fp32; the per-row scale and the bias are applied once at
the end, in fp32, and the result is rounded to ``x.dtype`` once — the same maths as the CPU kernel. fp32 x
uses full-precision products (``input_precision="ieee"``), not TF32.

Measured (``.ci/gpu-check`` on an NVIDIA H200, bf16, kernel time under CUDA graphs, weights rotated past the
L2): at M = 1–16, 1.36× cuBLAS on the float weight at 4096×4096, 1.45× at 4096×14336 and 1.72× at 4096×51200
(an lm_head), reading the int8 weight at 39–76 % of the measured read bandwidth; at M = 64–256 a GEMM at
0.38–0.84× cuBLAS (tiles in `CONFIGS`), which still beats the reference path 6–13×. Called eagerly one layer at
a time, Python's launch cost (tens of µs) is larger than the kernel; CUDA graphs or ``torch.compile`` remove it.

Guards: `available()` is False without Triton or without a CUDA device; the first call on each device and
dtype compares the kernel with `reference.reference_linear` on a small problem, and any error or disagreement
switches it off for that device and dtype with a warning, so a Triton or driver problem costs speed, never a
wrong answer; an error on a later shape does the same (`switch_off`, called by the dispatcher). Tile sizes
are picked by ``triton.autotune`` on the first call for each shape and row bucket, then launched directly.

``W8A16_TRITON=0`` switches it off. Triton's interpreter (``TRITON_INTERPRET=1``) runs the same kernel on CPU
tensors, which is how the tests check it on machines without a GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import threading
import warnings

import torch

from .reference import reference_linear

# (BLOCK_N, BLOCK_K, warps, stages) tried by the autotuner for each BLOCK_M (rows of x per program, see
# `block_m_for`): small M reads the weight once with deep pipelines; large M are GEMM tiles that reuse each
# weight tile across many rows of x. From `.ci/gpu_sweep.py` on an H200 (bf16, kernel time vs cuBLAS): at M = 64
# two programs of 32 rows beat one of 64 (4096x4096 0.47 -> 0.66x, 14336x4096 0.41 -> 0.66x, 4096x14336 0.80 ->
# 0.84x), and (64, 128, 4, 3) gave M = 256 at 4096x4096 0.43 -> 0.51x.
CONFIGS = {
    16: ((16, 256, 4, 4), (32, 256, 4, 4), (16, 512, 4, 3), (32, 128, 4, 5), (64, 128, 4, 4), (64, 256, 8, 3)),
    32: ((32, 128, 4, 4), (32, 256, 4, 3), (64, 128, 4, 4), (64, 128, 4, 3), (64, 256, 8, 3), (128, 64, 4, 4)),
    128: ((64, 64, 4, 4), (64, 128, 4, 3), (128, 64, 4, 4), (128, 64, 8, 3), (128, 128, 8, 3), (256, 64, 8, 3)),
}
INTERPRETER_BLOCKS = {"BLOCK_N": 16, "BLOCK_K": 64}  # one fixed tile in Triton's CPU interpreter (tests only)

_checked: dict[tuple[str, torch.dtype], bool] = {}  # (device, dtype) -> passed the first-use check
_lock = threading.Lock()
_kernels: dict[int, tuple] = {}  # BLOCK_M -> (kernel, fixed meta-parameters), built on first use
_tuned: dict[tuple, dict] = {}  # (device, dtypes, N, K, BLOCK_M, no bias) -> the autotuner's meta-parameters


def interpreted() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(x: torch.Tensor) -> bool:
    """Whether the kernel may serve ``x``: Triton installed, not switched off, and a device it runs on."""
    if os.environ.get("W8A16_TRITON", "1") == "0" or not triton_installed():
        return False
    return x.device.type == "cuda" or (interpreted() and x.device.type == "cpu")


@functools.cache
def triton_installed() -> bool:  # asked on every CUDA call: look on disk once
    return importlib.util.find_spec("triton") is not None


def block_m_for(m: int) -> int:
    """Rows of x per program: 16 (the tensor cores' minimum) to M = 16, 32 to M = 64 (more programs than one
    64-row tile gives, for the GPU's many SMs), 128 above."""
    return 16 if m <= 16 else 32 if m <= 64 else 128


@functools.cache
def _jit():
    """The Triton kernel itself, defined on first use: importing Triton is not free."""
    import triton
    import triton.language as tl

    @triton.jit
    def w8a16_matmul(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # One program: a BLOCK_M × BLOCK_N tile of y. Each step loads a BLOCK_N × BLOCK_K int8 weight tile,
        # widens it to x's dtype in registers (exact: |q| ≤ 127) and multiplies on the tensor cores, which
        # accumulate in fp32; the per-row scale and bias are applied once at the end, in fp32, and y is
        # rounded to x's dtype once. Offsets in int64: N·K reaches 2³¹ on large vocabularies (lm_head).
        rn = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # (BN,)
        rm = (tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # (BM,)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, tl.cdiv(K, BLOCK_K)):
            rk = (k0 * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)  # (BK,)
            x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
            w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=(rn[:, None] < N) & (rk[None, :] < K), other=0)
            if IEEE:  # fp32 products on the FMA units (the default would round fp32 x to tf32)
                acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
            else:  # bf16/fp16 x on the tensor cores: each product is exact in the fp32 accumulator
                acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
        acc = acc * tl.load(s_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        out = y_ptr + rm[:, None] * N + rn[None, :]
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))

    return w8a16_matmul


def _kernel(block_m: int):
    """The kernel for ``block_m`` rows per program: autotuned over `CONFIGS` on a GPU, one tile when interpreted."""
    if block_m not in _kernels:
        import triton

        if interpreted():  # the autotuner times configs on a GPU; the interpreter checks maths, one config does
            _kernels[block_m] = (_jit(), dict(INTERPRETER_BLOCKS))
        else:
            configs = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=st)
                       for n, k, w, st in CONFIGS[block_m]]
            _kernels[block_m] = (triton.autotune(configs=configs, key=["N", "K"])(_jit()), {})
    return _kernels[block_m]


def triton_linear(
    x: torch.Tensor, int8_weights: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ (int8_weights * scales[:, None]).T + bias`` with the Triton kernel, on any leading shape.

    Everything is made contiguous before a pointer reaches the kernel: it indexes rows as ``row * K`` and checks
    nothing itself. Scales and bias keep their dtype (the kernel widens them in registers): converting them
    here would cost two extra kernel launches per call, which at decode is as long as the matmul.
    """
    tensors = (int8_weights, scales) if bias is None else (int8_weights, scales, bias)
    if any(t.device != x.device for t in tensors):  # a pointer into another device's memory would be read as ours
        raise ValueError(f"triton path: weights, scales and bias must be on {x.device}, like x")
    n, k = int8_weights.shape
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m and n:
        block_m = block_m_for(m)
        s = scales.contiguous()
        args = (x2, int8_weights.contiguous(), s, s if bias is None else bias.contiguous(), y, m, n, k)
        # IEEE also in Triton's interpreter, whose bf16 dot returns garbage (3.5); the products are exact either way
        flags = dict(HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32 or interpreted(), BLOCK_M=block_m)
        key = (x.device, x.dtype, s.dtype, n, k, block_m, bias is None)
        best = _tuned.get(key)
        if best is not None:  # the autotuner's choice, launched directly: its per-call bookkeeping costs µs
            _jit()[(-(-n // best["BLOCK_N"]), -(-m // block_m))](*args, **flags, **best)
        else:
            kernel, fixed = _kernel(block_m)
            kernel[lambda meta: (-(-n // meta["BLOCK_N"]), -(-m // block_m))](*args, **flags, **fixed)
            config = getattr(kernel, "best_config", None)  # None when interpreted (or on a Triton without it)
            if config is not None:
                _tuned[key] = {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
    return y.reshape(*x.shape[:-1], n)


def passes_first_use_check(x: torch.Tensor) -> bool:
    """Run the kernel once on a small problem on ``x``'s device and dtype and compare it with the reference.

    Done once per device and dtype. A failure (an exception, or a result off by more than the dtype's rounding)
    switches the kernel off there, with a warning saying why.
    """
    key = (str(x.device), x.dtype)
    if key in _checked:
        return _checked[key]
    with _lock:
        if key not in _checked:
            _checked[key] = _self_check(x.device, x.dtype)
    return _checked[key]


def switch_off(x: torch.Tensor, reason: str) -> None:
    """Stop using the kernel on ``x``'s device and dtype (after a failure on a new shape), with a warning."""
    _checked[(str(x.device), x.dtype)] = False
    _warn_off(x.device, x.dtype, reason)


def _warn_off(device: torch.device, dtype: torch.dtype, reason: str) -> None:
    warnings.warn(
        f"w8a16: the Triton kernel is switched off on {device} for {dtype} ({reason}); "
        "using dequantize + matmul there instead",
        RuntimeWarning,
        stacklevel=4,
    )


def _self_check(device: torch.device, dtype: torch.dtype) -> bool:

    g = torch.Generator().manual_seed(0)
    w = torch.randint(-127, 128, (37, 300), generator=g, dtype=torch.int8).to(device)
    s = (torch.rand(37, generator=g) / 50 + 1e-3).to(device, dtype)
    b = torch.randn(37, generator=g).to(device, dtype)
    x = torch.randn(2, 300, generator=g).to(device, dtype)
    try:
        out = triton_linear(x, w, s, b)
        ref = reference_linear(x.double(), w, s.double(), b.double())
        tol = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}.get(dtype, 2e-2)
        ok = bool(torch.isfinite(out).all()) and float((out.double() - ref).abs().max()) <= tol * float(ref.abs().max())
        reason = "its result disagreed with the reference"
    except Exception as err:  # any Triton, compiler or driver failure: fall back, do not crash the model
        ok, reason = False, f"{type(err).__name__}: {err}"
    if not ok:
        _warn_off(device, dtype, reason)
    return ok
