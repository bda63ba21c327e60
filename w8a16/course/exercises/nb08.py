"""Checks for the exercises of notebook 08 (calibration, QAT, ONNX export).

1. `check_mse_scales`: the per-row clipping search — one scale per row, never worse than absmax, as good as the
   reference search; hints for the usual slips (no clamp while measuring, the 8-bit Q at 4 bits, a per-tensor
   search, returning the ratio, NaN on a zero row, a grid without r = 1).
2. `check_fake_quant_ste`: fake quantization with a straight-through estimator — the forward is the quantized
   weight, the gradient is the identity; hints for a plain round() (zero gradient) and a gradient through the
   scale.
"""

from __future__ import annotations

import torch

from ... import quant
from ._core import Failed, call, exercise

__all__ = ["QUIZ", "check_mse_scales", "check_fake_quant_ste", "mse_scales", "fake_quant_ste"]


# ----------------------------------------------------------------------------------------- references


def mse_scales(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Reference: the library's search (`quant.per_channel_scales(..., method="mse")`)."""
    return quant.per_channel_scales(w, bits=bits, method="mse")


def fake_quant_ste(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Reference: the detach trick — forward ``ŵ``, backward the identity (absmax scales clip nothing)."""
    scales = quant.per_channel_scales(w.detach(), bits=bits)
    w_hat = quant.dequantize(quant.quantize(w.detach(), scales, bits=bits), scales)
    return w + (w_hat - w).detach()


# ------------------------------------------------------------------------------------------------ inputs


def _matrices() -> list[tuple[str, torch.Tensor, int]]:
    g = torch.Generator().manual_seed(808)
    heavy = torch.randn(16, 64, generator=g) / torch.rand(16, 64, generator=g).clamp_min(0.05)
    zero_row = torch.randn(6, 32, generator=g) * 0.02
    zero_row[3] = 0
    return [
        ("a 16×64 heavy-tailed matrix at 4 bits", heavy * 0.01, 4),
        ("the same matrix at 8 bits", heavy * 0.01, 8),
        ("a 6×32 matrix with an all-zero row at 4 bits", zero_row, 4),
        ("an 8×48 Gaussian matrix at 3 bits", torch.randn(8, 48, generator=g), 3),
    ]


def _row_errors(w: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    deq = quant.dequantize(quant.quantize(w, scales, bits=bits), scales)
    return (w.float() - deq).pow(2).sum(-1)


# ----------------------------------------------------------------------------------------- exercise 1


@exercise("Clipping search (mse scales)",
          passed="one scale per row, never worse than absmax and as good as the reference, on 4 matrices.")
def check_mse_scales(fn):
    """``fn(w, bits)`` returns one fp32 scale per row minimising that row's squared error over r = 1.00…0.50."""
    for case, w, bits in _matrices():
        got = call(fn, w.clone(), bits)
        if not isinstance(got, torch.Tensor):
            raise Failed(f"your function returned a {type(got).__name__}; return a tensor of scales, one per row.")
        got = got.detach().float().reshape(-1) if got.dim() == 2 and got.shape[-1] == 1 else got.detach().float()
        if got.numel() == 1:
            raise Failed(f"on {case} you returned one scale for the whole matrix: search each row on its own "
                         "(one scale per output row, shape (out,)).")
        if tuple(got.shape) != (w.shape[0],):
            raise Failed(f"on {case} your scales have shape {tuple(got.shape)}; expected ({w.shape[0]},), one per row.")
        if not torch.isfinite(got).all():
            raise Failed(f"on {case} your scales contain NaN or Inf. An all-zero row has absmax 0: give it scale 0 "
                         "(quantize() divides safely), and don't divide by the absmax.")
        absmax = quant.per_channel_scales(w, bits=bits)
        nonzero = absmax > 0
        ratio = got[nonzero] / absmax[nonzero]
        looks_like_ratios = ((got[nonzero] >= 0.5 - 1e-6) & (got[nonzero] <= 1 + 1e-6)).all()
        if looks_like_ratios and (absmax < 0.25).all():
            raise Failed("you returned the clipping ratios r; return the scales r · max|W| / Q.")
        if (ratio < 0.2).float().mean() > 0.5:
            raise Failed(f"on {case} your scales are far below absmax's: is Q right? At {bits} bits the largest level "
                         f"is 2**(bits-1) - 1 = {quant.q_max(bits)}, not 127.")
        errors, reference = _row_errors(w, got, bits), _row_errors(w, absmax, bits)
        best = _row_errors(w, mse_scales(w, bits), bits)
        if ((ratio - 0.5).abs() < 1e-6).float().mean() > 0.5 and (errors > best * (1 + 1e-5)).any():
            raise Failed(f"on {case} most of your scales are 0.5 × absmax, the smallest ratio: when you measure a "
                         "candidate's error, clamp round(W/s) to [-Q, Q] first — without the clamp a smaller scale "
                         "always looks better, because nothing saturates.")
        if (errors > reference * (1 + 1e-6) + 1e-30).any():
            row = int((errors > reference * (1 + 1e-6)).nonzero()[0])
            raise Failed(f"on {case}, row {row} is worse than absmax: include r = 1.00 (absmax itself) among the "
                         "candidates, and keep a smaller ratio only when it is strictly better.")
        if (errors > best * (1 + 1e-5) + 1e-30).any():
            raise Failed(f"on {case} some rows are worse than the best ratio of the grid r = 1.00, 0.99, …, 0.50: "
                         "try every ratio and keep, for each row, the one with the least squared error "
                         "after quantize → dequantize.")


# ----------------------------------------------------------------------------------------- exercise 2


@exercise("Fake quantization with a straight-through estimator",
          passed="the forward is the quantized weight and the gradient the identity, on 4 matrices.")
def check_fake_quant_ste(fn):
    """``fn(w, bits)`` returns ``ŵ`` (values of dequantize(quantize(w))) whose gradient with respect to w is 1."""
    for case, w, bits in _matrices():
        leaf = w.clone().requires_grad_()
        got = call(fn, leaf, bits)
        if not isinstance(got, torch.Tensor) or got.shape != w.shape:
            raise Failed(f"on {case} return a tensor of the weight's shape {tuple(w.shape)}.")
        scales = quant.per_channel_scales(w, bits=bits)
        expected = quant.dequantize(quant.quantize(w, scales, bits=bits), scales)
        if not torch.allclose(got.detach().float(), expected, rtol=1e-5, atol=1e-7):
            raise Failed(f"on {case} the forward values are not dequantize(quantize(w)) with absmax scales at "
                         f"{bits} bits (Q = {quant.q_max(bits)}): check the scale and the clamp.")
        if not got.requires_grad:
            raise Failed("your result does not require grad: it was computed without w (detached entirely, or in "
                         "no_grad). Use w + (ŵ − w).detach(), so the gradient reaches w.")
        grad = torch.randn(w.shape, generator=torch.Generator().manual_seed(8))
        got.backward(grad)
        if leaf.grad is None or not leaf.grad.abs().sum():
            raise Failed("the gradient with respect to w is zero: round() has zero gradient almost everywhere. "
                         "The straight-through estimator passes it unchanged: return w + (ŵ − w).detach().")
        if not torch.allclose(leaf.grad, grad, rtol=1e-4, atol=1e-6):
            raise Failed("the gradient with respect to w is not the identity: it also flows through the scale (or a "
                         "division by it). Detach the whole correction: w + (ŵ − w).detach().")


# ----------------------------------------------------------------------------------------------------- quiz

from .quiz import Question, Quiz  # noqa: E402 (the quiz comes after the checks, as in the notebook)

QUIZ = Quiz("08", [
    Question("A clipping search ('mse') instead of absmax scales: where does it pay?",
             ("at 8 bits per channel: it gains several dB", "at 4 bits: with 15 levels, clipping a few outliers "
              "buys a finer step for all the other weights", "nowhere: absmax is always optimal"), "b",
             "At 8 bits the step is already fine and absmax is near-optimal; at 4 bits clipping gains dBs.",
             {"a": "the notebook measures about a tenth of a dB at most at 8 bits per channel.",
              "c": "absmax minimises the largest error, not the mean squared one; at 4 bits they differ."}),
    Question("Quantization-aware training rounds the weights in the forward. How do gradients get past round()?",
             ("round() has a useful gradient", "the straight-through estimator: the backward treats the rounding "
              "as the identity (w + (ŵ − w).detach())", "the weights are trained in int8"), "b",
             "round() is flat almost everywhere; the STE passes the gradient through as if it were not there.",
             {"a": "its derivative is zero almost everywhere, so nothing would train.",
              "c": "a float copy of the weights is trained; int8 comes at convert()."}),
    Question("Why export W8A16 to ONNX as DequantizeLinear feeding MatMul?",
             ("the file keeps the int8 weights and per-row scales, so it is about the quantized size", "onnxruntime "
              "cannot run float weights", "it makes the activations int8"), "a",
             "The int8 initializers and the scales go into the file as they are; the runtime dequantizes.",
             {"b": "onnxruntime runs float models fine; the point is the file size.",
              "c": "the activations stay float — watch out for runtimes that fuse this into W8A8 by default."}),
])
