"""Checks for the exercises of notebook 01 (scale computation).

Each check runs the learner's function on several matrices — odd shapes, a square one (so a wrong ``dim``
cannot hide behind a wrong shape), an all-zero row, a row whose largest magnitude is negative, and bf16 —
compares it with the reference in `w8a16.quant`, and turns the typical mistakes into hints.
"""

from __future__ import annotations

import torch

from ... import quant
from .quiz import Question, Quiz
from ._core import Failed, call, exercise

__all__ = ["QUIZ", "asymmetric_dequantize", "asymmetric_params", "asymmetric_quantize", "check_asymmetric_params",
           "check_per_channel_scales", "check_per_group_scales", "check_quantize_row"]


# ------------------------------------------------------------------------------------------------ inputs


def _matrices() -> list[tuple[str, torch.Tensor]]:
    """Named test matrices, the same on every run."""
    g = torch.Generator().manual_seed(101)
    small = torch.randn(4, 6, generator=g)
    negative = torch.randn(3, 5, generator=g)
    negative[1] = -negative[1].abs()
    negative[1, 2] = -3.0  # the largest magnitude of this row is a negative number
    zero_row = torch.randn(5, 8, generator=g)
    zero_row[2] = 0.0
    square = torch.randn(6, 6, generator=g) * torch.linspace(0.1, 2.0, 6)[:, None]  # rows of different sizes
    bf16 = (torch.randn(8, 16, generator=g) * 0.02).to(torch.bfloat16)
    return [
        ("a 4×6 matrix", small),
        ("a 3×5 matrix whose row 1 has a negative maximum", negative),
        ("a 5×8 matrix with an all-zero row", zero_row),
        ("a 6×6 matrix", square),
        ("an 8×16 bf16 matrix", bf16),
    ]


def _close(got: torch.Tensor, ref: torch.Tensor, like: torch.Tensor) -> bool:
    """Equal up to the precision of the input dtype (bf16 keeps ~3 significant digits)."""
    rtol = 1e-2 if like.dtype in (torch.bfloat16, torch.float16) else 1e-5
    return got.shape == ref.shape and torch.allclose(got.detach().float(), ref.float(), rtol=rtol, atol=1e-12)


def _as_tensor(got: object, what: str) -> torch.Tensor:
    if not isinstance(got, torch.Tensor):
        raise Failed(f"your function returned a {type(got).__name__}; return a torch.Tensor of {what}.")
    return got


def _finite(got: torch.Tensor, case: str, zero_row_hint: bool = True) -> None:
    if got.is_floating_point() and not torch.isfinite(got).all():
        hint = (
            " An all-zero row has absmax 0: 0 / 0 is NaN. Make sure nothing divides by the absmax."
            if zero_row_hint
            else ""
        )
        raise Failed(f"on {case} your result contains NaN or Inf.{hint}")


# ----------------------------------------------------------------------------------------- exercise 1


