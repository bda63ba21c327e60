"""`w8a16.export_onnx`: int8 initializers feeding DequantizeLinear → MatMul, run by onnxruntime, compared with torch.

Run with `onnxruntime_session`, which keeps onnxruntime's fused DequantizeLinear→MatMul kernel in fp32 (its default
quantizes activations to int8: tested separately, at its own tolerance). Tolerance for onnxruntime against the quantized torch model: both dequantize to the *same* fp32 weights (checked
bit-exactly below: the file holds our int8 matrix and our fp32 scales, and DequantizeLinear computes q·s in fp32
as `quant.dequantize` does), so what remains is fp32 summation order (and onnxruntime's own GELU, softmax and
layer-norm kernels). For dot products of K ≤ 512 terms that is a few ulps of the output scale; we allow
1e-4 × max|output| + 1e-4 relative, about 100× what was measured (≤ 1e-6 absolute on outputs of size ~1).
"""

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import w8a16
from w8a16 import Quantizer, W8A16LinearLayer, footprint_bytes

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")
hf = pytest.importorskip("transformers")
from onnx import numpy_helper  # noqa: E402

from w8a16.io.onnx import onnxruntime_session  # noqa: E402


def run_onnx(path, *args: torch.Tensor, fp32_activations: bool = True) -> np.ndarray:
    session = onnxruntime_session(path, fp32_activations=fp32_activations)
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)}
    return session.run(None, feeds)[0]


def assert_matches(got: np.ndarray, ref: torch.Tensor) -> None:
    ref = ref.detach().float().numpy()
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))


def quantize_quietly(model: nn.Module, exclude=()) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tied heads, MHA kept: the report says so, tested elsewhere
        return Quantizer(model, W8A16LinearLayer, list(exclude))


def initializers(path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def assert_int8_in_file(model: nn.Module, path) -> None:
    """Every quantized layer's int8 matrix is an int8 initializer of the file, bit-identical, feeding a
    per-axis DequantizeLinear whose scales are the layer's (in fp32) and whose zero point is int8 0."""
    graph = onnx.load(str(path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    dq = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    layers = [m for m in model.modules() if isinstance(m, W8A16LinearLayer)]
    assert len(dq) == len(layers) > 0
    by_weight = {n.input[0]: n for n in dq}
    for layer in layers:
        q = layer.int8_weights.numpy()
        name = next(k for k, v in inits.items() if v.dtype == np.int8 and v.shape == q.shape and np.array_equal(v, q))
        node = by_weight[name]
        assert next(a.i for a in node.attribute if a.name == "axis") == 0
        np.testing.assert_array_equal(inits[node.input[1]], layer.scales.float().numpy())
        zero_point = inits[node.input[2]]
        assert zero_point.dtype == np.int8 and not zero_point.any()
        dense = layer.dequantized_weight(torch.float32).numpy()
        for v in inits.values():  # no dequantized copy was folded into the file
            assert not (v.shape == dense.shape and np.array_equal(v, dense)), "a dequantized weight was stored"
            assert not (v.shape == dense.T.shape and np.array_equal(v, dense.T)), "a dequantized weight was stored"


def quantized_bytes(model: nn.Module) -> int:
    """What the file must hold: every tensor of the model (int8 weights at one byte) plus one int8 zero point per
    output row of each quantized layer."""
    zero_points = sum(m.out_features for m in model.modules() if isinstance(m, W8A16LinearLayer))
    return footprint_bytes(model) + zero_points


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(512, 1024), nn.GELU(), nn.Linear(1024, 256), nn.ReLU(), nn.Linear(256, 10)).eval()


@pytest.mark.parametrize("bias", [True, False])
def test_mlp_runs_in_onnxruntime_matches_and_is_int8_sized(tmp_path, bias):
    model = mlp()
    if not bias:
        for m in model:
            if isinstance(m, nn.Linear):
                m.bias = None
    fp32_path = w8a16.export_onnx(model, (torch.randn(4, 512),), tmp_path / "fp32.onnx")
    quantize_quietly(model)
    x = torch.randn(4, 512)
    path = w8a16.export_onnx(model, (x,), tmp_path / "w8a16.onnx")
    assert path == tmp_path / "w8a16.onnx"

    assert_int8_in_file(model, path)
    size, expected = os.path.getsize(path), quantized_bytes(model)
    assert expected <= size <= expected * 1.01 + 8_000  # the tensors plus a few kB of graph
    assert size < 0.27 * os.path.getsize(fp32_path)  # int8 weights: about a quarter of fp32
    with torch.no_grad():
        assert_matches(run_onnx(path, x), model(x))


def test_onnxruntime_default_quantizes_activations_and_the_session_option_stops_it(tmp_path):
    """What `onnxruntime_session` is for: with onnxruntime's default options the fused kernel computes W8A8 (a
    relative output error of ~0.7 % on this MLP, measured), with ours W8A16 (~1e-6)."""
    model = quantize_quietly(mlp())
    x = torch.randn(8, 512)
    path = w8a16.export_onnx(model, (x,), tmp_path / "m.onnx")
    with torch.no_grad():
        ref = model(x).numpy()
    rel = {fp32: np.linalg.norm(run_onnx(path, x, fp32_activations=fp32) - ref) / np.linalg.norm(ref)
           for fp32 in (True, False)}
    assert rel[True] < 1e-5
    assert 1e-3 < rel[False] < 0.05


def test_dynamic_batch(tmp_path):
    model = quantize_quietly(mlp())
    batch = torch.export.Dim("batch", min=1, max=64)
    path = w8a16.export_onnx(model, (torch.randn(3, 512),), tmp_path / "m.onnx", dynamic_shapes=({0: batch},))
    for rows in (1, 5):
        x = torch.randn(rows, 512)
        with torch.no_grad():
            assert_matches(run_onnx(path, x), model(x))


def test_leading_dimensions_and_a_bf16_quantized_layer(tmp_path):
    """(batch, seq, in) inputs, and scales stored in bf16: exported as fp32, the same values the op dequantizes."""
    linear = nn.Linear(64, 48, dtype=torch.bfloat16)
    layer = W8A16LinearLayer.from_linear(linear)
    layer.bias = layer.bias.float()  # bf16 scales, fp32 bias and input: the op accepts the mix
    model = nn.Sequential(layer).eval()
    x = torch.randn(2, 3, 64)
    path = w8a16.export_onnx(model, (x,), tmp_path / "m.onnx")
    assert_int8_in_file(model, path)
    with torch.no_grad():
        assert_matches(run_onnx(path, x), model(x))


ENCODER = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
DECODER = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
               use_cache=False)


def bert():
    return hf.BertModel(hf.BertConfig(**ENCODER)).eval(), []


def llama():
    return hf.LlamaForCausalLM(hf.LlamaConfig(num_key_value_heads=2, **DECODER)).eval(), ["lm_head"]


def gpt2():
    config = hf.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, use_cache=False, tie_word_embeddings=False)
    return hf.GPT2LMHeadModel(config).eval(), []


