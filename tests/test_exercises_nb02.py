"""Exercise checks of notebook 02: the reference passes, typical mistakes get their specific hint."""

import math

import pytest
import torch
from exercise_helpers import fails_with, stub

from w8a16 import quant
from w8a16.course.exercises import nb02
from w8a16.course.exercises._core import NOT_ATTEMPTED


def _error(w, scales=None, dtype=torch.float32):
    scales = quant.per_channel_scales(w) if scales is None else scales
    return scales, w.to(dtype) - quant.dequantize(quant.quantize(w, scales), scales, dtype)


# ------------------------------------------------------------------------------------------------ error bound


def _bound_reference(w):
    scales, err = _error(w)
    keep = scales > 0
    return (err[keep].abs() / scales[keep, None]).max().item()


def test_bound_reference_passes():
    assert nb02.check_max_error_over_scale(_bound_reference, quiet=True)


def test_bound_accepts_a_tensor_answer():
    assert nb02.check_max_error_over_scale(lambda w: torch.tensor(_bound_reference(w)), quiet=True)


def _no_zero_row_guard(w):
    scales, err = _error(w)
    return (err.abs() / scales[:, None]).max().item()


def _no_abs(w):
    scales, err = _error(w)
    keep = scales > 0
    return (err[keep] / scales[keep, None]).max().item()


def _by_absmax(w):
    scales, err = _error(w)
    keep = scales > 0
    return (err[keep].abs() / (127 * scales[keep, None])).max().item()


def _scales_on_columns(w):
    scales, err = _error(w)
    return (err.abs() / scales).max().item()


def _in_bf16(w):
    scales = quant.per_channel_scales(w).to(w.dtype)
    err = w - quant.dequantize(quant.quantize(w, scales), scales, w.dtype)
    keep = scales > 0
    return (err[keep].abs() / scales[keep, None]).max().item()


def _per_tensor(w):
    scale = quant.per_tensor_scale(w)
    _, err = _error(w, scale)
    return (err.abs().max() / scale).item()


@pytest.mark.parametrize(
    "wrong, hint",
    [
        (_no_zero_row_guard, "0 / 0 is NaN"),
        (_no_abs, "Take .abs() before .max()"),
        (_by_absmax, "you divided by the row's absmax"),
        (_scales_on_columns, "scales[:, None]"),
        (_in_bf16, "computed in bf16"),
        (_per_tensor, "one scale for the whole matrix"),
        (lambda w: _error(w)[1].abs().max().item(), "divide each row's error by its scale"),
        (lambda w: _error(w)[1].abs().amax(-1), "return one number"),
    ],
)
def test_bound_typical_mistakes(wrong, hint):
    fails_with(nb02.check_max_error_over_scale, wrong, hint)


def test_boundstub_and_crash():
    assert nb02.check_max_error_over_scale(stub, quiet=True).status == NOT_ATTEMPTED
    fails_with(nb02.check_max_error_over_scale, lambda w: 1 / 0, "your function raised ZeroDivisionError")


# --------------------------------------------------------------------------------------------- expected RMS


def test_rms_reference_passes_and_reports_the_measurement():
    verdict = nb02.check_expected_rms_error(lambda s: s / math.sqrt(12), quiet=True)
    assert verdict
    assert "measured RMS error" in verdict.message


def test_rms_equivalent_forms_pass():
    assert nb02.check_expected_rms_error(lambda s: s / (2 * 3**0.5), quiet=True)


@pytest.mark.parametrize(
    "wrong, hint",
    [
        (lambda s: s / 2, "*largest* error"),
        (lambda s: s / math.sqrt(3), "[−s, s]"),
        (lambda s: s / 12, "not s/12"),
        (lambda s: s**2 / 12, "is the variance"),
        (lambda s: s * 0.25, "expected scale/√12"),
    ],
)
def test_rms_typical_mistakes(wrong, hint):
    fails_with(nb02.check_expected_rms_error, wrong, hint)


def test_rms_must_work_on_tensors():
    fails_with(nb02.check_expected_rms_error, lambda s: float(s) / math.sqrt(12), "your function raised")
    fails_with(nb02.check_expected_rms_error, lambda s: torch.tensor(0.1) if isinstance(s, torch.Tensor) else s / 12**0.5,
                "same shape")


def test_rmsstub():
    assert nb02.check_expected_rms_error(stub, quiet=True).status == NOT_ATTEMPTED


# --------------------------------------------------------------------------------------------- error ratio


def _norm(w, scales, codes_only=False):
    q = quant.quantize(w, scales)
    return (w.float() - (q.float() if codes_only else quant.dequantize(q, scales))).norm()


def _ratio_reference(w):
    return (_norm(w, quant.per_tensor_scale(w)) / _norm(w, quant.per_channel_scales(w))).item()


def _manual_quantize_norm(w, scales):
    s = quant.expand_scales(scales, w.shape)
    return (w.float() - torch.round(w.float() / s) * s).norm()


def test_ratio_reference_passes():
    assert nb02.check_error_ratio(_ratio_reference, quiet=True)


def test_ratio_rms_form_passes():
    def rms(w):
        f = lambda s: (w.float() - quant.dequantize(quant.quantize(w, s), s)).pow(2).mean().sqrt()
        return f(quant.per_tensor_scale(w)) / f(quant.per_channel_scales(w))

    assert nb02.check_error_ratio(rms, quiet=True)


@pytest.mark.parametrize(
    "wrong, hint",
    [
        (lambda w: 1 / _ratio_reference(w), "upside down"),
        (lambda w: _norm(w, quant.per_channel_scales(w)) / _norm(w, quant.per_channel_scales(w)), "same scales"),
        (
            lambda w: _manual_quantize_norm(w, quant.per_tensor_scale(w)) / _manual_quantize_norm(w, quant.per_channel_scales(w)),
            "w / 0 = NaN",
        ),
        (
            lambda w: _norm(w, quant.per_tensor_scale(w), True) / _norm(w, quant.per_channel_scales(w), True),
            "dequantize first",
        ),
        (lambda w: 2.0, "expected"),
    ],
)
def test_ratio_typical_mistakes(wrong, hint):
    fails_with(nb02.check_error_ratio, wrong, hint)


def test_ratiostub_and_crash():
    assert nb02.check_error_ratio(stub, quiet=True).status == NOT_ATTEMPTED
    fails_with(nb02.check_error_ratio, lambda w: w.missing, "your function raised AttributeError")
    fails_with(nb02.check_error_ratio, lambda w: "3", "return a number")
