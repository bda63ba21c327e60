"""The W8A16 matmul: ``y = x @ (int8_weights * scales[:, None]).T + bias``.

`w8a16_linear` is the one entry point the layer calls. For now it has one path, the reference: dequantize
the weight to the activation dtype, then a normal matmul. Scaling the *weights* before the matmul (not the
output after it, as the seed did) keeps every partial sum at the true output's magnitude, so fp16 cannot
overflow on activation outliers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_linear(
    x: torch.Tensor, int8_weights: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Always-correct path: dequantize to ``x.dtype``, then ``F.linear``."""
    weight = int8_weights.to(x.dtype) * scales.to(x.dtype)[:, None]
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


def w8a16_linear(
    x: torch.Tensor, int8_weights: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Pick the fastest correct path for this call (see the module docstring)."""
    return reference_linear(x, int8_weights, scales, bias)