@exercise("Per-channel scales", passed="correct on 5 matrices (square, zero row, negative maximum and bf16 included).")
def check_per_channel_scales(fn):
    """``fn(w)`` must return ``|w|.max(dim=-1) / 127``, one scale per output row, shape ``(out,)``."""
    for case, w in _matrices():
        got = _as_tensor(call(fn, w.clone()), "scales")
        ref = quant.per_channel_scales(w)
        _finite(got, case)
        out_features, in_features = w.shape
        if got.numel() == 1:
            raise Failed(
                f"on {case} you returned one number for the whole matrix — that is a per-tensor scale. "
                "Per-channel means one scale per output row: take the max over each row, .amax(dim=-1)."
            )
        if tuple(got.shape) == (out_features, 1):
            raise Failed(
                f"on {case} your scales have shape {tuple(got.shape)}; return shape ({out_features},) "
                "— drop keepdim=True (or .squeeze(-1))."
            )
        if tuple(got.shape) == (in_features,) and in_features != out_features:
            raise Failed(
                f"on {case} you returned {in_features} scales, one per column; W is (out, in) and each "
                "output row needs its own scale: reduce over the last dim, dim=-1 (not dim=0)."
            )
        if tuple(got.shape) != (out_features,):
            raise Failed(f"on {case} expected shape ({out_features},), one scale per row; got {tuple(got.shape)}.")
        if _close(got, ref, w):
            continue
        wf = w.float()
        if _close(got, wf.abs().amax(-1) / 128, w):
            raise Failed(
                "your scales are too small — the symmetric int8 grid goes to 127, so divide by 127, not 128."
            )
        if _close(got, wf.amax(-1) / 127, w) or _close(got, wf.amax(-1).abs() / 127, w):
            raise Failed(
                f"on {case} you took the largest *value*, not the largest *magnitude*: a row whose most "
                "extreme weight is negative gets a scale that is too small. Use w.abs().amax(dim=-1)."
            )
        if _close(got, wf.abs().amax(-1), w):
            raise Failed("those are the row maxima |w|.max — divide them by 127 so the largest weight maps to ±127.")
        if _close(got, wf.abs().amax(0) / 127, w):
            raise Failed(
                f"on {case} you computed one scale per *column* (dim=0). Rows are the output channels: "
                "reduce over dim=-1."
            )
        if _close(got, wf.abs().amax().expand(out_features) / 127, w):
            raise Failed(
                f"on {case} every row got the same scale — the per-tensor absmax. Take the max of each row "
                "separately: w.abs().amax(dim=-1) / 127."
            )
        raise Failed(f"on {case} your scales differ from |w|.max over each row / 127. Hint: w.abs().amax(dim=-1) / 127.")


# ----------------------------------------------------------------------------------------- exercise 2


def _group_cases() -> list[tuple[str, torch.Tensor, int]]:
    mats = dict((k, v) for k, v in _matrices())
    g = torch.Generator().manual_seed(102)
    wide = torch.randn(3, 12, generator=g)
    wide[0, 7] = -6.0  # an outlier in the middle group of row 0
    return [
        ("a 4×6 matrix, group_size=3", mats["a 4×6 matrix"], 3),
        ("a 3×12 matrix, group_size=4", wide, 4),
        ("a 5×8 matrix with an all-zero row, group_size=2", mats["a 5×8 matrix with an all-zero row"], 2),
        ("an 8×16 bf16 matrix, group_size=8", mats["an 8×16 bf16 matrix"], 8),
        ("a 6×6 matrix, group_size=6 (one group per row)", mats["a 6×6 matrix"], 6),
        ("a 3×12 matrix, group_size=1", wide, 1),
    ]


@exercise("Per-group scales", passed="correct on 6 cases (group_size 1, 2, 3, 4, 6 and 8; zero row and bf16 included).")
def check_per_group_scales(fn):
    """``fn(w, group_size)`` must return shape ``(out, in // group_size)``: absmax/127 of each run of inputs."""
    for case, w, group_size in _group_cases():
        got = _as_tensor(call(fn, w.clone(), group_size), "scales")
        ref = quant.per_group_scales(w, group_size)
        _finite(got, case)
        out_features, in_features = w.shape
        n_groups = in_features // group_size
        wf = w.float()
        if tuple(got.shape) != tuple(ref.shape):
            if got.numel() == ref.numel() and _close(got.reshape(ref.shape), ref, w):
                raise Failed(
                    f"on {case} your values are right but the shape is {tuple(got.shape)}; return "
                    f"({out_features}, {n_groups}) = (out, in // group_size), one row of group scales per output row."
                )
            if tuple(got.shape) == (out_features,) or tuple(got.shape) == (out_features, 1):
                raise Failed(
                    f"on {case} you returned one scale per row — that is per-channel. Split each row into "
                    f"runs of group_size inputs first: w.reshape(out, in // group_size, group_size)."
                )
            if tuple(got.shape) == (out_features, group_size):
                raise Failed(
                    f"on {case} you made group_size groups per row instead of groups *of* group_size inputs: "
                    "reshape to (out, in // group_size, group_size) and take the max over the last dim."
                )
            raise Failed(f"on {case} expected shape (out, in // group_size) = {tuple(ref.shape)}, got {tuple(got.shape)}.")
        if _close(got, ref, w):
            continue
        if _close(got, wf.reshape(out_features, n_groups, group_size).abs().amax(-1) / 128, w):
            raise Failed("your scales are too small — the symmetric int8 grid goes to 127, so divide by 127, not 128.")
        if _close(got, wf.reshape(out_features, n_groups, group_size).amax(-1) / 127, w):
            raise Failed(
                f"on {case} you took the largest *value* of each group, not the largest *magnitude*; a group whose "
                "most extreme weight is negative gets a scale that is too small. Use .abs() before .amax()."
            )
        if _close(got, wf.reshape(out_features, group_size, n_groups).abs().amax(1) / 127, w):
            raise Failed(
                f"on {case} your groups are strided (columns j, j + n, j + 2n, …). A group is group_size "
                "*consecutive* inputs: reshape(out, in // group_size, group_size) and reduce the last dim."
            )
        if _close(got, wf.abs().amax(-1, keepdim=True).expand_as(ref) / 127, w):
            raise Failed(
                f"on {case} every group of a row got the row's scale — that is per-channel. Take the max of each "
                "group separately."
            )
        raise Failed(
            f"on {case} your scales differ from the reference. Hint: "
            "w.reshape(out, in // group_size, group_size).abs().amax(dim=-1) / 127."
        )


