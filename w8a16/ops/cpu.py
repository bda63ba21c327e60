"""The PyTorch-only CPU paths: ``tiled`` (any batch) and ``int8pack`` (small bf16 batches without a C compiler);
and `return_freed_heap`, which hands what quantizing freed back to the OS.

Both follow the accuracy rule of `reference` (fp32 dequantization and accumulation, one rounding).
"""

from __future__ import annotations

import ctypes
import sys
import threading
from typing import Any

import torch

ALIGNMENT = 64  # bytes; _weight_int8pack_mm segfaults on less (seen on activations at a 4-byte offset)
PACK_K_MULTIPLE = 16  # _weight_int8pack_mm returns garbage when in_features is not a multiple of 16
# fp32 bytes per tile. M=1 is a gemv, memory bound: 4 MiB tiles stay in cache. M ≥ 2 is a GEMM: 16 MiB tiles mean
# 4× fewer parallel regions, which under load mattered more than cache (see dispatch's docstring).
TILE_BYTES = {"gemv": 4 << 20, "gemm": 16 << 20}
# A small weight (at most ONE_GEMM_BYTES as fp32) times many rows (at least ONE_GEMM_MIN_M) is dequantized whole and
# multiplied by one addmm that writes (M, out), as nn.Linear does; otherwise tile by tile. Measured on the 2-core
# EPYC, fp32, vs dense, medians of alternated runs: M=300 256->2048 0.77x one GEMM vs 0.57x tiles, M=300 256->256
# 0.65x vs 0.44x; but M=100 256->2048 0.50-0.58x vs 0.67-0.78x and M=64 1024->1024 0.51-0.77x vs 1.05-1.16x.
ONE_GEMM_BYTES = 2 << 20
ONE_GEMM_MIN_M = 256


# ---------------------------------------------------------------------------------------------------------------
# tiled: dequantize into a reused cache-sized buffer, one block of output rows at a time
# ---------------------------------------------------------------------------------------------------------------

_buffers = threading.local()  # one scratch buffer per thread: two threads never share (and corrupt) a tile


def _tile_buffer(rows: int, cols: int, device: torch.device) -> torch.Tensor:
    cache = _buffers.__dict__.setdefault("by_device", {})
    buf = cache.get(device)
    if buf is None or buf.numel() < rows * cols:
        buf = cache[device] = torch.empty(rows * cols, dtype=torch.float32, device=device)
    return buf[: rows * cols].view(rows, cols)


