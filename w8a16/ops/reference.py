"""The maths every path must reproduce: ``y = x @ (int8_weights · scales[:, None]).T + bias``.

This is the whole of W8A16. The weights are stored as int8 with one scale per output row; a forward multiplies
them back (dequantizes) and does an ordinary matmul. The fast paths in this package (`cpu`, `native`,
`triton`) compute exactly this, only without ever writing the dense weight to memory.

One accuracy rule for every path, and this function is its definition:

* dequantize in fp32 — ``int8 · scale`` is exact in fp32 for any fp32/bf16/fp16 scale (8 + 24 bits); rounding
  the scales to a 16-bit activation dtype first would lose up to 8 % on tiny fp16 scales;
* accumulate in fp32, so fp16 partial sums never overflow;
* round once, at the end, to ``x.dtype``: a true result beyond the dtype's range becomes ±inf, as with
  ``nn.Linear``, never NaN.

fp64 inputs are computed in fp64 (they asked for more than fp32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for 16/32-bit activations, fp64 for fp64 ones."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def reference_linear(
    x: torch.Tensor, int8_weights: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x (..., in) @ (int8_weights (out, in) · scales (out,)).T + bias (out,)`` → ``(..., out)`` in ``x.dtype``."""
    acc = accumulate_dtype(x.dtype)
    weight = int8_weights.to(acc) * scales.to(acc)[:, None]  # (out, in), exact
    y = F.linear(x.to(acc), weight, None if bias is None else bias.to(acc))
    return y.to(x.dtype)  # the one rounding
