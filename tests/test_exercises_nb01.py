"""Exercise checks of notebook 01: the reference passes, typical mistakes get their specific hint."""

import pytest
import torch
from exercise_helpers import fails_with, stub

from w8a16.course.exercises import nb01
from w8a16.course.exercises._core import NOT_ATTEMPTED, PASSED

# ---------------------------------------------------------------------------------------- per-channel scales


def test_per_channel_reference_passes():
    verdict = nb01.check_per_channel_scales(lambda w: w.float().abs().amax(dim=-1) / 127, quiet=True)
    assert verdict and verdict.status == PASSED


def test_per_channel_bf16_result_is_accepted():
    assert nb01.check_per_channel_scales(lambda w: w.abs().amax(dim=-1) / 127, quiet=True)


@pytest.mark.parametrize(
    "wrong, hint",
    [
        (lambda w: w.abs().amax(-1) / 128, "divide by 127, not 128"),
        (lambda w: w.amax(-1) / 127, "largest *magnitude*"),
        (lambda w: w.abs().amax() / 127, "per-tensor scale"),
        (lambda w: w.abs().amax(0) / 127, "one per column"),
        (lambda w: w.abs().amax(-1, keepdim=True) / 127, "keepdim"),
        (lambda w: w.abs().amax().expand(w.shape[0]) / 127, "same scale"),
        (lambda w: w.abs().amax(-1), "divide them by 127"),
        (lambda w: w.float().abs().amax(-1).numpy() / 127, "torch.Tensor"),
    ],
)
def test_per_channel_typical_mistakes(wrong, hint):
    fails_with(nb01.check_per_channel_scales, wrong, hint)


def test_per_channel_square_matrix_catches_wrong_dim():
    """On a square matrix a column reduction has the right shape; the values must still be caught."""

    def columns_when_square(w):
        dim = 0 if w.shape[0] == w.shape[1] else -1
        return w.float().abs().amax(dim) / 127

    fails_with(nb01.check_per_channel_scales, columns_when_square, "per *column*")


def test_per_channelstub_and_crash():
    assert nb01.check_per_channel_scales(stub, quiet=True).status == NOT_ATTEMPTED
    fails_with(nb01.check_per_channel_scales, lambda w: None, "did you forget `return`?")
    fails_with(nb01.check_per_channel_scales, lambda w: w.nope(), "your function raised AttributeError")


def test_check_prints_one_line(capsys):
    nb01.check_per_channel_scales(stub)
    assert capsys.readouterr().out.startswith("○ Per-channel scales: not attempted yet")


# ------------------------------------------------------------------------------------------ per-group scales


def _groups(w, g):
    return w.reshape(w.shape[0], -1, g)


def test_per_group_reference_passes():
    assert nb01.check_per_group_scales(lambda w, g: _groups(w.float(), g).abs().amax(-1) / 127, quiet=True)


@pytest.mark.parametrize(
    "wrong, hint",
    [
        (lambda w, g: w.reshape(w.shape[0], g, -1).abs().amax(1) / 127, "strided"),
        (lambda w, g: w.reshape(w.shape[0], g, -1).abs().amax(-1) / 127, "groups *of* group_size"),
        (lambda w, g: w.reshape(-1, g).abs().amax(-1) / 127, "shape is"),
        (lambda w, g: w.abs().amax(-1) / 127, "that is per-channel"),
        (lambda w, g: _groups(w, g).amax(-1) / 127, "largest *value*"),
        (lambda w, g: _groups(w, g).abs().amax(-1) / 128, "not 128"),
    ],
)
def test_per_group_typical_mistakes(wrong, hint):
    fails_with(nb01.check_per_group_scales, wrong, hint)


def test_per_groupstub_and_crash():
    assert nb01.check_per_group_scales(stub, quiet=True).status == NOT_ATTEMPTED
    fails_with(nb01.check_per_group_scales, lambda w, g: w.reshape(3, 3, 3), "your function raised RuntimeError")


# ----------------------------------------------------------------------------------------------- quantize row


def _reference_row(row, scale):
    scale = torch.as_tensor(scale, dtype=torch.float32)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.round(row.float() / safe).clamp(-127, 127)
    return torch.where(scale == 0, torch.zeros_like(q), q).to(torch.int8)


