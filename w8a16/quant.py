"""The functional core: choose scales, quantize, dequantize, measure the error.

Everything here is a pure function of tensors, so the notebooks can show each step on its own and the
layer (`layer.py`) and the exercises can reuse exactly the same maths.

Symmetric absmax quantization maps the largest magnitude of a block of weights to 127::

    scale = max|W| / 127          q = round(W / scale)  in [-127, 127]          W ≈ q * scale

A block is the whole tensor (per-tensor), one output row (per-channel, what W8A16 uses) or a run of
``group_size`` inputs inside a row (per-group). -128 is never produced, which keeps the grid symmetric.

Two refinements, for comparing (notebook 08), both off by default so the seed's maths is unchanged:

- ``bits``: the same symmetric grid with fewer levels, ``Q = 2**(bits-1) - 1`` (7 at 4 bits), still stored in
  int8. The layer itself is 8-bit; 4 bits is here to show where the choice of scale starts to matter.
- ``method="mse"`` (calibration): absmax spends the whole grid on the block's largest value, so one outlier
  makes the step large for every other weight. Clipping — a scale ``r · max|W| / Q`` with ``r < 1``, values
  beyond it saturating at ±Q — trades a large error on the few largest values for a smaller step on all the
  others. ``"mse"`` tries ``r`` = 1.00, 0.99, …, 0.50 for each block and keeps the one with the smallest squared
  error after quantize/dequantize. ``r = 1`` (absmax itself) is a candidate and wins ties, so the result is never
  worse than absmax on any block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

Q_MAX = 127  # symmetric int8: [-127, 127]
METHODS = ("absmax", "mse")
# The clipping ratios "mse" tries, absmax (1.0, exactly) first: 1.00, 0.99, ..., 0.50.
MSE_RATIOS = tuple((100 - k) / 100 for k in range(51))


def q_max(bits: int = 8) -> int:
    """The largest level of the symmetric ``bits``-bit grid: 127 for 8 bits, 7 for 4."""
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer from 2 to 8 (stored in int8), got {bits!r}")
    return 2 ** (bits - 1) - 1


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def _block_scales(blocks: torch.Tensor, bits: int, method: str) -> torch.Tensor:
    """Scales for each block along the last dimension of ``blocks`` (fp32), shape ``blocks.shape[:-1]``."""
    qmax = q_max(bits)
    _check_method(method)
    amax = blocks.abs().amax(dim=-1)
    if method == "absmax":
        return amax / qmax
    return _mse_scales(blocks, amax, qmax)


def _mse_scales(blocks: torch.Tensor, amax: torch.Tensor, qmax: int) -> torch.Tensor:
    """Per block, the clipped scale ``r · amax / Q`` (r in `MSE_RATIOS`) with the least squared error.

    One candidate at a time, so memory stays one block-sized temporary. Strict ``<``: a later (more clipped)
    ratio must be strictly better to replace an earlier one, so ties keep absmax; a NaN/Inf block keeps its
    non-finite absmax scale (its errors are NaN, never smaller), which callers reject as before.
    """
    best_scale = amax / qmax
    best_err = _block_sq_error(blocks, best_scale, qmax)
    for ratio in MSE_RATIOS[1:]:
        scale = amax * ratio / qmax
        err = _block_sq_error(blocks, scale, qmax)
        better = err < best_err
        best_scale = torch.where(better, scale, best_scale)
        best_err = torch.where(better, err, best_err)
    return best_scale


def _block_sq_error(blocks: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    """Σ (W - dequantize(quantize(W)))² per block, with the same zero-scale rule as `quantize`."""
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)[..., None]
    deq = torch.round(blocks / safe).clamp_(-qmax, qmax).mul_(safe)
    return (blocks - deq).pow_(2).sum(dim=-1)


def per_tensor_scale(weights: torch.Tensor) -> torch.Tensor:
    """One scale for the whole tensor (0-d fp32 tensor)."""
    return weights.detach().float().abs().amax() / Q_MAX


def per_channel_scales(weights: torch.Tensor, *, bits: int = 8, method: str = "absmax") -> torch.Tensor:
    """One scale per output row, shape ``(out,)``, in fp32: ``|W|.max(dim=-1) / 127`` by default.

    ``bits`` and ``method`` (``"absmax"`` or ``"mse"``) are described in the module docstring; the defaults give
    the seed's formula bit for bit.
    """
    _check_matrix(weights)
    if q_max(bits) == Q_MAX and method == "absmax":
        return weights.detach().float().abs().amax(dim=-1) / Q_MAX
    return _block_scales(weights.detach().float(), bits, method)


def per_group_scales(
    weights: torch.Tensor, group_size: int, *, bits: int = 8, method: str = "absmax"
) -> torch.Tensor:
    """One scale per ``group_size`` consecutive inputs of each row, shape ``(out, in // group_size)``."""
    _check_matrix(weights)
    out_features, in_features = weights.shape
    if group_size <= 0 or in_features % group_size:
        raise ValueError(f"group_size={group_size} must be positive and divide in_features={in_features}")
    grouped = weights.detach().float().reshape(out_features, in_features // group_size, group_size)
    if q_max(bits) == Q_MAX and method == "absmax":
        return grouped.abs().amax(dim=-1) / Q_MAX
    return _block_scales(grouped, bits, method)


def expand_scales(scales: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Broadcast per-tensor, per-channel or per-group scales to a weight of ``shape`` (out, in)."""
    if scales.dim() == 0:
        return scales.expand(shape)
    if scales.dim() == 1:
        return scales[:, None].expand(shape)
    if scales.dim() == 2 and shape[-1] % scales.shape[-1] == 0:
        return scales.repeat_interleave(shape[-1] // scales.shape[-1], dim=-1)
    raise ValueError(f"scales of shape {tuple(scales.shape)} do not fit a weight of shape {tuple(shape)}")


def quantize(weights: torch.Tensor, scales: torch.Tensor, *, bits: int = 8) -> torch.Tensor:
    """``round(W / scale)`` as int8, computed in fp32, clamped to ``[-Q, Q]`` (``Q = 127`` at 8 bits).

    A zero scale (an all-zero block) is replaced by 1 for the division, so that block gets q = 0 instead of
    0/0 = NaN and dequantizes to 0. At 8 bits with absmax scales the clamp only matters when the scale was
    rounded down to a 16-bit dtype and W/scale lands just above 127; without it round() could give 128, which
    wraps to -128 in int8. With clipped (``"mse"``) scales it is what saturates the clipped values.
    """
    qmax = q_max(bits)
    w = weights.detach().float()
    s = scales.detach().float()
    safe = torch.where(s == 0, torch.ones_like(s), s)  # on the compact scales, before broadcasting
    return torch.round(w / expand_scales(safe, w.shape)).clamp_(-qmax, qmax).to(torch.int8)


def dequantize(int8_weights: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q * scale``, computed in fp32 and returned in ``dtype``."""
    s = expand_scales(scales.float(), int8_weights.shape)
    return (int8_weights.float() * s).to(dtype)


def quantize_dequantize(
    weights: torch.Tensor, *, bits: int = 8, method: str = "absmax", group_size: int | None = None
) -> torch.Tensor:
    """``dequantize(quantize(W))`` in fp32, per channel (or per group of ``group_size`` inputs): what the
    quantized weight computes with. For measuring a choice of ``bits``/``method``/grouping in one call."""
    if group_size is None:
        scales = per_channel_scales(weights, bits=bits, method=method)
    else:
        scales = per_group_scales(weights, group_size, bits=bits, method=method)
    return dequantize(quantize(weights, scales, bits=bits), scales)


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
