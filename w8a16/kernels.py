"""The W8A16 matmul: ``y = x @ (int8_weights * scales[:, None]).T + bias``, and how to make it fast.

`w8a16_linear` is the one entry point the layer calls. It picks one of five paths per call:

``native``
    A short C kernel (``csrc/gemv.c``, built on first use by `native.py`) that converts int8 to fp32 in
    registers and accumulates in fp32: the weights are read once, as int8. At M=1 (decode) it streams them at
    memory speed; for a few rows of x (a short prompt, a small batch) it converts each weight once for four rows.
    The path for every dtype up to `NATIVE_MAX_M` rows on a CPU with a C compiler. Exact fp32 maths, so fp32
    inputs keep fp32 accuracy.
``triton``
    The GPU counterpart of ``native`` (`gpu.py`): a Triton GEMV that reads the int8 weight once, for up to
    `gpu.MAX_M` rows of x on CUDA. It is checked against the reference on first use on each device and dtype
    and switched off there if it disagrees or fails. Not yet timed on a GPU (the project has not had one).
``reference``
    Dequantize the whole weight to ``x.dtype``, then ``F.linear``. Always correct, any device. On CUDA it is
    the path for larger batches (one elementwise kernel + cuBLAS on the tensor cores). On a CPU it is slow:
    most of its time goes into allocating and first-touching a fresh full-size dense weight on every call
    (4096×4096 bf16: 32 MiB of page faults).
``int8pack``
    ``torch._weight_int8pack_mm``: PyTorch's CPU kernel that reads the int8 weight directly and converts it in
    registers (1 byte per weight instead of 2): the small-batch bf16 path where no C compiler is available. It
    checks almost nothing, so `int8pack_linear` checks for it: ``in_features % 16 == 0`` (else wrong answers),
    64-byte aligned weight *and activations* (else segfaults), scales in ``x.dtype``. For fp16/fp32 it is a
    scalar loop (slow, and slower with every row of x), so for them only at M=1.
``tiled``
    Dequantize a block of rows at a time into one reused, cache-sized fp32 buffer and matmul each tile into
    its slice of the output. Same maths as the reference without the full-size temporary that is allocated
    and page-faulted on every call: the path for every dtype above `NATIVE_MAX_M` rows on a CPU.

Accuracy: every path accumulates in fp32 and rounds to ``x.dtype`` once. fp16 stays finite on activation
outliers because nothing is summed in fp16: the reference scales the *weights* before the matmul (never the
un-scaled ``Σ x·q``, which overflows fp16's 65504 as the seed did), and the tiled path sums in fp32.

Dispatch on a CPU, from ``python -m w8a16.bench`` on a 2-core AVX2 EPYC (torch 2.13, stream-read bandwidth
16.1 GB/s): one 4096×4096 layer, weights rotated past the L3, medians of alternated runs, speed vs ``nn.Linear``
of the same dtype (the seed's naive forward in brackets). Rerun it for your machine; on a busy machine the
ratios move by up to 2×.

    M      bf16                    fp32                    fp16
    1      2.42× native  (0.16)    3.67× native  (0.14)    1.73× native  (0.09)
    16     3.98× native  (0.61)    2.78× native  (0.32)    3.72× native  (0.45)
    64     3.95× tiled   (0.86)    1.56× tiled   (0.53)    3.22× tiled   (0.76)
    256    6.16× tiled   (1.02)    1.26× tiled   (0.71)    4.39× tiled   (0.91)

* ``native`` up to `NATIVE_MAX_M` rows: at M=1 it reads the int8 weight at about 70 % of the measured stream
  bandwidth (software prefetching in ``csrc/gemv.c`` doubled it on the 1024-wide rows of CodeGen).
* ``int8pack`` only without a C compiler: bf16 up to M=16, fp16/fp32 at M=1.
* ``tiled`` for the rest: an fp32 GEMM per tile is ~5× faster than a bf16 GEMM on AVX2.
* Tiles: 4 MiB for M=1 (a gemv: memory bound, stay in cache), 16 MiB for M ≥ 2. Each tile costs two parallel
  regions, and on a busy machine each region can wait for a descheduled OpenMP thread; big tiles kept tiled
  faster than the seed under load (fp32 M=16 with another 2-thread job running: 226 ms with 4 MiB tiles,
  89 ms with 16 MiB, 150 ms for the seed).
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from . import gpu, native

PATHS = ("reference", "native", "int8pack", "tiled", "triton")
FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # activations the fast paths serve (fp32 inside)

ALIGNMENT = 64  # bytes; _weight_int8pack_mm segfaults on less (seen on activations at a 4-byte offset)
PACK_K_MULTIPLE = 16  # _weight_int8pack_mm returns garbage when in_features is not a multiple of 16
# fp32 bytes per tile. M=1 is a gemv, memory bound: 4 MiB tiles stay in cache. M ≥ 2 is a GEMM: 16 MiB tiles mean
# 4× fewer parallel regions, which under load mattered more than cache (see the docstring).
TILE_BYTES = {"gemv": 4 << 20, "gemm": 16 << 20}

# Largest batch for which the CPU dispatch uses the native kernel. Measured (4096×4096, weights rotated past the
# cache, 2 cores; ms for native / int8pack / tiled): bf16 M=16 6.3 / 10.1 / 15.0, M=32 14.8 / 20.2 / 17.2,
# M=64 24.2 / 40.1 / 26.3; fp32 M=32 11.9 / – / 20.1, M=64 29.3 / – / 39.5. Above M=1 the kernel converts each
# int8 weight once for four rows of x, and it stays ahead of MKL's fp32 GEMM up to about M=64; 32 leaves a margin.
NATIVE_MAX_M = 32

# Largest batch (M = rows of x) for which the CPU dispatch uses int8pack, per activation dtype, where the native
# kernel is not available (it is faster wherever it is); tiled above. bf16: it beat tiled at M=16 (10 vs 15 ms)
# but not at M=32 (20 vs 17). fp16/fp32 only at M=1: there int8pack is a scalar loop whose cost grows with M.
PACK_MAX_M = {torch.bfloat16: 16, torch.float16: 1, torch.float32: 1}


def reference_linear(
    x: torch.Tensor, int8_weights: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Always-correct path: dequantize to ``x.dtype``, then ``F.linear``."""
    weight = int8_weights.to(x.dtype) * scales.to(x.dtype)[:, None]
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


