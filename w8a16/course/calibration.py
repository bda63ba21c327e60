"""What notebook 08 measures: absmax vs mse scales, 8 vs 4 bits, per channel vs per group, on CodeGen's shapes.

The weights are random (offline, there is no checkpoint to read): the real shapes of one codegen-350M-mono block
with its initialisation (normal, std = ``initializer_range``), and the same shapes drawn from a heavy-tailed
Student-t, which is closer to what trained LLM weights look like (a few large values per row). Only ``rows``
output rows of each layer are drawn: the scales are chosen row by row, so the statistics of a few hundred rows
are those of the whole layer, at a fraction of the cost of the clipping search.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import quant
from .models import shipped_config

__all__ = ["CalibrationRow", "codegen_block_weights", "compare_calibration", "format_table"]


def codegen_block_weights(rows: int = 256, *, heavy_tailed: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """``rows`` output rows of each Linear of one codegen-350M-mono block (fp32), named as in the model."""
    config = shipped_config("codegen-350M-mono")
    d, std = config["n_embd"], config["initializer_range"]
    inner = config.get("n_inner") or 4 * d
    shapes = {"attn.qkv_proj": d, "attn.out_proj": d, "mlp.fc_in": d, "mlp.fc_out": inner}  # name -> in_features
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, in_features in shapes.items():
        if heavy_tailed:  # Student-t with 3 degrees of freedom, scaled to the same std (its variance is 3)
            normal = torch.randn(rows, in_features, generator=gen)
            chi2 = torch.randn(rows, in_features, 3, generator=gen).pow(2).sum(-1)
            w = normal / (chi2 / 3).sqrt() / math.sqrt(3)
        else:
            w = torch.randn(rows, in_features, generator=gen)
        weights[name] = w * std
    return weights


@dataclass(frozen=True)
class CalibrationRow:
    """One configuration's error over a set of layers."""

    bits: int
    granularity: str  # "per-channel" or "per-group (g=…)"
    method: str
    sqnr_db: float  # weights: 10·log10(Σ W² / Σ (W − Ŵ)²) over all layers
    output_rel_error: float  # ‖x Ŵᵀ − x Wᵀ‖ / ‖x Wᵀ‖ over all layers, x ~ N(0, 1)


def compare_calibration(
    weights: dict[str, torch.Tensor],
    *,
    bits: tuple[int, ...] = (8, 4),
    group_size: int = 128,
    tokens: int = 64,
    seed: int = 0,
) -> list[CalibrationRow]:
    """SQNR and output error of every (bits, per-channel/per-group, absmax/mse) combination."""
    gen = torch.Generator().manual_seed(seed)
    inputs = {name: torch.randn(tokens, w.shape[1], generator=gen) for name, w in weights.items()}
    outputs = {name: inputs[name] @ w.T for name, w in weights.items()}
    rows = []
    for b in bits:
        for group in (None, group_size):
            for method in quant.METHODS:
                signal = noise = out_signal = out_noise = 0.0
                for name, w in weights.items():
                    w_hat = quant.quantize_dequantize(w, bits=b, method=method, group_size=group)
                    signal += w.pow(2).sum().item()
                    noise += (w - w_hat).pow(2).sum().item()
                    out_signal += outputs[name].pow(2).sum().item()
                    out_noise += (inputs[name] @ w_hat.T - outputs[name]).pow(2).sum().item()
                granularity = "per-channel" if group is None else f"per-group (g={group})"
                rows.append(CalibrationRow(b, granularity, method, 10 * math.log10(signal / noise),
                                           math.sqrt(out_noise / out_signal)))
    return rows


def format_table(rows: list[CalibrationRow]) -> str:
    """A plain-text table, one line per configuration."""
    lines = [f"{'bits':>4}  {'granularity':<20} {'method':<7} {'SQNR':>8}  {'output error':>12}"]
    for r in rows:
        lines.append(f"{r.bits:>4}  {r.granularity:<20} {r.method:<7} {r.sqnr_db:>5.1f} dB  {r.output_rel_error:>12.3%}")
    return "\n".join(lines)


def gain_db(rows: list[CalibrationRow], bits: int, granularity: str) -> float:
    """dB of SQNR that mse gains over absmax for one (bits, granularity)."""
    by = {(r.bits, r.granularity, r.method): r.sqnr_db for r in rows}
    return by[(bits, granularity, "mse")] - by[(bits, granularity, "absmax")]
