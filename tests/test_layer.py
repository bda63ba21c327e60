"""W8A16LinearLayer: quantization, forward, dtypes, state_dict and bad input."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from w8a16 import W8A16LinearLayer

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(16, 8), (13, 7), (1000, 24), (17, 4095)]  # (in, out): odd, not multiples of 8 or 16
TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def seed_forward(x, int8_weights, scales, bias):
    """The seed's naive forward, kept here as the reference it must agree with (where it does not overflow)."""
    out = F.linear(x, int8_weights.to(x.dtype)) * scales
    return out + bias if bias is not None else out


def make_layer(in_features, out_features, bias, dtype, device="cpu"):
    linear = nn.Linear(in_features, out_features, bias=bias, dtype=dtype, device=device)
    return linear, W8A16LinearLayer.from_linear(linear)


def test_buffers_shapes_and_dtypes():
    layer = W8A16LinearLayer(12, 5, bias=True, dtype=torch.bfloat16)
    assert layer.int8_weights.shape == (5, 12) and layer.int8_weights.dtype == torch.int8
    assert layer.scales.shape == (5,) and layer.scales.dtype == torch.bfloat16
    assert layer.bias.shape == (5,) and layer.bias.dtype == torch.bfloat16
    assert W8A16LinearLayer(12, 5, bias=False).bias is None
    assert set(layer.state_dict()) == {"int8_weights", "scales", "bias"}


@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_fp32_bit_identical_to_seed(shape):
    in_features, out_features = shape
    w = torch.randn(out_features, in_features)
    layer = W8A16LinearLayer(in_features, out_features)
    layer.quantize(w)
    w_fp32 = w.clone().to(torch.float32)
    scales = w_fp32.abs().max(dim=-1).values / 127
    assert torch.equal(layer.scales, scales)
    assert torch.equal(layer.int8_weights, torch.round(w / scales.unsqueeze(1)).to(torch.int8))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_error_bound_per_element(shape, dtype):
    linear, layer = make_layer(*shape, bias=False, dtype=dtype)
    err = (linear.weight.float() - layer.dequantized_weight(torch.float32)).abs()
    assert (err <= layer.scales.float()[:, None] / 2 * (1 + 1e-6)).all()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("leading", [(), (3,), (2, 5)])
def test_forward_matches_dequantized_reference(shape, dtype, bias, leading, device):
    linear, layer = make_layer(*shape, bias=bias, dtype=dtype, device=device)
    x = torch.randn(*leading, shape[0], device=device).to(dtype)
    out = layer(x)
    assert out.dtype == dtype and out.shape == (*leading, shape[1])
    ref = F.linear(x.double(), layer.dequantized_weight(torch.float64), None if not bias else layer.bias.double())
    assert torch.allclose(out.double(), ref, atol=TOL[dtype] * ref.abs().max().item() + 1e-6, rtol=TOL[dtype])


@pytest.mark.parametrize("bias", [True, False])
def test_forward_fp32_agrees_with_seed_forward(bias):
    _, layer = make_layer(64, 32, bias=bias, dtype=torch.float32)
    x = torch.randn(4, 64)
    assert torch.allclose(layer(x), seed_forward(x, layer.int8_weights, layer.scales, layer.bias), atol=1e-5)


@pytest.mark.parametrize("in_dtype", DTYPES)
def test_forward_returns_input_dtype_whatever_the_layer_dtype(in_dtype):
    _, layer = make_layer(32, 8, bias=True, dtype=torch.float32)
    assert layer(torch.randn(2, 32).to(in_dtype)).dtype == in_dtype


