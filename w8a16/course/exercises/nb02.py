"""Checks for the exercises of notebook 02 (rounding error).

The learner measures the error bound, predicts the RMS error from the step size, and compares per-tensor with
per-channel error. Test matrices include a square one (so scales broadcast along the wrong dimension give a
wrong number instead of a crash), an all-zero row (0 / 0), a matrix whose rounding errors are all negative
(so a forgotten ``abs`` shows) and bf16.
"""

from __future__ import annotations

import math

import torch

from ... import quant
from .quiz import Question, Quiz
from ._core import Failed, call, exercise

__all__ = ["QUIZ", "check_max_error_over_scale", "check_expected_rms_error", "check_error_ratio"]


def _number(got: object, case: str) -> float:
    """The learner's answer as a Python float (a float, an int or a one-element tensor)."""
    if isinstance(got, torch.Tensor):
        if got.numel() != 1:
            raise Failed(f"on {case} you returned a tensor of shape {tuple(got.shape)}; return one number (e.g. .max().item()).")
        return float(got.detach().float())
    if isinstance(got, (int, float)):
        return float(got)
    raise Failed(f"on {case} your function returned a {type(got).__name__}; return a number.")


def _call(fn, *args):
    """`call`, plus a hint when the crash is the classic per-row scales broadcast along the columns."""
    try:
        return call(fn, *args)
    except Failed as err:
        if "must match the size of tensor" in str(err):
            raise Failed(
                f"{err}. Scales have one entry per row, shape (out,); to divide a row's errors by its scale, "
                "broadcast them as a column: scales[:, None]."
            ) from None
        raise