# ---------------------------------------------------------------------------------------------------------------
# int8pack: torch._weight_int8pack_mm, with the checks it does not do
# ---------------------------------------------------------------------------------------------------------------


def is_aligned(t: torch.Tensor, alignment: int = ALIGNMENT) -> bool:
    """True if ``t`` is contiguous and its data starts on an ``alignment``-byte boundary."""
    return t.is_contiguous() and t.data_ptr() % alignment == 0


def aligned_copy(t: torch.Tensor, alignment: int = ALIGNMENT) -> torch.Tensor:
    """A contiguous copy of ``t`` whose data is ``alignment``-byte aligned.

    PyTorch's CPU allocator already aligns to 64 bytes; the over-allocation is a fallback for allocators that
    do not, so this never returns a misaligned tensor.
    """
    out = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    if out.data_ptr() % alignment:
        nbytes = t.numel() * t.element_size()
        raw = torch.empty(nbytes + alignment, dtype=torch.uint8, device=t.device)
        start = -raw.data_ptr() % alignment
        out = raw[start : start + nbytes].view(t.dtype).view(t.shape)
    return out.copy_(t)


def int8pack_supported(x: torch.Tensor, int8_weights: torch.Tensor, scales: torch.Tensor) -> bool:
    """Whether `int8pack_linear` gives a correct answer here (it copies what is misaligned)."""
    return (
        x.device.type == "cpu"
        and int8_weights.device == scales.device == x.device
        and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and int8_weights.dtype == torch.int8
        and int8_weights.dim() == 2
        and int8_weights.shape[1] % PACK_K_MULTIPLE == 0
        and scales.shape == int8_weights.shape[:1]
    )