# ----------------------------------------------------------------------------------------- exercise 3


def _row_cases() -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(103)
    row = torch.randn(16, generator=g)
    odd = torch.randn(7, generator=g)
    tight = torch.randn(32, generator=g)
    tight[0], tight[1] = 3.0, -3.0  # the largest magnitude on both sides, so clamping matters at +127 and -127
    bf16 = (torch.randn(256, generator=g) * 0.02).to(torch.bfloat16)
    bf16_scale = (bf16.float().abs().amax() / 127).to(torch.bfloat16)
    return [
        ("a row of 16 weights with scale = absmax / 127", row, quant.per_tensor_scale(row)),
        ("a row of 7 weights", odd, quant.per_tensor_scale(odd)),
        (
            "a row whose scale is 10% smaller than absmax / 127 (some weights fall beyond ±127 steps)",
            tight,
            quant.per_tensor_scale(tight) * 0.9,
        ),
        ("an all-zero row (scale 0)", torch.zeros(5), torch.tensor(0.0)),
        ("a bf16 row of 256 weights with a bf16 scale", bf16, bf16_scale),
    ]


@exercise("Quantize a row", passed="correct on 5 rows (clamping, zero row and bf16 included).")
def check_quantize_row(fn):
    """``fn(row, scale)`` must return ``clamp(round(row / scale), -127, 127)`` as int8 (0 where scale is 0)."""
    for case, row, scale in _row_cases():
        got = _as_tensor(call(fn, row.clone(), scale.clone()), "int8 codes")
        ref = quant.quantize(row[None, :], scale)[0]
        if tuple(got.shape) != tuple(ref.shape):
            raise Failed(f"on {case} expected shape {tuple(ref.shape)} (one code per weight), got {tuple(got.shape)}.")
        if got.is_floating_point() and torch.isnan(got).any():
            raise Failed(
                f"on {case} your codes contain NaN: with scale 0, row / scale is 0 / 0. "
                "An all-zero row should give all-zero codes (torch.where(scale == 0, 0, …))."
            )
        values = got.detach().float()
        if torch.equal(values, ref.float()):
            if got.dtype != torch.int8:
                raise Failed(
                    f"right values, but your codes are {got.dtype}; the point is to store one byte per weight: "
                    "return .to(torch.int8)."
                )
            continue
        x = row.float() / (scale.float() if float(scale) != 0 else torch.tensor(1.0))
        if values.abs().max() > 127 and torch.equal(values, torch.round(x)):
            raise Failed(
                f"on {case} some codes are beyond ±127: when the scale is a little too small, row / scale can "
                "exceed 127. Clamp to [-127, 127] before casting to int8."
            )
        if torch.equal(values, torch.round(x).to(torch.int8).float()) and not torch.equal(values, ref.float()):
            raise Failed(
                f"on {case} some large weights came back with the wrong sign: round(row / scale) went past 127 "
                "and the cast to int8 wrapped around (128 → -128). Clamp to [-127, 127] before .to(torch.int8)."
            )
        if values.min() < -127 and torch.equal(values, torch.round(x).clamp(-128, 127)):
            raise Failed("you clamped to [-128, 127]; the symmetric grid stops at -127 so that +w and -w get mirror codes.")
        if torch.equal(values, torch.floor(x).clamp(-127, 127)):
            raise Failed(
                "you rounded *down* (floor): every weight moves towards -∞, so the error is biased. "
                "Use torch.round, which goes to the nearest integer."
            )
        if torch.equal(values, torch.trunc(x).clamp(-127, 127)) or torch.equal(values, x.to(torch.int8).float()):
            raise Failed(
                "you truncated towards zero (casting to int8 drops the decimals, it does not round): "
                "round first, torch.round(row / scale), then clamp and cast."
            )
        if torch.equal(values, torch.ceil(x).clamp(-127, 127)):
            raise Failed("you rounded *up* (ceil); use torch.round, which goes to the nearest integer.")
        if row.dtype == torch.bfloat16 and (values - ref.float()).abs().max() <= 1:
            raise Failed(
                f"on {case} a few codes are off by one: in bf16, row / scale keeps only 8 significant bits, so a "
                "quotient like 100.4 becomes 100.5 before round() sees it. Compute in fp32: "
                "row.float() / scale.float()."
            )
        if float(scale) == 0:
            raise Failed(
                f"on {case} the codes should all be 0: with scale 0, row / scale is 0 / 0 = NaN. "
                "Return zeros where the scale is 0."
            )
        raise Failed(
            f"on {case} your codes differ from the reference. "
            "Hint: divide in fp32 (row.float() / scale.float()), round to the nearest integer, clamp to "
            "[-127, 127], cast to int8."
        )


