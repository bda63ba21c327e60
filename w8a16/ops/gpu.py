"""The small-batch W8A16 kernel for GPUs: a Triton GEMV that reads the int8 weight once.

Why: at decode (M = 1 to a few rows of x) a matmul is bound by reading its weight. The always-correct CUDA path
(`reference.reference_linear`) first writes a dense copy of the weight and then lets cuBLAS read it back, moving
about five times the bytes of the int8 weight; torch's own ``_weight_int8pack_mm`` CUDA kernel runs one thread
per output. Here each program reads a ``BLOCK_N × BLOCK_K`` tile of int8 weights per step, converts it in
registers and accumulates ``Σ q·x`` in fp32 for every row of x (up to `MAX_M`), so the weight is read once;
the per-row scale and the bias are applied once, at the end, and the result is rounded to ``x.dtype`` once —
the same maths as the CPU kernel.

Guards: `available()` is False without Triton or without a CUDA device; the first call on each device and
dtype compares the kernel with `reference.reference_linear` on a small problem, and any error or disagreement
switches it off for that device and dtype with a warning, so a Triton or driver problem costs speed, never a
wrong answer; an error on a later shape does the same (`switch_off`, called by the dispatcher). Tile sizes
are picked by ``triton.autotune`` on the first call for each shape.

Not measured yet: the project has not had a GPU to time it on (see the README). ``W8A16_TRITON=0`` switches it
off. Triton's interpreter (``TRITON_INTERPRET=1``) runs the same kernel on CPU tensors, which is how the tests
check it on machines without a GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import threading
import warnings

import torch

from .reference import reference_linear

MAX_M = 4  # rows of x the kernel serves; above, cuBLAS on a dequantized weight uses the tensor cores
# BLOCK_N, BLOCK_K, warps: BLOCK_M · BLOCK_N · BLOCK_K fp32 products per step must fit in registers
CONFIGS = ((16, 128, 4), (32, 64, 4), (32, 128, 4), (64, 64, 4), (16, 256, 8), (64, 128, 8))

_checked: dict[tuple[str, torch.dtype], bool] = {}  # (device, dtype) -> passed the first-use check
_lock = threading.Lock()
_kernel_cache: list = []  # the compiled kernel, built on first use: importing Triton is not free


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


def _kernel():
    """The Triton kernel (autotuned over `CONFIGS` on a GPU), defined on first use."""
    if _kernel_cache:
        return _kernel_cache[0]
    import triton
    import triton.language as tl

    @triton.jit
    def w8a16_gemv(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K,
                   HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # One program: BLOCK_N output channels for *all* M ≤ BLOCK_M rows of x, so each int8 weight tile is
        # read from memory once. Offsets in int64: N·K reaches 2³¹ on large vocabularies (lm_head).
        rn = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # (BN,)
        rm = tl.arange(0, BLOCK_M).to(tl.int64)  # (BM,)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, tl.cdiv(K, BLOCK_K)):
            rk = (k0 * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)  # (BK,)
            w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=(rn[:, None] < N) & (rk[None, :] < K), other=0)
            x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
            # (BM, 1, BK) * (1, BN, BK) summed over k: int8 widened to fp32 in registers, fp32 accumulation
            acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
        acc = acc * tl.load(s_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        out = y_ptr + rm[:, None] * N + rn[None, :]
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))

    if interpreted():  # the autotuner times configs on a GPU; the interpreter checks maths, one config does
        kernel = (w8a16_gemv, {"BLOCK_N": 16, "BLOCK_K": 64})
    else:
        configs = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w) for n, k, w in CONFIGS]
        kernel = (triton.autotune(configs=configs, key=["N", "K", "BLOCK_M"])(w8a16_gemv), {})
    _kernel_cache.append(kernel)
    return kernel


def triton_linear(
    x: torch.Tensor, int8_weights: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ (int8_weights * scales[:, None]).T + bias`` with the Triton kernel, on any leading shape (≤ `MAX_M` rows).

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
    if m > MAX_M:
        raise ValueError(f"triton path: serves at most {MAX_M} rows of x, got {m}")
    kernel, fixed = _kernel()
    w = int8_weights.contiguous()
    s = scales.contiguous()
    b = None if bias is None else bias.contiguous()
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m and n:
        def grid(meta):
            return (-(-n // meta["BLOCK_N"]),)

        block_m = max(1, 1 << (m - 1).bit_length())  # a power of two ≥ m (Triton's shapes must be)
        kernel[grid](x2, w, s, s if b is None else b, y, m, n, k, HAS_BIAS=b is not None, BLOCK_M=block_m, **fixed)
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