def test_fp16_outliers_stay_finite_where_the_seed_overflows():
    torch.manual_seed(0)
    linear, layer = make_layer(4096, 64, bias=True, dtype=torch.float16)
    x = torch.randn(1, 4096)
    x[0, :8] = 400.0  # a handful of outlier channels, as LLM activations have
    x16 = x.half()
    naive = seed_forward(x16, layer.int8_weights, layer.scales, layer.bias)
    assert not torch.isfinite(naive).all(), "the seed's forward should overflow here"
    out = layer(x16)
    ref = F.linear(x.double(), layer.dequantized_weight(torch.float64), layer.bias.double())
    assert torch.isfinite(out).all()
    assert torch.allclose(out.double(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


def test_all_zero_row_gives_zero_output_row():
    linear = nn.Linear(16, 4, bias=False)
    with torch.no_grad():
        linear.weight[2] = 0
    layer = W8A16LinearLayer.from_linear(linear)
    assert torch.isfinite(layer.scales).all()
    out = layer(torch.randn(3, 16))
    assert torch.isfinite(out).all() and torch.equal(out[:, 2], torch.zeros(3))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_raise(bad):
    w = torch.randn(4, 8)
    w[1, 3] = bad
    with pytest.raises(ValueError, match="non-finite"):
        W8A16LinearLayer(8, 4).quantize(w)


def test_scales_that_overflow_the_layer_dtype_raise():
    w = torch.full((2, 4), 1e7)  # scale 1e7/127 does not fit in fp16 (max 65504)
    with pytest.raises(ValueError, match="overflow torch.float16"):
        W8A16LinearLayer(4, 2, dtype=torch.float16).quantize(w)


def test_wrong_weight_shape_raises():
    with pytest.raises(ValueError, match=r"expected \(4, 8\)"):
        W8A16LinearLayer(8, 4).quantize(torch.randn(8, 4))


def test_wrong_input_width_raises_clearly():
    layer = W8A16LinearLayer(8, 4)
    with pytest.raises(ValueError, match="last dimension must be 8"):
        layer(torch.randn(2, 9))
    with pytest.raises(ValueError, match="floating-point"):
        layer(torch.ones(2, 8, dtype=torch.int64))


@pytest.mark.parametrize("cast", [lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.double()])
def test_dtype_casts_never_touch_int8_weights(cast):
    model = nn.Sequential(W8A16LinearLayer.from_linear(nn.Linear(16, 8)))
    before = model[0].int8_weights.clone()
    cast(model)
    assert model[0].int8_weights.dtype == torch.int8 and torch.equal(model[0].int8_weights, before)
    assert model[0](torch.randn(2, 16).to(model[0].scales.dtype)).dtype == model[0].scales.dtype


@pytest.mark.parametrize("bias", [True, False])
def test_state_dict_round_trip_gives_identical_outputs(bias):
    _, layer = make_layer(24, 12, bias=bias, dtype=torch.bfloat16)
    fresh = W8A16LinearLayer(24, 12, bias=bias, dtype=torch.bfloat16)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(3, 24, dtype=torch.bfloat16)
    assert torch.equal(fresh(x), layer(x))


def test_from_linear_keeps_bias_dtype_and_device():
    linear = nn.Linear(10, 6, dtype=torch.bfloat16)
    layer = W8A16LinearLayer.from_linear(linear)
    assert layer.scales.dtype == torch.bfloat16 and torch.equal(layer.bias, linear.bias.detach())
    assert "in_features=10, out_features=6, bias=True" in repr(layer)


def test_seed_readme_example():
    """The seed's README example, unchanged."""
    module = W8A16LinearLayer(16, 32)
    dummy_hidden_states = torch.randn(1, 6, 16)
    assert module(dummy_hidden_states).shape == (1, 6, 32)
    random_matrix = torch.randn((4, 8), dtype=torch.bfloat16)
    module = W8A16LinearLayer(8, 4)
    module.quantize(random_matrix)
    assert module.int8_weights.dtype == torch.int8
    err = (random_matrix.float() - module.int8_weights * module.scales.unsqueeze(1)).abs().mean()
    assert err < 0.01


# ---------------------------------------------------------------------------------------------------------------
# The decode fast path (_decode_step): checked once, then reused; must agree with the dispatcher bit for bit
# ---------------------------------------------------------------------------------------------------------------

native_only = pytest.mark.skipif(  # built and vectorised: a scalar-only build (arm64 for now) is not used for decode
    not __import__("w8a16.ops.dispatch").ops.dispatch.native_vectorised(),
    reason="no vectorised native kernel here (no C compiler, or only its scalar loop)",
)


def decode_layer(dtype=torch.bfloat16, bias=True, in_features=100, out_features=37):
    torch.manual_seed(0)
    return make_layer(in_features, out_features, bias=bias, dtype=dtype)[1]


@native_only
@pytest.mark.parametrize("leading", [(), (1,), (1, 1), (3,), (2, 4)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decode_step_is_bit_identical_to_the_native_path(dtype, bias, leading):
    from w8a16.ops import w8a16_linear

    layer = decode_layer(dtype, bias)
    x = torch.randn(*leading, 100).to(dtype)
    expected = w8a16_linear(x, layer.int8_weights, layer.scales, layer.bias, path="native")
    first = layer(x)  # checked path, leaves the prepared weights behind
    assert layer._prepared is not None
    second = layer(x)  # the fast path
    assert layer._decode_step(x) is not None
    for out in (first, second):
        assert out.shape == (*leading, 37) and out.dtype == dtype and torch.equal(out, expected)


@native_only
def test_decode_step_hands_everything_else_to_the_checked_path():
    from w8a16.ops import dispatch

    layer = decode_layer(torch.bfloat16)
    layer(torch.randn(1, 100, dtype=torch.bfloat16))
    assert layer._prepared is not None
    others = {
        "fp64": torch.randn(1, 100, dtype=torch.float64),
        "non-contiguous": torch.randn(100, 2, dtype=torch.bfloat16).t()[:1],
        "prefill": torch.randn(dispatch.NATIVE_MAX_M + 1, 100, dtype=torch.bfloat16),
        "empty": torch.randn(0, 100, dtype=torch.bfloat16),
        "needs grad": torch.randn(1, 100, dtype=torch.bfloat16, requires_grad=True),
    }
    for name, x in others.items():
        assert layer._decode_step(x) is None, name
        out = layer(x)
        ref = layer.dequantized_weight(torch.float64) @ x.detach().double().T
        ref = ref.T + layer.bias.double()
        atol = 2e-2 * float(ref.abs().max()) if ref.numel() else 0.0
        assert out.shape == ref.shape and torch.allclose(out.detach().double(), ref, rtol=2e-2, atol=atol + 1e-6), name
    assert layer(others["needs grad"]).grad_fn is not None  # still differentiable


@native_only
@pytest.mark.parametrize("bad", [torch.randn(1, 99), torch.randint(0, 3, (1, 100)), torch.tensor(1.0)])
def test_decode_step_still_refuses_bad_input_clearly(bad):
    layer = decode_layer(torch.float32)
    layer(torch.randn(1, 100))
    assert layer._prepared is not None
    with pytest.raises(ValueError, match="W8A16LinearLayer"):
        layer(bad)


@native_only
def test_decode_step_follows_every_way_the_buffers_can_change():
    layer = decode_layer(torch.float32)
    x = torch.randn(1, 100)

    def expected():
        return x @ layer.dequantized_weight(torch.float32).T + layer.bias

    layer(x)
    other = decode_layer(torch.float32, in_features=100, out_features=37)
    other.int8_weights.neg_()
    layer.load_state_dict(other.state_dict())  # in place: the same tensors, new values
    assert torch.allclose(layer(x), expected(), rtol=1e-5, atol=1e-4)
    layer.scales = layer.scales * 2  # a new tensor
    assert torch.allclose(layer(x), expected(), rtol=1e-5, atol=1e-4)
    layer.int8_weights.data = layer.int8_weights.flip(0).contiguous()  # new storage under the same tensor
    assert torch.allclose(layer(x), expected(), rtol=1e-5, atol=1e-4)
    layer.quantize(torch.randn(37, 100))
    assert torch.allclose(layer(x), expected(), rtol=1e-5, atol=1e-4)
    layer.bias = None
    assert torch.allclose(layer(x), x @ layer.dequantized_weight(torch.float32).T, rtol=1e-5, atol=1e-4)
    bf16 = layer.to(torch.bfloat16)  # scales and bias replaced by bf16 copies
    xb = x.bfloat16()
    assert torch.equal(bf16(xb), bf16(xb)) and bf16(xb).dtype == torch.bfloat16


@native_only
def test_decode_cache_is_not_pickled_or_shared_by_copies(tmp_path):
    import copy

    layer = decode_layer(torch.bfloat16)
    x = torch.randn(1, 100, dtype=torch.bfloat16)
    out = layer(x)
    twin = copy.deepcopy(layer)
    assert twin._prepared is None or twin._prepared.weights is twin.int8_weights
    twin.int8_weights.zero_()
    assert torch.equal(layer(x), out)  # the copy's changes never reach the original, nor the reverse
    assert torch.equal(twin(x), twin.bias.expand(1, 37))
    torch.save(layer, tmp_path / "layer.pt")
    loaded = torch.load(tmp_path / "layer.pt", weights_only=False)
    assert loaded._prepared is None and torch.equal(loaded(x), out)


@native_only
def test_decode_step_steps_aside_when_the_kernel_goes_away(monkeypatch):
    from w8a16.ops import native

    layer = decode_layer(torch.float32)
    x = torch.randn(1, 100)
    out = layer(x)
    monkeypatch.setattr(native, "_state", {"lib": None, "error": "gone"})
    assert layer._decode_step(x) is None
    assert torch.allclose(layer(x), out, rtol=1e-5, atol=1e-5)


@native_only
def test_fp16_layers_take_the_decode_step_too():
    layer = decode_layer(torch.float16)
    x = torch.randn(1, 100, dtype=torch.float16)
    out = layer(x)
    assert layer._prepared is not None  # the C kernel reads fp16 x, scales and bias as they are
    assert layer._decode_step(x) is not None and torch.equal(layer(x), out)
    ref = x.double() @ layer.dequantized_weight(torch.float64).T + layer.bias.double()
    assert torch.allclose(out.double(), ref, rtol=5e-3, atol=5e-3 * float(ref.abs().max()))


@native_only
def test_weights_put_in_before_every_call_are_aligned_once_not_per_call(monkeypatch):
    """accelerate's offload (device_map with disk or CPU offload) sets the int8 weight from storage before each
    call, often 8-byte aligned. Copying it to aligned memory on every call would double the bytes moved."""
    import w8a16.layer as layer_module

    layer = decode_layer(torch.bfloat16)
    x = torch.randn(1, 100, dtype=torch.bfloat16)
    expected = layer(x)
    copies = []
    original_copy = layer_module.aligned_copy
    monkeypatch.setattr(layer_module, "aligned_copy", lambda w: copies.append(1) or original_copy(w))
    stored = layer.int8_weights.clone()
    for _ in range(4):
        raw = torch.empty(stored.numel() + 64, dtype=torch.int8)
        offset = (8 - raw.data_ptr()) % 64  # an address 8 bytes past a 64-byte boundary, as an mmap slice can be
        unaligned = raw[offset: offset + stored.numel()].view_as(stored)
        assert not layer_module.is_aligned(unaligned)
        layer.int8_weights = unaligned.copy_(stored)  # as accelerate's pre-forward hook does
        assert torch.equal(layer(x), expected)
    assert len(copies) <= 1