@pytest.mark.parametrize("build", [bert, llama, gpt2], ids=["bert-encoder", "llama-decoder", "gpt2-conv1d-decoder"])
def test_transformers_models_export_and_match(tmp_path, build):
    """A forward without cache: what a runtime that scores a whole sequence needs (prefill, classification)."""
    model, exclude = build()
    quantize_quietly(model, exclude)
    ids = torch.randint(0, 128, (2, 7))
    path = w8a16.export_onnx(model, (ids,), tmp_path / "m.onnx")
    assert_int8_in_file(model, path)
    size, expected = os.path.getsize(path), quantized_bytes(model)
    int8_bytes = sum(m.int8_weights.numel() for m in model.modules() if isinstance(m, W8A16LinearLayer))
    assert int8_bytes < size <= expected * 1.05 + 30_000  # the tensors plus the graph (~25 kB for 2 layers)
    with torch.no_grad():
        out = model(ids)
    ref = out.logits if hasattr(out, "logits") else out.last_hidden_state
    assert_matches(run_onnx(path, ids), ref)


def test_transformer_encoder_attention_stays_float(tmp_path):
    """nn.TransformerEncoder: the FFN Linears export as int8; MultiheadAttention (kept float by the Quantizer)
    exports as float."""
    layer = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True, dropout=0.0)
    model = quantize_quietly(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval())
    assert len(model.w8a16_report.replaced) == 4
    x = torch.randn(2, 7, 64)
    path = w8a16.export_onnx(model, (x,), tmp_path / "m.onnx")
    assert_int8_in_file(model, path)
    with torch.no_grad():
        assert_matches(run_onnx(path, x), model(x))


def test_missing_onnx_raises_an_import_error_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # `import onnxscript` now raises ImportError
    with pytest.raises(ImportError, match=r"w8a16\[onnx\]"):
        w8a16.export_onnx(quantize_quietly(mlp()), (torch.randn(1, 512),), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_import_w8a16_does_not_import_onnx():
    code = ("import sys, w8a16; print(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('onnx', 'onnxscript', 'onnx_ir', 'onnxruntime') or m.startswith('torch.onnx')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=os.path.dirname(os.path.dirname(w8a16.__file__)))
    assert done.stdout.strip() == "[]"


def test_a_causal_lm_with_its_default_kv_cache_exports_and_keeps_its_setting(tmp_path):
    """A transformers LM as users have it (use_cache=True): exported without the cache, and left as it was."""
    model = hf.LlamaForCausalLM(hf.LlamaConfig(num_key_value_heads=2, **{**DECODER, "use_cache": True})).eval()
    quantize_quietly(model, ["lm_head"])
    ids = torch.randint(0, 128, (1, 5))
    path = w8a16.export_onnx(model, (ids,), tmp_path / "m.onnx")
    assert model.config.use_cache is True
    with torch.no_grad():
        assert_matches(run_onnx(path, ids), model(ids).logits)