def _per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel scales and the error W − Ŵ, both fp32."""
    scales = quant.per_channel_scales(w)
    error = w.float() - quant.dequantize(quant.quantize(w, scales), scales)
    return scales, error


# ----------------------------------------------------------------------------------------- exercise 1


def _bound_cases() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(201)
    step = 0.01
    negative = step * torch.tensor([[127.0, 10.6, -20.4, 30.7], [-127.0, 5.6, 40.8, -3.4]])  # errors all ≤ 0
    zero_row = torch.randn(6, 10, generator=g)
    zero_row[3] = 0.0
    square = torch.randn(8, 8, generator=g) * torch.logspace(-1, 0.5, 8)[:, None]
    return [
        ("a 16×32 matrix", 0.02 * torch.randn(16, 32, generator=g)),
        ("a 2×4 matrix whose rounding errors are all negative", negative),
        ("a 6×10 matrix with an all-zero row", zero_row),
        ("an 8×8 matrix with rows of different sizes", square),
        ("a 32×64 bf16 matrix", (0.02 * torch.randn(32, 64, generator=g)).to(torch.bfloat16)),
    ]


@exercise("The error bound", passed="correct on 5 matrices, and every answer is ≤ 0.5: rounding never moves a weight more than half a step.")
def check_max_error_over_scale(fn):
    """``fn(w)``: per-channel quantize ``w``, return ``max |w − ŵ| / scale`` over the rows with a non-zero scale."""
    for case, w in _bound_cases():
        got = _number(_call(fn, w.clone()), case)
        scales, error = _per_channel(w)
        nonzero = scales > 0
        ref = (error.abs()[nonzero] / scales[nonzero, None]).max().item()
        tol = 2e-2 if w.dtype == torch.bfloat16 else 1e-4
        if math.isnan(got) or math.isinf(got):
            raise Failed(
                f"on {case} you got {got}: an all-zero row has scale 0, and 0 / 0 is NaN. "
                "Leave out the rows whose scale is 0 (e.g. error[scales > 0] / scales[scales > 0, None])."
            )
        if abs(got - ref) <= tol:
            continue
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        absmax = w.float().abs().amax(-1)
        safe_absmax = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
        if abs(got - (error / safe[:, None]).max().item()) <= tol:
            raise Failed(
                f"on {case} you took the max of the *signed* error: a weight rounded up has a negative error, "
                "and the largest error can be negative. Take .abs() before .max()."
            )
        if abs(got - error.abs().max().item()) <= tol:
            raise Failed("that is max |w − ŵ| itself; divide each row's error by its scale (the step) to compare with ½.")
        if abs(got - (error.abs() / safe_absmax[:, None]).max().item()) <= 1e-6:
            raise Failed(
                "you divided by the row's absmax; the step between grid points is the *scale* = absmax / 127."
            )
        if w.shape[0] == w.shape[1] and abs(got - (error.abs() / safe[None, :]).max().item()) <= tol:
            raise Failed(
                f"on {case} each column was divided by a row's scale: scales has one entry per *row*, so "
                "broadcast it as scales[:, None] (shape (out, 1))."
            )
        s_t = quant.per_tensor_scale(w)
        err_t = w.float() - quant.dequantize(quant.quantize(w, s_t), s_t)
        if abs(got - (err_t.abs().max() / s_t).item()) <= tol:
            raise Failed(
                f"on {case} you quantized with one scale for the whole matrix; use per-channel scales "
                "(quant.per_channel_scales), one per row."
            )
        if w.dtype == torch.bfloat16 and got > 0.5 + 1e-3:
            raise Failed(
                f"on {case} you got {got:.3f} > 0.5 because the error was computed in bf16: ŵ = q · scale rounded to "
                "bf16 keeps 8 significant bits, an extra error of up to ~half a step for codes near 127. Measure in "
                "fp32: w.float() and quant.dequantize(q, scales) (fp32 by default)."
            )
        if got > 0.5 + 1e-3:
            raise Failed(
                f"on {case} you got {got:.3f} > 0.5, which rounding to the nearest grid point cannot produce: "
                "check that the error and the scale belong to the same row."
            )
        raise Failed(
            f"on {case} expected {ref:.4f}, got {got:.4f}. Hint: quantize with quant.per_channel_scales, dequantize, "
            "then (|w − ŵ| / scales[:, None]).max() over the rows with a non-zero scale."
        )


# ----------------------------------------------------------------------------------------- exercise 2


@exercise("Expected RMS error")
def check_expected_rms_error(fn):
    """``fn(scale)``: the RMS of an error uniform on [−scale/2, scale/2], i.e. ``scale / √12``, for floats and tensors."""
    cases = [("scale = 0.02", 0.02), ("scale = 1.0", 1.0), ("a tensor of scales [0.01, 0.5, 0.0]", torch.tensor([0.01, 0.5, 0.0]))]
    for case, scale in cases:
        got = call(fn, scale.clone() if isinstance(scale, torch.Tensor) else scale)
        s = torch.as_tensor(scale, dtype=torch.float64)
        if isinstance(scale, torch.Tensor):
            if not isinstance(got, torch.Tensor) or got.shape != s.shape:
                raise Failed(f"on {case} return a tensor of the same shape (one prediction per scale); use math on tensors, e.g. scale / 12 ** 0.5.")
            value = got.detach().double()
        else:
            value = torch.tensor(_number(got, case), dtype=torch.float64)
        if torch.allclose(value, s / math.sqrt(12), rtol=1e-5, atol=1e-12):
            continue
        for wrong, hint in [
            (s / 2, "that is the *largest* error, half a step. The RMS of an error spread evenly over [−s/2, s/2] is smaller."),
            (s / math.sqrt(3), "s/√3 is the RMS of a uniform error on [−s, s]; rounding to the nearest point only spans [−s/2, s/2]."),
            (s / 12, "close: the variance of the error is s²/12, so the RMS is its square root, s/√12 — not s/12."),
            (s**2 / 12, "s²/12 is the variance (the mean squared error); the RMS is its square root."),
            (s / math.sqrt(6), "s/√6 is too large: the variance of a uniform error on [−s/2, s/2] is s²/12."),
        ]:
            if torch.allclose(value, wrong, rtol=1e-5, atol=1e-12):
                raise Failed(hint)
        raise Failed(f"on {case} expected scale/√12 ≈ 0.2887·scale. Hint: RMS² = ∫ x² dx / s over [−s/2, s/2] = s²/12.")
    # Show that the prediction is what a real matrix measures.
    g = torch.Generator().manual_seed(202)
    w = 0.02 * torch.randn(256, 512, generator=g)
    scales, error = _per_channel(w)
    measured = error.pow(2).mean().sqrt().item()
    predicted = torch.as_tensor(call(fn, scales.clone())).float().pow(2).mean().sqrt().item()
    return (
        f"scale/√12. On a 256×512 matrix your prediction is {predicted:.3g} and the measured RMS error is "
        f"{measured:.3g} ({measured / predicted:.1%} of it)."
    )


# ----------------------------------------------------------------------------------------- exercise 3


def _ratio_cases() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(203)
    outlier = 0.02 * torch.randn(8, 32, generator=g)
    outlier[2, 5] = 1.0
    sized = 0.02 * torch.randn(16, 64, generator=g) * torch.logspace(-1, 0.5, 16)[:, None]
    zero_row = torch.randn(6, 12, generator=g)
    zero_row[4] = 0.0
    return [
        ("an 8×32 matrix with one outlier", outlier),
        ("a 16×64 matrix with rows of different sizes", sized),
        ("a 6×12 matrix with an all-zero row", zero_row),
        ("an 8×32 bf16 matrix with one outlier", outlier.to(torch.bfloat16)),
    ]


def _fro(w: torch.Tensor, scales: torch.Tensor, codes_only: bool = False) -> float:
    q = quant.quantize(w, scales)
    w_hat = q.float() if codes_only else quant.dequantize(q, scales)
    return (w.float() - w_hat).norm().item()


@exercise("Per-tensor vs per-channel error", passed="correct on 4 matrices (outlier, zero row and bf16 included).")
def check_error_ratio(fn):
    """``fn(w)``: ‖W − Ŵ_per-tensor‖ / ‖W − Ŵ_per-channel‖ (Frobenius norms, or equivalently RMS errors)."""
    for case, w in _ratio_cases():
        got = _number(_call(fn, w.clone()), case)
        pt, pc = quant.per_tensor_scale(w), quant.per_channel_scales(w)
        ref = _fro(w, pt) / _fro(w, pc)
        if math.isnan(got) or math.isinf(got):
            raise Failed(
                f"on {case} you got {got}: the all-zero row has a per-channel scale of 0 and w / 0 = NaN. "
                "quant.quantize handles a zero scale (those codes are 0); or guard with torch.where(scales == 0, …)."
            )
        if abs(got - ref) <= 1e-2 * ref:
            continue
        if abs(got - 1 / ref) <= 1e-2 / ref:
            raise Failed(
                "your ratio is upside down (per-channel / per-tensor, below 1); the question is how many times "
                "*larger* the per-tensor error is: per-tensor error / per-channel error."
            )
        if abs(got - 1.0) <= 1e-3:
            raise Failed(
                "you got 1: both errors come from the same scales. Quantize once with quant.per_tensor_scale(w) "
                "and once with quant.per_channel_scales(w)."
            )
        if abs(got - _fro(w, pt, codes_only=True) / _fro(w, pc, codes_only=True)) <= 1e-2 * abs(got):
            raise Failed(
                "you compared W with the int8 codes; dequantize first (codes × scale) so both sides are weights."
            )
        raise Failed(
            f"on {case} expected {ref:.3g}, got {got:.3g}. Hint: for each scheme, Ŵ = dequantize(quantize(W, s), s); "
            "then (W − Ŵ).norm() for per-tensor divided by the same for per-channel."
        )


# ------------------------------------------------------------------------------------------------- quiz

QUIZ = Quiz("02", [
    Question("Rounding to the nearest code moves a weight by at most…",
             ("one step", "half a step", "step / √12"), "b",
             "The nearest grid point is never more than halfway to the next one.",
             {"a": "a whole step away there is a closer grid point (the one you started from).",
              "c": "step/√12 is the RMS of the error, not its maximum."}),
    Question("A row with step s has many weights spread over its range. Its RMS rounding error is about…",
             ("s / 2", "s / √12", "s / 12"), "b",
             "The error is spread evenly over [−s/2, s/2]; the variance of that is s²/12, the RMS its root.",
             {"a": "s/2 is the largest error, not the typical one.",
              "c": "s²/12 is the variance; the RMS is its square root, s/√12."}),
    Question("An outlier doubles a row's absmax. What happens to the error of the row's other weights?",
             ("nothing: they did not change", "it roughly doubles: the step doubled", "it halves"), "b",
             "The step is absmax / 127 for the whole row, so every weight of the row is rounded twice as coarsely.",
             {"a": "their values did not change, but the grid they are rounded to did.",
              "c": "a larger absmax means a larger step, so a larger error."}),
])
