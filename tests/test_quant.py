"""The functional core against plain reference formulas."""

import math

import pytest
import torch

from w8a16 import quant

SHAPES = [(1, 1), (4, 8), (7, 13), (33, 1000), (64, 4095)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("shape", SHAPES)
def test_per_channel_scales_match_seed_formula(shape):
    w = torch.randn(shape)
    assert torch.equal(quant.per_channel_scales(w), w.abs().max(dim=-1).values / 127)


@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_fp32_is_bit_identical_to_seed_formula(shape):
    w = torch.randn(shape) * 3
    scales = w.abs().max(dim=-1).values / 127
    expected = torch.round(w / scales.unsqueeze(1)).to(torch.int8)
    assert torch.equal(quant.quantize(w, quant.per_channel_scales(w)), expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_error_is_at_most_half_a_step(shape, dtype):
    w = (torch.randn(shape) * 0.05).to(dtype)
    scales = quant.per_channel_scales(w).to(dtype)
    q = quant.quantize(w, scales)
    err = (w.float() - quant.dequantize(q, scales)).abs()
    assert (err <= scales.float()[:, None] / 2 * (1 + 1e-6)).all()
    assert q.dtype == torch.int8 and q.abs().max() <= 127


def test_per_tensor_and_per_group_scales():
    w = torch.randn(6, 12)
    assert torch.equal(quant.per_tensor_scale(w), w.abs().max() / 127)
    groups = quant.per_group_scales(w, 4)
    assert groups.shape == (6, 3)
    assert torch.equal(groups[:, 1], w[:, 4:8].abs().amax(-1) / 127)
    for scales in (quant.per_tensor_scale(w), quant.per_channel_scales(w), groups):
        q = quant.quantize(w, scales)
        err = (w - quant.dequantize(q, scales)).abs()
        assert (err <= quant.expand_scales(scales, w.shape) / 2 + 1e-7).all()


def test_per_group_needs_a_divisor():
    with pytest.raises(ValueError, match="group_size=5"):
        quant.per_group_scales(torch.randn(2, 12), 5)


def test_all_zero_row_gives_zeros_not_nan():
    w = torch.randn(3, 8)
    w[1] = 0
    scales = quant.per_channel_scales(w)
    q = quant.quantize(w, scales)
    assert scales[1] == 0 and torch.equal(q[1], torch.zeros(8, dtype=torch.int8))
    deq = quant.dequantize(q, scales)
    assert torch.isfinite(deq).all() and torch.equal(deq[1], torch.zeros(8))
    stats = quant.error_stats(w, q, scales)
    assert all(math.isfinite(v) for v in (stats.max_abs, stats.rel_fro, stats.max_err_over_scale))


def test_all_zero_matrix_stats():
    w = torch.zeros(2, 4)
    scales = quant.per_channel_scales(w)
    stats = quant.error_stats(w, quant.quantize(w, scales), scales)
    assert stats.max_abs == 0 and stats.rel_fro == 0 and stats.sqnr_db == math.inf


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_check_weights_rejects_non_finite(bad):
    w = torch.randn(3, 4)
    w[2, 1] = bad
    with pytest.raises(ValueError, match="row 2, column 1"):
        quant.check_weights(w)


@pytest.mark.parametrize("w", [torch.randn(4), torch.randn(2, 3, 4), torch.ones(3, 4, dtype=torch.int32)])
def test_check_weights_rejects_bad_rank_or_dtype(w):
    with pytest.raises(ValueError):
        quant.check_weights(w)


def test_check_weights_names_the_expected_shape():
    with pytest.raises(ValueError, match=r"expected \(4, 3\)"):
        quant.check_weights(torch.randn(3, 4), (4, 3))


def test_error_stats_match_definitions():
    w = torch.randn(16, 32)
    scales = quant.per_channel_scales(w)
    q = quant.quantize(w, scales)
    err = w - q.float() * scales[:, None]
    stats = quant.error_stats(w, q, scales)
    assert stats.max_abs == pytest.approx(err.abs().max().item())
    assert stats.rel_fro == pytest.approx((err.norm() / w.norm()).item(), rel=1e-5)
    assert stats.sqnr_db == pytest.approx(10 * math.log10(w.pow(2).sum() / err.pow(2).sum()), rel=1e-5)
    assert 0.4 < stats.max_err_over_scale <= 0.5
