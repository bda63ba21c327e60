"""Checks for the exercises of notebook 01 (scale computation).

Each check runs the learner's function on several matrices — odd shapes, a square one (so a wrong ``dim``
cannot hide behind a wrong shape), an all-zero row, a row whose largest magnitude is negative, and bf16 —
compares it with the reference in `w8a16.quant`, and turns the typical mistakes into hints.
"""

from __future__ import annotations

import torch

from ... import quant
from ._core import Failed, call, exercise

__all__ = ["check_per_channel_scales", "check_per_group_scales", "check_quantize_row"]


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