def int8pack_linear(
    x: torch.Tensor, int8_weights: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``torch._weight_int8pack_mm`` on any leading shape, made safe.

    A misaligned weight is copied on every call (correct but slow): `W8A16LinearLayer` re-aligns its buffer
    once instead. Activations are small, so they are simply copied when misaligned.
    """
    if not int8pack_supported(x, int8_weights, scales):
        raise ValueError("int8pack needs a CPU int8 weight with in_features % 16 == 0 and (out,) scales")
    x2 = x.reshape(-1, x.shape[-1])
    x2 = x2 if is_aligned(x2) else aligned_copy(x2)
    w = int8_weights if is_aligned(int8_weights) else aligned_copy(int8_weights)
    y = torch._weight_int8pack_mm(x2, w, scales.to(x.dtype).contiguous())
    if bias is not None:
        y = y.add_(bias.to(x.dtype))
    return y.reshape(*x.shape[:-1], w.shape[0])


# ---------------------------------------------------------------------------------------------------------------
# native: the C GEMV of native.py (int8 read once, fp32 accumulation)
# ---------------------------------------------------------------------------------------------------------------


def native_supported(x: torch.Tensor, int8_weights: torch.Tensor, scales: torch.Tensor) -> bool:
    """Whether the C kernel is built here and these are CPU tensors it handles (any shape, any alignment)."""
    return (
        x.device.type == int8_weights.device.type == scales.device.type == "cpu"
        and int8_weights.dtype == torch.int8
        and native.library() is not None
    )


def native_linear(
    x: torch.Tensor, int8_weights: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The C GEMV on any leading shape; fp32 inside, rounded to ``x.dtype`` once."""
    y = native.gemv(x.reshape(-1, x.shape[-1]), int8_weights, scales, bias)
    return y.reshape(*x.shape[:-1], int8_weights.shape[0])


# ---------------------------------------------------------------------------------------------------------------
# tiled: dequantize into a reused cache-sized buffer, one block of output rows at a time
# ---------------------------------------------------------------------------------------------------------------

_buffers = threading.local()  # one scratch buffer per thread: two threads never share (and corrupt) a tile


def _tile_buffer(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (dtype, device)
    cache = _buffers.__dict__.setdefault("by_key", {})
    buf = cache.get(key)
    if buf is None or buf.numel() < rows * cols:
        buf = cache[key] = torch.empty(rows * cols, dtype=dtype, device=device)
    return buf[: rows * cols].view(rows, cols)


def tiled_linear(
    x: torch.Tensor,
    int8_weights: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    tile_bytes: int | None = None,
) -> torch.Tensor:
    """Dequantize ``tile_bytes`` of weight rows at a time into a reused fp32 buffer; matmul each tile in fp32.

    ``tile_bytes=None`` picks `TILE_BYTES` by batch size.

    fp32 whatever ``x.dtype``: on an AVX2 CPU an fp32 GEMM is several times faster than a bf16/fp16 one (no
    native 16-bit FMA), and it is at least as accurate as the reference. Accumulating in fp32 is also what
    keeps fp16 finite on outliers; the per-row scales are applied once to the fp32 output and the result is
    rounded to ``x.dtype`` once, at the end. The output is built transposed, ``(out, M)``, so each tile writes
    a contiguous block of rows.
    """
    (n_out, n_in), device = int8_weights.shape, x.device
    x2 = x.reshape(-1, n_in).float()
    m = x2.shape[0]
    if tile_bytes is None:
        tile_bytes = TILE_BYTES["gemv" if m == 1 else "gemm"]
    rows = max(1, min(n_out, tile_bytes // max(1, 4 * n_in)))
    buf = _tile_buffer(rows, n_in, torch.float32, device)
    y_t = torch.empty(n_out, m, dtype=torch.float32, device=device)
    for r in range(0, n_out, rows):
        tile = buf[: min(rows, n_out - r)].copy_(int8_weights[r : r + rows])  # int8 -> fp32, exact
        if m == 1:
            torch.mv(tile, x2[0], out=y_t[r : r + rows, 0])
        else:
            torch.mm(tile, x2.t(), out=y_t[r : r + rows])
    y_t.mul_(scales.float()[:, None])  # still fp32: Σ x·q cannot overflow here (fp32 max ≈ 3e38)
    if bias is not None:
        y_t.add_(bias.float()[:, None])
    y = torch.empty(m, n_out, dtype=x.dtype, device=device).copy_(y_t.t())  # the one rounding to x.dtype
    return y.reshape(*x.shape[:-1], n_out)


# ---------------------------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------------------------


def supported_paths(x: torch.Tensor, int8_weights: torch.Tensor, scales: torch.Tensor) -> list[str]:
    """Every path that gives a correct answer for these arguments (the tests run each one)."""
    if _needs_grad(x, scales):
        return ["reference"]  # the fast paths write into out= buffers, which autograd cannot follow
    if x.dtype not in FAST_DTYPES:
        return ["reference"]  # the fast paths compute in fp32: less than an fp64 input asks for
    paths = ["reference", "tiled"]
    if gpu.available(x) and int8_weights.device == scales.device == x.device:
        paths.append("triton")
    if native_supported(x, int8_weights, scales):
        paths.append("native")
    if int8pack_supported(x, int8_weights, scales):
        paths.append("int8pack")
    return paths


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def choose_path(x: torch.Tensor, int8_weights: torch.Tensor, scales: torch.Tensor) -> str:
    """The path `w8a16_linear` takes for these arguments, and why (comments)."""
    if _needs_grad(x, scales):
        return "reference"  # someone wants d(out)/dx: only the plain-PyTorch path is differentiable
    if x.dtype not in FAST_DTYPES:
        return "reference"  # fp64: the fast paths compute in fp32, the reference in x's own precision
    m = x.numel() // max(1, x.shape[-1])
    if m == 0 or x.shape[-1] == 0 or int8_weights.shape[0] == 0:
        return "reference"  # empty: nothing to speed up, and the fast kernels are not tested on it
    if x.device.type != "cpu":
        if x.device.type == "cuda" and m <= gpu.MAX_M and gpu.available(x) and gpu.passes_first_use_check(x):
            return "triton"  # decode on CUDA: int8 read once (checked against the reference on first use)
        return "reference"  # CUDA & co: dequantize (one cheap kernel) + cuBLAS/vendor GEMM
    if m <= NATIVE_MAX_M and native_supported(x, int8_weights, scales):
        return "native"  # decode, prefill of short prompts, small batches: int8 read once, fp32 accumulation
    if m <= PACK_MAX_M.get(x.dtype, 0) and int8pack_supported(x, int8_weights, scales):
        return "int8pack"  # no C compiler here: one kernel call that reads int8 directly (bf16 M ≤ 16, else M=1)
    return "tiled"  # everything else on a CPU: fp32 GEMM per tile, never a full-size temporary


def _check_args(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Shapes and dtypes every path relies on (a wrong-shaped scale would otherwise broadcast silently)."""
    if w.dtype != torch.int8 or w.dim() != 2:
        raise ValueError(f"int8_weights must be a 2-D int8 tensor, got {w.dtype} of shape {tuple(w.shape)}")
    if x.dim() == 0 or x.shape[-1] != w.shape[1] or not x.is_floating_point():
        raise ValueError(f"x must be floating point with last dimension {w.shape[1]}, got {x.dtype} {tuple(x.shape)}")
    for name, t in (("scales", scales), ("bias", bias)):
        if t is not None and (t.shape != w.shape[:1] or not t.is_floating_point()):
            raise ValueError(f"{name} must be floating point of shape ({w.shape[0]},), got {t.dtype} {tuple(t.shape)}")


_IMPLS = {
    "reference": reference_linear,
    "native": native_linear,
    "int8pack": int8pack_linear,
    "tiled": tiled_linear,
    "triton": gpu.triton_linear,
}


def w8a16_linear(
    x: torch.Tensor,
    int8_weights: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    path: str | None = None,
) -> torch.Tensor:
    """``x @ (int8_weights * scales[:, None]).T + bias`` in ``x.dtype``, by the fastest correct path.

    ``path`` forces one of `PATHS` (for tests and benchmarks); it raises ``ValueError`` where that path would
    not be correct for these arguments.
    """
    _check_args(x, int8_weights, scales, bias)
    if path is None:
        path = choose_path(x, int8_weights, scales)
        if path == "triton":  # compiled per shape on first use: a failure there must not take the model down
            try:
                return gpu.triton_linear(x, int8_weights, scales, bias)
            except Exception as err:  # noqa: BLE001 — any Triton/driver error: switch it off, answer correctly
                gpu.switch_off(x, f"{type(err).__name__}: {err}")
                path = "reference"
    elif path not in supported_paths(x, int8_weights, scales):
        raise ValueError(f"path {path!r} is not supported here; choose from {supported_paths(x, int8_weights, scales)}")
    return _IMPLS[path](x, int8_weights, scales, bias)