def test_quantize_row_reference_passes():
    assert nb01.check_quantize_row(_reference_row, quiet=True)


@pytest.mark.parametrize(
    "wrong, hint",
    [
        (lambda r, s: torch.floor(r.float() / s.float()).clamp(-127, 127).to(torch.int8), "floor"),
        (lambda r, s: torch.ceil(r.float() / s.float()).clamp(-127, 127).to(torch.int8), "ceil"),
        (lambda r, s: (r.float() / s.float()).to(torch.int8), "truncated towards zero"),
        (lambda r, s: torch.round(r.float() / s.float()).to(torch.int8), "wrapped around"),
        (lambda r, s: torch.round(r.float() / s.float()).clamp(-128, 127).to(torch.int8), "[-128, 127]"),
        (lambda r, s: torch.round(r.float() / s.float()).clamp(-127, 127), "return .to(torch.int8)"),
        (lambda r, s: torch.round(r / s).clamp(-127, 127).to(torch.int8), "Compute in fp32"),
    ],
)
def test_quantize_row_typical_mistakes(wrong, hint):
    fails_with(nb01.check_quantize_row, wrong, hint)


def test_quantize_row_wider_integer_dtype():
    fails_with(nb01.check_quantize_row, lambda r, s: torch.round(r.float() / s.float()).clamp(-127, 127).short(), "int16")


def test_quantize_row_zero_scale_nan():
    def nan_codes(r, s):
        return torch.full_like(r, float("nan")) if s == 0 else _reference_row(r, s)

    fails_with(nb01.check_quantize_row, nan_codes, "0 / 0")


def test_quantize_rowstub_and_crash():
    assert nb01.check_quantize_row(stub, quiet=True).status == NOT_ATTEMPTED
    fails_with(nb01.check_quantize_row, lambda r, s: r @ s, "your function raised RuntimeError")


# ------------------------------------------------------------------------------------ asymmetric (zero point)


def test_asymmetric_reference_passes_and_round_trips():
    assert nb01.check_asymmetric_params(nb01.asymmetric_params, quiet=True)
    x = torch.relu(torch.randn(200))
    scale, zp = nb01.asymmetric_params(x)
    q = nb01.asymmetric_quantize(x, scale, zp)
    assert q.dtype == torch.int8 and int(q.min()) == -128
    assert nb01.asymmetric_dequantize(q, scale, zp)[x == 0].abs().max() == 0  # 0.0 comes back exactly
    assert (nb01.asymmetric_dequantize(q, scale, zp) - x).abs().max() <= scale / 2 + 1e-7


def _lo_hi(x):
    return min(x.float().min().item(), 0.0), max(x.float().max().item(), 0.0)


def _with_zp(zp_of):
    def fn(x):
        scale, _ = nb01.asymmetric_params(x)
        lo, _ = _lo_hi(x)
        return scale, zp_of(lo, scale.item())
    return fn


def _without_zero(x):
    lo, hi = x.float().min().item(), x.float().max().item()
    scale = (hi - lo) / 255
    return scale, round(-128 - lo / scale)


@pytest.mark.parametrize(
    "wrong, hint",
    [
        (lambda x: ((_lo_hi(x)[1] - _lo_hi(x)[0]) / 256, 0), "divide by 255"),
        (lambda x: (x.float().abs().max() / 127, 0), "that is the symmetric scale"),
        (_without_zero, "your range leaves out 0"),
        (_with_zp(lambda lo, s: -128 - lo / s), "not an integer: round it"),
        (_with_zp(lambda lo, s: round(-128 + lo / s)), "wrong sign"),
        (_with_zp(lambda lo, s: round(-lo / s)), "unsigned grid"),
        (lambda x: nb01.asymmetric_params(x)[0], "return two values"),
        (lambda x: None, "did you forget `return`?"),
    ],
    ids=["by-256", "symmetric", "range-without-zero", "float-zero-point", "sign", "unsigned", "one-value", "no-return"],
)
def test_asymmetric_typical_mistakes(wrong, hint):
    fails_with(nb01.check_asymmetric_params, wrong, hint)
