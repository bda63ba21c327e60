"""The registered op (``torch.ops.w8a16.linear``) and the layer around it, as the rest of PyTorch meets them:
torch.compile(fullgraph), torch.export, autocast, autograd (LoRA, BitFit), copies, moves and re-strides."""

import copy
import gc
import pickle
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from w8a16 import Quantizer, W8A16LinearLayer, ops
from w8a16.ops import native
from w8a16.ops import dispatch


def quantized_mlp(dtype=torch.bfloat16, bias=True) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128, bias=bias), nn.GELU(), nn.Linear(128, 32, bias=bias)).to(dtype)
    Quantizer(model, W8A16LinearLayer, [])
    return model.eval()


def layer_with(in_features=64, out_features=32, dtype=torch.float32, bias=True) -> W8A16LinearLayer:
    torch.manual_seed(0)
    layer = W8A16LinearLayer(in_features, out_features, bias=bias, dtype=dtype)
    layer.quantize(torch.randn(out_features, in_features, dtype=dtype))
    return layer


def dense_weight(layer: W8A16LinearLayer) -> torch.Tensor:
    return layer.int8_weights.double() * layer.scales.double()[:, None]


# ---- tracing ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [1, 5, 40])  # native, native, tiled
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compile_fullgraph_equals_eager(dtype, m):
    model = quantized_mlp(dtype)
    x = torch.randn(m, 64, dtype=dtype)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager)  # within rounding: inductor fuses the GELU its own way


def test_export_keeps_a_w8a16_node_that_runs():
    model = quantized_mlp()
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    program = torch.export.export(model, (x,))
    targets = [node.target for node in program.graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.w8a16.linear.default) == 2
    with torch.no_grad():
        assert torch.equal(program.module()(x), model(x))


def test_autocast_gives_the_dtype_nn_linear_gives():
    layer = layer_with(dtype=torch.float32)
    dense = nn.Linear(64, 32)
    x = torch.randn(4, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = layer(x), dense(x)
    assert out.dtype == ref.dtype == torch.bfloat16
    expected = (x.bfloat16().double() @ dense_weight(layer).T + layer.bias.double())
    torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert layer(x).dtype == torch.float32


# ---- autograd --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [1, 7, 70])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_wrt_x_matches_the_float_formula(dtype, m):
    layer = layer_with(dtype=dtype)
    x = torch.randn(2, m, 64, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(2, m, 32, dtype=dtype)
    layer(x).backward(grad_out)
    expected = grad_out.double() @ dense_weight(layer)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad.double(), expected, rtol=tol, atol=tol * expected.abs().max().item())


def test_backward_saves_the_int8_weight_not_a_dense_copy():
    """LoRA on a frozen quantized base: what autograd keeps for backward is the int8 weight itself (≤ 1.1×)."""
    layer = layer_with(2048, 2048, dtype=torch.bfloat16)
    x = torch.randn(4, 2048, dtype=torch.bfloat16, requires_grad=True)
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    int8_bytes = layer.int8_weights.numel()
    assert sum(saved.values()) <= 1.1 * int8_bytes, sum(saved.values())
    y.sum().backward()
    assert x.grad is not None


def test_lora_style_training_step_trains_only_the_adapter():
    base = layer_with(64, 32)
    lora_a = nn.Parameter(torch.randn(4, 64) * 0.01)
    lora_b = nn.Parameter(torch.zeros(32, 4))
    opt = torch.optim.SGD([lora_a, lora_b], lr=0.1)
    x, target = torch.randn(16, 64), torch.randn(16, 32)
    before = base.int8_weights.clone()
    losses = []
    for _ in range(5):
        out = base(x) + x @ lora_a.T @ lora_b.T
        loss = F.mse_loss(out, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] and torch.equal(base.int8_weights, before)


def test_bitfit_a_bias_parameter_gets_gradients_every_call():
    layer = layer_with(64, 32, dtype=torch.bfloat16)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    layer(x)  # the decode cache is prepared for the buffer bias
    layer.bias = nn.Parameter(layer.bias.detach().clone())
    for step in range(1, 3):
        layer(x).float().sum().backward()
        torch.testing.assert_close(layer.bias.grad.float(), torch.full((32,), 3.0 * step))
    assert layer.bias.grad.dtype == torch.bfloat16


def test_trained_scales_get_the_right_gradient():
    layer = layer_with(64, 16, dtype=torch.float32)
    layer.scales = nn.Parameter(layer.scales.detach().clone())
    x = torch.randn(5, 64)
    layer(x).sum().backward()
    expected = (x.double() @ layer.int8_weights.double().T).sum(0)
    torch.testing.assert_close(layer.scales.grad.double(), expected, rtol=1e-5, atol=1e-4)


def test_torch_compile_trains_too():
    layer = layer_with(64, 32)
    x = torch.randn(4, 64, requires_grad=True)
    torch.compile(layer, fullgraph=True)(x).sum().backward()
    torch.testing.assert_close(x.grad.double(), dense_weight(layer).sum(0).expand(4, 64), rtol=1e-5, atol=1e-5)


# ---- the decode cache: its lifetime is the buffers' ------------------------------------------------------------

needs_native = pytest.mark.skipif(not dispatch.native_vectorised(), reason="no vectorised C kernel here")


@needs_native
def test_to_meta_releases_the_old_storage():
    layer = layer_with(256, 256)
    layer(torch.randn(1, 256))
    assert layer.__dict__["_prepared"] is not None
    old = weakref.ref(layer.int8_weights)
    layer.to("meta")
    gc.collect()
    assert old() is None and layer.__dict__["_prepared"] is None


@needs_native
def test_an_in_place_transpose_is_followed():
    layer = layer_with(48, 48)
    x = torch.randn(1, 48)
    layer(x)
    layer.int8_weights.t_()  # same tensor, same storage, new strides
    expected = x.double() @ dense_weight(layer).T + layer.bias.double()
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-4)


