"""Which path computes a W8A16 matmul, chosen per call by measurement. Every path obeys `reference`'s rule.

``reference``
    `reference.reference_linear`: dequantize in fp32, ``F.linear``, round once. Any device; on CUDA the path
    where Triton is missing or switched off. Slow everywhere: most of its time goes into writing and reading back
    a full-size fp32 weight on every call (on an H200, 10–23× slower than cuBLAS on the float weight).
``native``
    A short C kernel (``ops/csrc/gemv.c``, built on first use by `native`) that turns int8 into fp32 in registers
    and accumulates in fp32: the weights are read once, as int8. At M=1 (decode) it streams them at memory
    speed, making floats of them with integer byte operations alone (no conversion instruction); for a few rows of x it converts each weight once for four (AVX2) or eight (AVX-512) rows, and bf16 x
    goes through the bf16 dot product (VDPBF16PS) where the CPU has one. Used up to `NATIVE_MAX_M` rows, on a CPU
    where the library runs a SIMD variant (a scalar C loop loses to PyTorch's kernels). For bf16 x from
    `native.BF16_DOT_MIN_M` rows on, at any batch, on CPUs with AVX512-BF16, a GEMM (the end of ``csrc/gemv.c``): int8
    widened to bf16 and multiplied with VDPBF16PS 16 rows of x at a time — the instruction PyTorch's dense bf16
    matmul uses there, at twice the multiply-adds of fp32 FMAs.
``triton``
    The GPU path (`gpu`), for every batch size on CUDA: a Triton matmul that reads int8 weight tiles, widens them
    in registers and multiplies on the tensor cores; checked against the reference on first use on each device
    and dtype, switched off there if it fails.
``int8pack``
    ``torch._weight_int8pack_mm`` where no native kernel runs: bf16 layers without bias, up to `PACK_MAX_M` rows
    (see `cpu.int8pack_supported` for why only there).
``tiled``
    Dequantize a block of rows at a time into a reused, cache-sized fp32 buffer and matmul each tile: the CPU
    path for everything else.

Dispatch on a CPU, from ``python -m w8a16.bench`` on a 2-core AVX2 EPYC (torch 2.13, stream-read bandwidth
16.1 GB/s): one 4096×4096 layer, weights rotated past the L3, medians of alternated runs, speed vs ``nn.Linear``
of the same dtype (the seed's naive forward in brackets). Rerun it for your machine.

    M      bf16                    fp32                    fp16
    1      2.42× native  (0.16)    3.67× native  (0.14)    1.73× native  (0.09)
    16     3.98× native  (0.61)    2.78× native  (0.32)    3.72× native  (0.45)
    64     3.95× tiled   (0.86)    1.56× tiled   (0.53)    3.22× tiled   (0.76)
    256    6.16× tiled   (1.02)    1.26× tiled   (0.71)    4.39× tiled   (0.91)

* Tiles: 4 MiB for M=1 (a gemv: memory bound, stay in cache), 16 MiB for M ≥ 2. Each tile costs two parallel
  regions, and on a busy machine each region can wait for a descheduled OpenMP thread; big tiles kept tiled
  faster than the seed under load (fp32 M=16 with another 2-thread job running: 226 ms with 4 MiB tiles,
  89 ms with 16 MiB, 150 ms for the seed).
"""

from __future__ import annotations

import os
import warnings

import torch

from . import gpu, native
from .cpu import int8pack_linear, int8pack_supported, tiled_linear
from .reference import reference_linear

PATHS = ("reference", "native", "int8pack", "tiled", "triton")
FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # activations the fast paths serve (fp32 inside)

# Largest batch for which the CPU dispatch uses the native kernel. Measured (4096×4096, weights rotated past the
# cache, 2 cores; ms for native / int8pack / tiled): bf16 M=16 6.3 / 10.1 / 15.0, M=32 14.8 / 20.2 / 17.2,
# M=64 24.2 / 40.1 / 26.3; fp32 M=32 11.9 / – / 20.1, M=64 29.3 / – / 39.5. 32 leaves a margin.
NATIVE_MAX_M = 32

# Largest batch for which int8pack is used where the native kernel is not (bf16 only, see cpu.int8pack_supported):
# it beat tiled at M=16 (10 vs 15 ms) but not at M=32 (20 vs 17).
PACK_MAX_M = 16


def native_vectorised() -> bool:
    """The C kernel is built here and runs a SIMD variant on this CPU (else PyTorch's kernels are faster)."""
    return native.simd() is not None  # None: not built, or only the scalar loop


def native_supported(x: torch.Tensor, int8_weights: torch.Tensor, scales: torch.Tensor) -> bool:
    """Whether the C kernel is built here and these are CPU tensors it handles (any shape, any alignment)."""
    return (
        x.device.type == int8_weights.device.type == scales.device.type == "cpu"
        and int8_weights.dtype == torch.int8
        and native_vectorised()
    )


