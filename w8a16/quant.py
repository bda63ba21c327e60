"""The functional core: choose scales, quantize, dequantize, measure the error.

Everything here is a pure function of tensors, so the notebooks can show each step on its own and the
layer (`layer.py`) and the exercises can reuse exactly the same maths.

Symmetric absmax quantization maps the largest magnitude of a block of weights to 127::

    scale = max|W| / 127          q = round(W / scale)  in [-127, 127]          W ≈ q * scale

A block is the whole tensor (per-tensor), one output row (per-channel, what W8A16 uses) or a run of
``group_size`` inputs inside a row (per-group). -128 is never produced, which keeps the grid symmetric.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

Q_MAX = 127  # symmetric int8: [-127, 127]


def per_tensor_scale(weights: torch.Tensor) -> torch.Tensor:
    """One scale for the whole tensor (0-d fp32 tensor)."""
    return weights.detach().float().abs().amax() / Q_MAX


def per_channel_scales(weights: torch.Tensor) -> torch.Tensor:
    """One scale per output row, shape ``(out,)``, in fp32: ``|W|.max(dim=-1) / 127``."""
    _check_matrix(weights)
    return weights.detach().float().abs().amax(dim=-1) / Q_MAX


def per_group_scales(weights: torch.Tensor, group_size: int) -> torch.Tensor:
    """One scale per ``group_size`` consecutive inputs of each row, shape ``(out, in // group_size)``."""
    _check_matrix(weights)
    out_features, in_features = weights.shape
    if group_size <= 0 or in_features % group_size:
        raise ValueError(f"group_size={group_size} must be positive and divide in_features={in_features}")
    grouped = weights.detach().float().reshape(out_features, in_features // group_size, group_size)
    return grouped.abs().amax(dim=-1) / Q_MAX


def expand_scales(scales: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Broadcast per-tensor, per-channel or per-group scales to a weight of ``shape`` (out, in)."""
    if scales.dim() == 0:
        return scales.expand(shape)
    if scales.dim() == 1:
        return scales[:, None].expand(shape)
    if scales.dim() == 2 and shape[-1] % scales.shape[-1] == 0:
        return scales.repeat_interleave(shape[-1] // scales.shape[-1], dim=-1)
    raise ValueError(f"scales of shape {tuple(scales.shape)} do not fit a weight of shape {tuple(shape)}")


def quantize(weights: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``round(W / scale)`` as int8, computed in fp32.

    A zero scale (an all-zero block) is replaced by 1 for the division, so that block gets q = 0 instead of
    0/0 = NaN and dequantizes to 0. The clamp only matters when the scale was rounded down to a 16-bit dtype
    and W/scale lands just above 127; without it round() could give 128, which wraps to -128 in int8.
    """
    w = weights.detach().float()
    s = scales.detach().float()
    safe = torch.where(s == 0, torch.ones_like(s), s)  # on the compact scales, before broadcasting
    return torch.round(w / expand_scales(safe, w.shape)).clamp_(-Q_MAX, Q_MAX).to(torch.int8)


def dequantize(int8_weights: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q * scale``, computed in fp32 and returned in ``dtype``."""
    s = expand_scales(scales.float(), int8_weights.shape)
    return (int8_weights.float() * s).to(dtype)


def check_weights(weights: torch.Tensor, shape: tuple[int, int] | None = None, *, finite: bool = True) -> None:
    """Raise ``ValueError`` for weights that cannot be quantized: wrong rank/shape/dtype, NaN or Inf.

    ``finite=False`` skips the full pass over the values, for callers that detect non-finite rows more
    cheaply (a NaN or Inf anywhere in a row makes that row's absmax scale non-finite).
    """
    _check_matrix(weights)
    if shape is not None and tuple(weights.shape) != tuple(shape):
        raise ValueError(f"weight has shape {tuple(weights.shape)}, expected {tuple(shape)} (out_features, in_features)")
    if not weights.is_floating_point():
        raise ValueError(f"weight must be floating point, got {weights.dtype}")
    if finite and weights.device.type != "meta" and not torch.isfinite(weights).all():
        bad = (~torch.isfinite(weights)).nonzero()
        row, col = bad[0].tolist()
        kind = "NaN" if torch.isnan(weights[row, col]) else "Inf"
        raise ValueError(
            f"weight contains {len(bad)} non-finite value(s) (first: {kind} at row {row}, column {col}); "
            "cannot compute an absmax scale"
        )


def _check_matrix(weights: torch.Tensor) -> None:
    if weights.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weights.shape)}")


@dataclass(frozen=True)
class ErrorStats:
    """How far ``dequantize(quantize(W))`` is from ``W``."""

    max_abs: float  # largest |W - Ŵ|
    mean_abs: float  # mean |W - Ŵ|
    rel_fro: float  # ||W - Ŵ||_F / ||W||_F
    sqnr_db: float  # signal-to-quantization-noise ratio, 10·log10(ΣW² / Σ(W-Ŵ)²)
    max_err_over_scale: float  # theory says ≤ 0.5: rounding moves a value by at most half a step

    def __str__(self) -> str:
        return (
            f"max|err|={self.max_abs:.3g}  mean|err|={self.mean_abs:.3g}  rel={self.rel_fro:.3%}  "
            f"SQNR={self.sqnr_db:.1f} dB  max|err|/scale={self.max_err_over_scale:.3f}"
        )


def error_stats(weights: torch.Tensor, int8_weights: torch.Tensor, scales: torch.Tensor) -> ErrorStats:
    """Error statistics of a quantized weight against the original, all in fp32."""
    w = weights.detach().float()
    s = expand_scales(scales.detach().float(), w.shape)
    err = w - int8_weights.float() * s
    signal, noise = w.pow(2).sum().item(), err.pow(2).sum().item()
    # Dividing by inf where the scale is 0 (an all-zero block: its error is 0) is ~3x faster than masking.
    err_over_scale = err.abs() / torch.where(s > 0, s, torch.full_like(s, math.inf))
    return ErrorStats(
        max_abs=err.abs().max().item(),
        mean_abs=err.abs().mean().item(),
        rel_fro=math.sqrt(noise / signal) if signal > 0 else 0.0,
        sqnr_db=10 * math.log10(signal / noise) if noise > 0 else math.inf,
        max_err_over_scale=err_over_scale.max().item(),
    )