@needs_native
def test_copies_pickles_and_saves_work_as_before(tmp_path):
    layer = layer_with(64, 32, dtype=torch.bfloat16)
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    out = layer(x)
    for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert torch.equal(twin(x), out)
    torch.save(layer, tmp_path / "layer.pt")
    assert torch.equal(torch.load(tmp_path / "layer.pt", weights_only=False)(x), out)


def test_a_scalar_only_kernel_is_not_preferred(monkeypatch):
    """Where the C kernel could only be built as a scalar loop, PyTorch's kernels serve decode instead."""
    monkeypatch.setattr(native, "simd", lambda: None)
    w = torch.randint(-127, 128, (32, 64), dtype=torch.int8)
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    assert ops.choose_path(x, w, torch.rand(32, dtype=torch.bfloat16)) == "int8pack"
    assert ops.choose_path(x.float(), w, torch.rand(32)) == "tiled"
    assert "scalar" in ops.backend_info()["native"]["reason"] or not ops.backend_info()["native"]["available"]


def test_backend_info_and_repr_say_which_path_serves_decode():
    info = ops.backend_info()
    assert set(info) == set(ops.PATHS) and info["reference"]["available"]
    assert all(v["available"] or v["reason"] for v in info.values())
    layer = layer_with(64, 32)
    assert f"decode={layer.decode_path()}" in repr(layer)
    assert layer.decode_path() in ops.PATHS


# ---- state checks ----------------------------------------------------------------------------------------------


def test_load_state_dict_refuses_float_weights_and_integer_scales():
    model = nn.Sequential(layer_with(64, 32))
    state = model.state_dict()
    for key, bad in (("0.int8_weights", state["0.int8_weights"].float()), ("0.scales", torch.ones(32, dtype=torch.int32))):
        with pytest.raises(RuntimeError, match=r"W8A16LinearLayer 0: (int8_weights must be int8|scales must be floating)"):
            model.load_state_dict({**state, key: bad})
    model.load_state_dict(state)  # the real thing still loads


def test_in_features_zero_is_a_clear_error():
    with pytest.raises(ValueError, match="in_features must be ≥ 1"):
        W8A16LinearLayer.from_linear(nn.Linear(0, 8))


def test_del_bias_behaves_as_on_nn_linear():
    layer, linear = layer_with(64, 32), nn.Linear(64, 32)
    x = torch.randn(2, 64)
    layer(x)
    for module in (layer, linear):
        del module.bias
        with pytest.raises(AttributeError, match="bias"):
            module(x)


def test_one_informational_warning_when_the_fast_cpu_kernel_is_missing(monkeypatch):
    """Said once per process, with the reason; not at all when the user switched it off (W8A16_NATIVE=0)."""
    monkeypatch.delenv("W8A16_NATIVE", raising=False)
    monkeypatch.setattr(native, "_state", {"lib": None, "error": "no C compiler on PATH (test)"})
    monkeypatch.setattr(dispatch, "_announced", [])
    w = torch.randint(-127, 128, (32, 64), dtype=torch.int8)
    x = torch.randn(1, 64)
    with pytest.warns(RuntimeWarning, match=r"fast CPU kernel is not available \(no C compiler on PATH \(test\)\)"):
        assert ops.choose_path(x, w, torch.rand(32)) == "tiled"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.choose_path(x, w, torch.rand(32))  # once only
        monkeypatch.setattr(dispatch, "_announced", [])
        monkeypatch.setenv("W8A16_NATIVE", "0")
        ops.choose_path(x, w, torch.rand(32))  # switched off on purpose: nothing to say