def native_linear(
    x: torch.Tensor, int8_weights: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The C GEMV on any leading shape; fp32 inside, rounded to ``x.dtype`` once."""
    y = native.gemv(x.reshape(-1, x.shape[-1]), int8_weights, scales, bias)
    return y.reshape(*x.shape[:-1], int8_weights.shape[0])


def _rows(x: torch.Tensor) -> int:
    return x.numel() // max(1, x.shape[-1])


def supported_paths(
    x: torch.Tensor, int8_weights: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> list[str]:
    """Every path that gives a correct answer within the accuracy rule for these arguments (tests run each)."""
    if x.dtype not in FAST_DTYPES:
        return ["reference"]  # the fast paths compute in fp32: less than an fp64 input asks for
    paths = ["reference"]
    if x.device.type == "cpu":
        paths.append("tiled")
    if gpu.available(x) and int8_weights.device == scales.device == x.device:
        paths.append("triton")
    if native_supported(x, int8_weights, scales):
        paths.append("native")
    if int8pack_supported(x, int8_weights, scales, bias):
        paths.append("int8pack")
    return paths


def choose_path(
    x: torch.Tensor, int8_weights: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> str:
    """The path `w8a16_linear` takes for these arguments, and why (comments)."""
    if x.dtype not in FAST_DTYPES:
        return "reference"  # fp64: the fast paths compute in fp32, the reference in x's own precision
    m = _rows(x)
    if m == 0 or x.shape[-1] == 0 or int8_weights.shape[0] == 0:
        return "reference"  # empty: nothing to speed up, and the fast kernels are not tested on it
    if x.device.type != "cpu":
        if x.device.type == "cuda" and gpu.available(x) and gpu.passes_first_use_check(x):
            return "triton"  # CUDA: int8 tiles widened in registers (checked against the reference on first use)
        return "reference"  # CUDA & co: dequantize in fp32 + the vendor GEMM
    if native_supported(x, int8_weights, scales):
        if m <= NATIVE_MAX_M:
            return "native"  # decode, prefill of short prompts, small batches: int8 read once, fp32 accumulation
        if x.dtype == torch.bfloat16 and native.bf16_dot():
            return "native"  # bf16 on an AVX512-BF16 CPU, any batch: VDPBF16PS, the dense layer's own rate
    _announce_missing_native()
    if m <= PACK_MAX_M and int8pack_supported(x, int8_weights, scales, bias):
        return "int8pack"  # no vectorised C kernel here: one kernel call that reads int8 directly
    return "tiled"  # everything else on a CPU: fp32 GEMM per tile, never a full-size temporary


def check_args(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
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
    """``x @ (int8_weights * scales[:, None]).T + bias`` in ``x.dtype``, by the fastest correct path; no autograd.

    ``path`` forces one of `PATHS` (for tests and benchmarks); it raises ``ValueError`` where that path would
    not be correct for these arguments. Models call this through the registered op (`ops.linear`), which adds
    autograd, ``torch.compile`` and ``torch.export`` support.
    """
    check_args(x, int8_weights, scales, bias)
    if path is None:
        path = choose_path(x, int8_weights, scales, bias)
        if path == "triton":  # compiled per shape on first use: a failure there must not take the model down
            try:
                return gpu.triton_linear(x, int8_weights, scales, bias)
            except Exception as err:  # noqa: BLE001 — any Triton/driver error: switch it off, answer correctly
                gpu.switch_off(x, f"{type(err).__name__}: {err}")
                path = "reference"
    elif path not in supported_paths(x, int8_weights, scales, bias):
        raise ValueError(
            f"path {path!r} is not supported here; choose from {supported_paths(x, int8_weights, scales, bias)}"
        )
    return _IMPLS[path](x, int8_weights, scales, bias)


# ---------------------------------------------------------------------------------------------------------------
# What runs here, and why not the rest
# ---------------------------------------------------------------------------------------------------------------

_announced: list[bool] = []


def _announce_missing_native() -> None:
    """One informational warning per process when the fast CPU kernel cannot run (unless switched off on purpose)."""
    if _announced or os.environ.get("W8A16_NATIVE", "1") == "0":
        return
    _announced.append(True)
    info = backend_info()["native"]
    if not info["available"]:
        warnings.warn(
            f"w8a16: the fast CPU kernel is not available ({info['reason']}); using PyTorch's kernels, which are "
            "slower at small batch. w8a16.backend_info() says more; W8A16_NATIVE=0 silences this.",
            RuntimeWarning,
            stacklevel=3,
        )


def backend_info() -> dict[str, dict[str, object]]:
    """Which paths can run in this process and, for each that cannot, why. For bug reports and notebooks."""
    native_info = native.info()
    if native_info["available"] and native_info["simd"] is None:
        native_info["reason"] = "built, but only as a scalar loop on this CPU: PyTorch's kernels are used instead"
        native_info["available"] = False
    has_pack = hasattr(torch, "_weight_int8pack_mm")
    has_triton = gpu.triton_installed()
    triton_on = os.environ.get("W8A16_TRITON", "1") != "0"
    cuda = torch.cuda.is_available()
    return {
        "reference": {"available": True, "reason": None},
        "tiled": {"available": True, "reason": None},
        "native": native_info,
        "int8pack": {"available": has_pack, "reason": None if has_pack else "this torch has no _weight_int8pack_mm"},
        "triton": {
            "available": has_triton and triton_on and cuda,
            "reason": None if has_triton and triton_on and cuda else
            "switched off by W8A16_TRITON=0" if not triton_on else
            "Triton is not installed" if not has_triton else "no CUDA device",
        },
    }