def tile_rows(n_out: int, n_in: int, m: int, tile_bytes: int | None = None) -> int:
    """Weight rows per tile: ``tile_bytes`` of fp32 (`TILE_BYTES` by batch size when None)."""
    if tile_bytes is None:
        tile_bytes = TILE_BYTES["gemv" if m == 1 else "gemm"]
    return max(1, min(n_out, tile_bytes // max(1, 4 * n_in)))


def tiled_linear(
    x: torch.Tensor,
    int8_weights: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    tile_bytes: int | None = None,
) -> torch.Tensor:
    """Dequantize ``tile_bytes`` of weight rows at a time into a reused fp32 buffer; matmul each tile in fp32.

    fp32 whatever ``x.dtype``: on a CPU without bf16 matrix units an fp32 GEMM is several times faster than a
    bf16/fp16 one, and it is what the accuracy rule asks for. The per-row scales are applied once to the fp32
    output and the result is rounded to ``x.dtype`` once. The output is built transposed, ``(out, M)``, so each
    tile writes a contiguous block of rows.
    """
    (n_out, n_in), device = int8_weights.shape, x.device
    x2 = x.reshape(-1, n_in).float()  # (M, in)
    m = x2.shape[0]
    rows = tile_rows(n_out, n_in, m, tile_bytes)
    buf = _tile_buffer(rows, n_in, device)
    if rows >= n_out and n_out * n_in * 4 <= ONE_GEMM_BYTES and m >= ONE_GEMM_MIN_M:  # (an explicit tile_bytes wins)
        # The whole weight fits one tile: dequantize it with the scales folded in (the reference's own rule) and let
        # one GEMM write (M, out) with the bias added, as nn.Linear does: no transposed output to copy back.
        weight = buf[:n_out].copy_(int8_weights).mul_(scales.float()[:, None])  # (out, in), exact products
        y = torch.mm(x2, weight.t()) if bias is None else torch.addmm(bias.float(), x2, weight.t())
        return y.to(x.dtype).reshape(*x.shape[:-1], n_out)  # the one rounding to x.dtype
    y_t = torch.empty(n_out, m, dtype=torch.float32, device=device)  # (out, M)
    for r in range(0, n_out, rows):
        tile = buf[: min(rows, n_out - r)].copy_(int8_weights[r : r + rows])  # int8 -> fp32, exact
        if m == 1:
            torch.mv(tile, x2[0], out=y_t[r : r + rows, 0])
        else:
            torch.mm(tile, x2.t(), out=y_t[r : r + rows])
    y_t.mul_(scales.float()[:, None])
    if bias is not None:
        y_t.add_(bias.float()[:, None])
    y = torch.empty(m, n_out, dtype=x.dtype, device=device).copy_(y_t.t())  # the one rounding to x.dtype
    return y.reshape(*x.shape[:-1], n_out)


def tiled_grad_input(grad: torch.Tensor, int8_weights: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``grad (..., out) @ (int8 · scales[:, None])`` → ``(..., in)``, tile by tile: never a dense weight.

    The backward of the layer with respect to its input (LoRA on a frozen quantized base needs only this).
    fp32 inside, one rounding to ``grad.dtype``; works on any device.
    """
    n_out, n_in = int8_weights.shape
    g = grad.reshape(-1, n_out).float() * scales.float()  # (M, out): the scales folded into the gradient
    rows = tile_rows(n_out, n_in, g.shape[0])
    buf = _tile_buffer(rows, n_in, grad.device)
    acc = torch.zeros(g.shape[0], n_in, dtype=torch.float32, device=grad.device)  # (M, in)
    for r in range(0, n_out, rows):
        tile = buf[: min(rows, n_out - r)].copy_(int8_weights[r : r + rows])
        acc.addmm_(g[:, r : r + rows], tile)
    return acc.to(grad.dtype).reshape(*grad.shape[:-1], n_in)


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


def int8pack_supported(
    x: torch.Tensor, int8_weights: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> bool:
    """Whether `int8pack_linear` is correct *and* within the accuracy rule here.

    ``_weight_int8pack_mm`` takes the scales in ``x.dtype`` and rounds its output to it, so it is used only
    where neither costs accuracy: bf16 activations, bf16 scales (a bf16 layer: nothing to round), no bias (it
    would be added after the rounding). Its fp16/fp32 kernels are scalar loops, slower than `tiled_linear`.
    """
    return (
        x.device.type == "cpu"
        and int8_weights.device == scales.device == x.device
        and x.dtype == scales.dtype == torch.bfloat16
        and bias is None
        and int8_weights.dtype == torch.int8
        and int8_weights.dim() == 2
        and int8_weights.shape[1] % PACK_K_MULTIPLE == 0
        and scales.shape == int8_weights.shape[:1]
    )


def int8pack_linear(
    x: torch.Tensor, int8_weights: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``torch._weight_int8pack_mm`` on any leading shape, made safe (see `int8pack_supported`).

    A misaligned weight is copied on every call (correct but slow): `W8A16LinearLayer` re-aligns its buffer
    once instead. Activations are small, so they are simply copied when misaligned.
    """
    if not int8pack_supported(x, int8_weights, scales, bias):
        raise ValueError("int8pack needs bf16 x and scales, no bias, a CPU int8 weight with in_features % 16 == 0")
    x2 = x.reshape(-1, x.shape[-1])
    x2 = x2 if is_aligned(x2) else aligned_copy(x2)
    w = int8_weights if is_aligned(int8_weights) else aligned_copy(int8_weights)
    s = scales if scales.is_contiguous() else scales.contiguous()
    y = torch._weight_int8pack_mm(x2, w, s)
    return y.reshape(*x.shape[:-1], w.shape[0])


# ---------------------------------------------------------------------------------------------------------------
# memory: what quantizing frees goes back to the OS
# ---------------------------------------------------------------------------------------------------------------

FREED_HEAP_LIMIT = 64 << 20  # bytes of freed heap glibc may keep while layers are quantized


class _MallocInfo(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def _glibc_malloc() -> tuple[Any, Any] | None:
    """``(mallinfo2, malloc_trim)`` from glibc's malloc (glibc >= 2.33), else None (macOS, Windows, musl...)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        info, trim = libc.mallinfo2, libc.malloc_trim
    except (OSError, AttributeError):
        return None
    info.restype, info.argtypes = _MallocInfo, []
    trim.restype, trim.argtypes = ctypes.c_int, [ctypes.c_size_t]
    return info, trim


_GLIBC_MALLOC = _glibc_malloc()


def return_freed_heap(limit: int = FREED_HEAP_LIMIT) -> bool:
    """Hand freed heap memory back to the OS once glibc holds more than ``limit`` bytes of it; True if it did.

    Quantizing frees float tensors layer by layer (the checkpoint's, and fp32 temporaries), and glibc's malloc
    keeps freed blocks for reuse. Blocks that end up between int8 weights which stay are never returned on their
    own: depending on the order in which layers come (it varies with Python's hash seed), a CodeGen-350M
    quantized to 462 MB kept 0.3 to 1.4 GB resident after `from_pretrained(quantization_config=...)`, and up to
    1.7 GB after the walker. `malloc_trim` returns them; asking `mallinfo2` first (microseconds) keeps the trims
    to the few that matter. With another allocator (macOS, Windows, musl) nothing is done here.
    """
    if _GLIBC_MALLOC is None:
        return False
    info, trim = _GLIBC_MALLOC
    if info().fordblks <= limit:
        return False
    trim(0)
    return True
