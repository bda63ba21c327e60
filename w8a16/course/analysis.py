"""Per-layer error tables: what per-channel int8 does to each Linear layer of a model.

Run it *before* quantizing (it needs the original weights); it quantizes copies and leaves the model as is.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .. import quant


def layer_errors(model: nn.Module, names: Iterable[str] | None = None) -> list[dict]:
    """One row per `nn.Linear`: name, shape, parameters and `ErrorStats` of per-channel int8 quantization.

    ``names`` restricts the table to those fully-qualified module names. Rows are plain dicts so a notebook
    can print them with `format_table` or hand them to pandas.
    """
    wanted = None if names is None else set(names)
    rows = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or (wanted is not None and name not in wanted):
            continue
        weight = module.weight.detach()
        scales = quant.per_channel_scales(weight).to(weight.dtype)
        stats = quant.error_stats(weight, quant.quantize(weight, scales), scales)
        rows.append({"name": name, "shape": tuple(weight.shape), "params": weight.numel(), **vars(stats)})
    return rows


def format_table(rows: list[dict], columns: Iterable[str] = ("name", "shape", "rel_fro", "sqnr_db", "max_err_over_scale")) -> str:
    """A fixed-width text table of selected columns; floats printed to 3 significant digits."""
    columns = list(columns)
    cells = [[_fmt(row[c]) for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    lines = [columns, *cells]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in lines)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, torch.Size | tuple):
        return "×".join(map(str, value))
    return str(value)