# ----------------------------------------------------------------------------------------- exercise 4


def asymmetric_params(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Reference: ``(scale, zero_point)`` of asymmetric int8 over [−128, 127] for the range of ``x``.

    The range is widened to include 0 (so 0.0 gets a code of its own, exactly); ``scale = (hi − lo) / 255``
    spreads the 256 codes over it, and the zero point is the (integer) code that stands for 0.0.
    """
    lo, hi = min(float(x.float().min()), 0.0), max(float(x.float().max()), 0.0)
    scale = torch.tensor((hi - lo) / 255)
    zero_point = int(min(max(round(-128 - lo / scale.item()), -128), 127)) if scale > 0 else 0
    return scale, zero_point


def asymmetric_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: int) -> torch.Tensor:
    """Codes ``clamp(round(x / scale) + zero_point, −128, 127)`` as int8."""
    return (torch.round(x.float() / scale) + zero_point).clamp(-128, 127).to(torch.int8)


def asymmetric_dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: int) -> torch.Tensor:
    """``(q − zero_point) · scale`` in fp32."""
    return (q.float() - zero_point) * scale


def _asym_cases() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(104)
    relu = torch.relu(torch.randn(64, generator=g))
    skewed = torch.rand(48, generator=g) * 2.1 - 0.1  # mostly positive: [-0.1, 2.0]
    positive = torch.rand(32, generator=g) * 1.5 + 0.5  # [0.5, 2.0]: 0 is outside the data
    bf16 = (torch.randn(40, generator=g) * 0.5 - 0.3).to(torch.bfloat16)
    return [
        ("64 post-ReLU activations (all ≥ 0)", relu),
        ("a skewed row in [−0.1, 2.0]", skewed),
        ("a row in [0.5, 2.0] (0 is not among the values)", positive),
        ("a bf16 row centred at −0.3", bf16),
    ]


def _number(v: object, what: str) -> float:
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise Failed(f"your {what} has {v.numel()} values; for one row return one number.")
        return float(v.detach().float())
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    raise Failed(f"your {what} is a {type(v).__name__}; return a number.")


@exercise("Asymmetric scale and zero point", passed="correct on 4 rows (post-ReLU, skewed, 0 outside the data, bf16).")
def check_asymmetric_params(fn):
    """``fn(x)`` -> ``(scale, zero_point)``: ``scale = (hi − lo) / 255`` over a range that includes 0, and
    ``zero_point = round(−128 − lo / scale)``, an integer in [−128, 127]."""
    for case, x in _asym_cases():
        got = call(fn, x.clone())
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise Failed("return two values, a tuple (scale, zero_point).")
        scale, zp = _number(got[0], "scale"), got[1]
        ref_scale, ref_zp = asymmetric_params(x)
        lo, hi = float(x.float().min()), float(x.float().max())
        rs = ref_scale.item()
        close = lambda a, b: abs(a - b) <= 1e-5 * abs(b) + 1e-12  # noqa: E731
        if not close(scale, rs):
            if close(scale, (max(hi, 0) - min(lo, 0)) / 256):
                raise Failed(f"on {case} your scale is (max − min) / 256: 256 codes have 255 steps between them — divide by 255.")
            if close(scale, max(abs(lo), abs(hi)) / 127):
                raise Failed(
                    f"on {case} that is the symmetric scale, max|x| / 127. Asymmetric spreads the codes over "
                    "[min, max] only: (max − min) / 255."
                )
            if close(scale, (hi - lo) / 255):
                raise Failed(
                    f"on {case} your range leaves out 0: widen it to include 0 (lo = min(x.min(), 0), "
                    "hi = max(x.max(), 0)), so that 0.0 — padding, a ReLU's zeros — gets an exact code."
                )
            raise Failed(f"on {case} expected scale {rs:.6g}, got {scale:.6g}: (max − min) / 255 over a range that includes 0.")
        zp_value = _number(zp, "zero point")
        if isinstance(zp, torch.Tensor) and zp.is_floating_point() or isinstance(zp, float):
            if zp_value != round(zp_value) or zp_value != ref_zp:
                raise Failed(
                    f"on {case} your zero point is {zp_value:.6g}, not an integer: round it (it is a code), so that "
                    "0.0 is represented exactly."
                )
        if zp_value == ref_zp:
            continue
        lo0 = min(lo, 0.0)
        if zp_value == round(-128 + lo0 / rs) or zp_value == round(128 + lo0 / rs) or zp_value == -round(-128 - lo0 / rs):
            raise Failed(
                f"on {case} your zero point has the wrong sign somewhere: it is the code of 0.0, so that lo maps to "
                "−128: zero_point = round(−128 − lo / scale)."
            )
        if zp_value == round(-lo0 / rs):
            raise Failed(
                f"on {case} that zero point is for an unsigned grid [0, 255]; on int8's [−128, 127] subtract 128: "
                "round(−128 − lo / scale)."
            )
        raise Failed(f"on {case} expected zero point {ref_zp}, got {zp_value:g}: round(−128 − lo / scale), lo = min(x.min(), 0).")


# ------------------------------------------------------------------------------------------------- quiz

QUIZ = Quiz("01", [
    Question("A row's largest |w| is 0.5. With symmetric int8 (absmax / 127), what is its scale?",
             ("0.5 / 128", "0.5 / 127", "0.5 / 255"), "b",
             "The largest magnitude lands on code 127, so scale = 0.5 / 127 and that weight comes back exactly.",
             {"a": "the symmetric grid stops at ±127 (−128 is left out so that +w and −w get mirror codes).",
              "c": "255 is the number of steps of an asymmetric grid over [min, max], not of the symmetric one."}),
    Question("One weight of 1.0 sits in a matrix of weights around 0.02. Which scheme coarsens the fewest other weights?",
             ("per-tensor", "per-channel", "per-group"), "c",
             "Only the weights of the outlier's group share its large step; per-channel spreads it over the whole row.",
             {"a": "per-tensor gives every weight of the matrix the outlier's step.",
              "b": "per-channel confines it to one row — better, but the group is smaller still."}),
    Question("Post-ReLU activations are all ≥ 0. How many of the symmetric int8 codes can they use?",
             ("all 255", "about half: 0 … 127", "only one"), "b",
             "Codes −127 … −1 stand for negative values that never occur; an asymmetric grid (a zero point) puts all "
             "256 codes on [0, max].",
             {"a": "the negative half of the grid is wasted on values that are never negative.",
              "c": "they use every code from 0 to 127 — half the grid, not one code."}),
])
