"""Calibration (`method="mse"`) and fewer bits (`bits=`) in the functional core, the layer and the walker.

The defaults must stay the seed's maths bit for bit; "mse" must never be worse than absmax on any block, which
holds exactly because absmax is one of its candidates and wins ties.
"""

import pytest
import torch
from torch import nn

from w8a16 import Quantizer, W8A16LinearLayer, quant, quantize_model

SHAPES = [(1, 1), (4, 8), (7, 13), (33, 256)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def heavy_tailed(shape, dtype=torch.float32) -> torch.Tensor:
    """Student-t-like weights (a Gaussian divided by a random width): the outliers that make clipping pay."""
    w = torch.randn(shape) / torch.rand(shape).clamp_min(0.05).sqrt()
    return (w * 0.02).to(dtype)


def block_sq_errors(w: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """Squared error per scale block (row, or (row, group)), through the public quantize/dequantize."""
    deq = quant.dequantize(quant.quantize(w, scales, bits=bits), scales)
    err = (w.float() - deq).pow(2)
    return err.reshape(*scales.shape, -1).sum(-1)


def reference_mse_scale(row: torch.Tensor, bits: int) -> float:
    """Plain reference, in float64: try every ratio on one block, keep the best (first on ties)."""
    qmax = 2 ** (bits - 1) - 1
    amax = row.double().abs().max().item()
    best, best_err = None, None
    for ratio in quant.MSE_RATIOS:
        s = amax * ratio / qmax
        q = torch.round(row.double() / (s or 1.0)).clamp(-qmax, qmax)
        err = (row.double() - q * s).pow(2).sum().item()
        if best_err is None or err < best_err:
            best, best_err = s, err
    return best_err


# ------------------------------------------------------------------------------------ absmax is unchanged


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_absmax_default_and_explicit_are_the_seed_formula_bit_for_bit(shape, dtype):
    w = torch.randn(shape).to(dtype)
    seed = w.float().abs().max(dim=-1).values / 127
    for scales in (quant.per_channel_scales(w), quant.per_channel_scales(w, bits=8, method="absmax")):
        assert torch.equal(scales, seed)
    expected = torch.round(w.float() / torch.where(seed == 0, 1, seed)[:, None]).clamp(-127, 127).to(torch.int8)
    assert torch.equal(quant.quantize(w, seed), expected)
    assert torch.equal(quant.quantize(w, seed, bits=8), expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_and_walker_absmax_unchanged(dtype):
    linear = nn.Linear(24, 10, dtype=dtype)
    seed, explicit = W8A16LinearLayer(24, 10, dtype=dtype), W8A16LinearLayer(24, 10, dtype=dtype)
    seed.quantize(linear.weight)
    explicit.quantize(linear.weight, method="absmax")
    assert torch.equal(seed.int8_weights, explicit.int8_weights) and torch.equal(seed.scales, explicit.scales)
    model = Quantizer(nn.Sequential(linear), W8A16LinearLayer, [])  # the seed's positional call
    assert torch.equal(model[0].int8_weights, seed.int8_weights) and torch.equal(model[0].scales, seed.scales)


@pytest.mark.parametrize("group_size", [4, 8])
def test_per_group_absmax_unchanged(group_size):
    w = torch.randn(6, 24)
    expected = w.reshape(6, -1, group_size).abs().amax(-1) / 127
    assert torch.equal(quant.per_group_scales(w, group_size), expected)
    assert torch.equal(quant.per_group_scales(w, group_size, method="absmax"), expected)


# ------------------------------------------------------------------------------------ mse


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_mse_never_worse_than_absmax_per_row(shape, dtype, bits):
    w = heavy_tailed(shape, dtype)
    absmax = quant.per_channel_scales(w, bits=bits)
    mse = quant.per_channel_scales(w, bits=bits, method="mse")
    assert mse.dtype == torch.float32 and mse.shape == (shape[0],)
    assert (block_sq_errors(w, mse, bits) <= block_sq_errors(w, absmax, bits)).all()
    assert (mse <= absmax).all() and (mse >= 0.5 * absmax * (1 - 1e-6)).all()  # within the searched range


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group_size", [4, 13])
def test_mse_per_group_never_worse_than_absmax(bits, group_size):
    w = heavy_tailed((9, 52))
    absmax = quant.per_group_scales(w, group_size, bits=bits)
    mse = quant.per_group_scales(w, group_size, bits=bits, method="mse")
    assert mse.shape == absmax.shape == (9, 52 // group_size)
    assert (block_sq_errors(w, mse, bits) <= block_sq_errors(w, absmax, bits)).all()


@pytest.mark.parametrize("bits", [8, 4, 3])
def test_mse_finds_the_best_ratio_of_a_plain_float64_search(bits):
    w = heavy_tailed((12, 40))
    mse = quant.per_channel_scales(w, bits=bits, method="mse")
    got = block_sq_errors(w, mse, bits).double()
    for row in range(w.shape[0]):  # fp32 search vs float64 reference: the same minimum up to fp32 summation
        assert got[row].item() == pytest.approx(reference_mse_scale(w[row], bits), rel=1e-5, abs=1e-12)


def test_mse_gains_little_at_8_bits_and_much_at_4():
    """What the notebook shows, on 256×1024 heavy-tailed weights: clipping matters once the grid is coarse."""
    w = heavy_tailed((256, 1024))

    def sqnr_gain(bits):  # dB gained by mse over absmax, whole matrix
        err = {m: block_sq_errors(w, quant.per_channel_scales(w, bits=bits, method=m), bits).sum() for m in quant.METHODS}
        return 10 * torch.log10(err["absmax"] / err["mse"]).item()

    assert 0 <= sqnr_gain(8) < 0.5
    assert sqnr_gain(4) > 1.0


def test_zero_rows_give_zero_scales_and_zeros():
    w = heavy_tailed((5, 16))
    w[2] = 0
    for bits in (8, 4):
        scales = quant.per_channel_scales(w, bits=bits, method="mse")
        assert scales[2] == 0 and torch.isfinite(scales).all()
        q = quant.quantize(w, scales, bits=bits)
        assert not q[2].any()
    assert torch.equal(quant.quantize_dequantize(torch.zeros(3, 8), method="mse"), torch.zeros(3, 8))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_rejected_by_the_layer_as_before(bad):
    w = torch.randn(4, 8)
    w[1, 3] = bad
    assert not torch.isfinite(quant.per_channel_scales(w, method="mse")[1])  # propagates, never hidden by search
    with pytest.raises(ValueError, match="NaN|Inf"):
        W8A16LinearLayer(8, 4).quantize(w, method="mse")
    with pytest.raises(ValueError, match="cannot quantize layer '0'"):
        linear = nn.Linear(8, 4)
        with torch.no_grad():
            linear.weight.copy_(w)
        Quantizer(nn.Sequential(linear), method="mse")


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_bits_grid(bits):
    w = heavy_tailed((8, 64))
    qmax = 2 ** (bits - 1) - 1
    assert quant.q_max(bits) == qmax
    scales = quant.per_channel_scales(w, bits=bits)
    assert torch.equal(scales, w.abs().amax(-1) / qmax)
    q = quant.quantize(w, scales, bits=bits)
    assert q.dtype == torch.int8 and q.abs().max() == qmax
    err = (w - quant.dequantize(q, scales)).abs()
    assert (err <= scales[:, None] / 2 * (1 + 1e-6)).all()  # absmax never clips
    assert torch.equal(quant.quantize_dequantize(w, bits=bits), quant.dequantize(q, scales))


@pytest.mark.parametrize("bits", [0, 1, 9, 16, 8.0, "8"])
def test_bits_out_of_range_rejected(bits):
    with pytest.raises(ValueError, match="bits"):
        quant.per_channel_scales(torch.randn(2, 4), bits=bits)
    with pytest.raises(ValueError, match="bits"):
        quant.quantize(torch.randn(2, 4), torch.ones(2), bits=bits)


def test_unknown_method_rejected_everywhere():
    w = torch.randn(2, 4)
    with pytest.raises(ValueError, match="method"):
        quant.per_channel_scales(w, method="percentile")
    with pytest.raises(ValueError, match="method"):
        W8A16LinearLayer(4, 2).quantize(w, method="percentile")
    with pytest.raises(ValueError, match="method"):
        quantize_model(nn.Sequential(nn.Linear(4, 2)), method="percentile")


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_and_walker_mse(dtype):
    torch.manual_seed(1)
    linear = nn.Linear(64, 16, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(heavy_tailed((16, 64), dtype))
    layer = W8A16LinearLayer.from_linear(linear, method="mse")
    scales = quant.per_channel_scales(linear.weight, method="mse").to(dtype)
    assert torch.equal(layer.scales, scales)
    assert torch.equal(layer.int8_weights, quant.quantize(linear.weight, scales))
    model = Quantizer(nn.Sequential(linear), W8A16LinearLayer, [], method="mse")
    assert torch.equal(model[0].scales, scales) and torch.equal(model[0].int8_weights, layer.int8_weights)
    x = torch.randn(3, 64, dtype=dtype)
    assert model(x).dtype == dtype


def test_target_class_with_the_seeds_from_linear_still_works():
    class SeedLayer(W8A16LinearLayer):
        @classmethod
        def from_linear(cls, linear):  # the seed's one-argument signature
            return super().from_linear(linear)

    report = quantize_model(nn.Sequential(nn.Linear(8, 4)), SeedLayer)
    assert report.replaced == ["0"]
    with pytest.raises(TypeError):
        quantize_model(nn.Sequential(nn.Linear(8, 4)), SeedLayer, method="mse")


# ------------------------------------------------------------------------------------ the notebook's helper


@pytest.mark.parametrize("heavy_tailed", [False, True])
def test_course_compare_calibration(heavy_tailed):
    from w8a16.course.calibration import codegen_block_weights, compare_calibration, format_table, gain_db

    weights = codegen_block_weights(rows=16, heavy_tailed=heavy_tailed)
    assert {n: tuple(w.shape) for n, w in weights.items()} == {
        "attn.qkv_proj": (16, 1024), "attn.out_proj": (16, 1024), "mlp.fc_in": (16, 1024), "mlp.fc_out": (16, 4096)}
    assert abs(torch.cat([w.flatten() for w in weights.values()]).std().item() - 0.02) < 0.002  # the init std
    rows = compare_calibration(weights, tokens=8)
    assert len(rows) == 8 and len(format_table(rows).splitlines()) == 9
    for bits in (8, 4):
        for granularity in ("per-channel", "per-group (g=128)"):
            assert gain_db(rows, bits, granularity) >= 0
    w = weights["attn.out_proj"]
    noise = (w - quant.quantize_dequantize(w, bits=4)).pow(2).sum() + sum(
        (v - quant.quantize_dequantize(v, bits=4)).pow(2).sum() for k, v in weights.items() if k != "attn.out_proj")
    signal = sum(v.pow(2).sum() for v in weights.values())
    expected = 10 * torch.log10(signal / noise).item()
    got = next(r.sqnr_db for r in rows if (r.bits, r.granularity, r.method) == (4, "per-channel", "absmax"))
    assert got == pytest.approx(expected, abs=1e-3)
