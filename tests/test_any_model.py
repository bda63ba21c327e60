"""`Quantizer` on any PyTorch model: transformers architectures (tiny configs, random weights, offline) and plain
torch.nn models, including ones that read a Linear's ``.weight`` themselves."""

import copy
import io
import pickle
import warnings

import pytest
import torch
import transformers as hf
from torch import nn
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D

from w8a16 import Quantizer, W8A16LinearLayer, footprint_bytes, load_quantized, save_quantized

VOCAB = 256
FP32_TOL, BF16_TOL = 0.03, 0.05  # ‖out − ref‖ / ‖ref‖; int8 per-channel on these models measures 0.2–1.4 %


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def quantize_quietly(model: nn.Module) -> nn.Module:
    """`Quantizer` with its warnings (tied heads) recorded: the report is checked instead."""
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        return Quantizer(model, W8A16LinearLayer)


def assert_every_matrix_accounted_for(model: nn.Module) -> None:
    """Each Linear-like weight was replaced or is in ``report.kept`` with a reason: nothing was skipped silently."""
    report = model.w8a16_report
    quantized = [n for n, m in model.named_modules() if isinstance(m, W8A16LinearLayer)]
    assert sorted(report.replaced) == sorted(quantized)
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, Conv1D)):
            assert name in report.kept, f"{name} ({type(module).__name__}) was neither quantized nor reported"
        elif isinstance(module, nn.MultiheadAttention):
            assert f"{name}.in_proj_weight" in report.kept
        elif not isinstance(module, (nn.Embedding, W8A16LinearLayer)):
            weight = module._parameters.get("weight")
            assert weight is None or weight.dim() != 2 or name in report.kept, f"{name} has an unreported 2-D weight"
    assert all(isinstance(why, str) and why for why in report.kept.values())


# --- transformers architectures ---------------------------------------------------------------------------------


def text():
    return {"input_ids": torch.randint(3, VOCAB, (2, 12))}


def seq2seq():
    return {"input_ids": torch.randint(3, VOCAB, (2, 12)), "decoder_input_ids": torch.randint(3, VOCAB, (2, 7))}


def image():
    return {"pixel_values": torch.randn(2, 3, 32, 32)}


DECODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
               max_position_embeddings=64)
ENCODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
               max_position_embeddings=70)
GPT2 = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=1, eos_token_id=2)

# name -> (model, inputs, the layers expected in report.kept: each one an lm_head tied to the input embeddings)
ARCHITECTURES = {
    "gpt2": (lambda: hf.GPT2LMHeadModel(hf.GPT2Config(**GPT2)), text, ["lm_head"]),
    "llama": (lambda: hf.LlamaForCausalLM(hf.LlamaConfig(num_key_value_heads=2, **DECODER)), text, []),
    "mistral": (lambda: hf.MistralForCausalLM(hf.MistralConfig(num_key_value_heads=2, **DECODER)), text, []),
    "qwen2": (lambda: hf.Qwen2ForCausalLM(hf.Qwen2Config(num_key_value_heads=2, **DECODER)), text, []),
    "gpt_neox": (lambda: hf.GPTNeoXForCausalLM(hf.GPTNeoXConfig(**DECODER)), text, []),
    "opt": (
        lambda: hf.OPTForCausalLM(hf.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                               vocab_size=VOCAB, max_position_embeddings=64, word_embed_proj_dim=64)),
        text, ["lm_head"],
    ),
    "codegen": (
        lambda: hf.CodeGenForCausalLM(hf.CodeGenConfig(n_layer=2, n_embd=64, n_head=4, rotary_dim=8, vocab_size=VOCAB,
                                                       n_positions=64, n_ctx=64, bos_token_id=1, eos_token_id=2)),
        text, [],
    ),
    "bert": (lambda: hf.BertForMaskedLM(hf.BertConfig(**ENCODER)), text, ["cls.predictions.decoder"]),
    "roberta": (lambda: hf.RobertaForMaskedLM(hf.RobertaConfig(**ENCODER)), text, ["lm_head.decoder"]),
    "distilbert": (
        lambda: hf.DistilBertForMaskedLM(hf.DistilBertConfig(dim=64, hidden_dim=128, n_layers=2, n_heads=4,
                                                             vocab_size=VOCAB, max_position_embeddings=64)),
        text, ["vocab_projector"],
    ),
    "t5": (
        lambda: hf.T5ForConditionalGeneration(hf.T5Config(d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4,
                                                          vocab_size=VOCAB, decoder_start_token_id=0)),
        seq2seq, ["lm_head"],
    ),
    "bart": (
        # init_std 0.1 (default 0.02): with tiny weights the residual stream is all embeddings and the output would
        # barely depend on the Linear layers under test (0.03 % error instead of ~1 %).
        lambda: hf.BartForConditionalGeneration(hf.BartConfig(
            d_model=64, encoder_ffn_dim=128, decoder_ffn_dim=128, encoder_layers=2, decoder_layers=2,
            encoder_attention_heads=4, decoder_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=64,
            init_std=0.1)),
        seq2seq, ["lm_head"],
    ),
    "vit": (
        lambda: hf.ViTForImageClassification(hf.ViTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                          num_attention_heads=4, image_size=32, patch_size=8,
                                                          num_labels=10)),
        image, [],
    ),
}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_architecture_quantized_reported_smaller_close_and_runs_in_bf16(arch):
    build, make_inputs, tied_heads = ARCHITECTURES[arch]
    model, inputs = build().eval(), make_inputs()
    with torch.no_grad():
        ref = model(**inputs).logits
    before = footprint_bytes(model)

    quantize_quietly(model)
    report = model.w8a16_report
    assert_every_matrix_accounted_for(model)
    assert len(report.replaced) >= 8
    assert sorted(report.kept) == tied_heads and all("tied" in report.kept[n] for n in tied_heads)
    assert report.bytes_before == before and report.bytes_after == footprint_bytes(model) < 0.7 * before
    with torch.no_grad():
        out = model(**inputs).logits
    assert rel_error(out, ref) < FP32_TOL

    model.to(torch.bfloat16)
    bf16 = {k: v.bfloat16() if v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad():
        out = model(**bf16).logits
    assert out.dtype == torch.bfloat16 and rel_error(out, ref) < BF16_TOL


def test_gpt2_conv1d_all_quantized_when_untied_and_generate_works():
    model = hf.GPT2LMHeadModel(hf.GPT2Config(tie_word_embeddings=False, **GPT2)).eval()
    ids = torch.randint(3, VOCAB, (1, 6))
    with torch.no_grad():
        ref = model(ids).logits
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about
        Quantizer(model, W8A16LinearLayer)
    assert not [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]
    assert model.w8a16_report.kept == {} and len(model.w8a16_report.replaced) == 9
    with torch.no_grad():
        assert rel_error(model(ids).logits, ref) < FP32_TOL
    assert model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0).shape == (1, 9)


def test_conv1d_becomes_the_linear_it_is():
    conv = Conv1D(nf=24, nx=40)  # weight (in, out) = (40, 24); y = x @ W + b
    with torch.no_grad():
        conv.bias.normal_()
    layer = W8A16LinearLayer.from_linear(conv)
    assert (layer.in_features, layer.out_features) == (40, 24) and layer.int8_weights.is_contiguous()
    same = W8A16LinearLayer(40, 24)
    same.quantize(conv.weight.t().contiguous())
    assert torch.equal(layer.int8_weights, same.int8_weights) and torch.equal(layer.scales, same.scales)
    x = torch.randn(3, 5, 40)
    torch.testing.assert_close(layer(x), x @ layer.weight.T + conv.bias, rtol=1e-5, atol=1e-5)
    assert rel_error(layer(x), conv(x)) < 0.01


def test_gpt2_save_load(tmp_path):
    model = quantize_quietly(hf.GPT2LMHeadModel(hf.GPT2Config(**{**GPT2, "n_layer": 1})).eval())
    save_quantized(model, tmp_path)
    loaded = load_quantized(tmp_path)
    ids = torch.randint(3, VOCAB, (1, 6))
    assert torch.equal(loaded(ids).logits, model(ids).logits)


# --- plain torch.nn models --------------------------------------------------------------------------------------


def transformer_encoder(batch_first: bool) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=batch_first)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()


@pytest.mark.parametrize("batch_first", [True, False])  # True: torch's fused encoder path reads every .weight
def test_transformer_encoder_ffn_quantized_attention_kept_with_reasons(batch_first):
    model = transformer_encoder(batch_first)
    x = torch.randn(2, 10, 64) if batch_first else torch.randn(10, 2, 64)
    with torch.no_grad():
        ref = model(x)
    with pytest.warns(UserWarning, match=r"kept 4 Linear-like weight\(s\).*layers\.0\.self_attn\.in_proj_weight"):
        Quantizer(model, W8A16LinearLayer)
    report = model.w8a16_report
    assert_every_matrix_accounted_for(model)
    assert report.replaced == [f"layers.{i}.{n}" for i in range(2) for n in ("linear1", "linear2")]
    assert list(report.kept) == [f"layers.{i}.self_attn.{n}" for i in range(2) for n in ("in_proj_weight", "out_proj")]
    assert "not a Linear layer" in report.kept["layers.0.self_attn.in_proj_weight"]
    assert "never calls it" in report.kept["layers.1.self_attn.out_proj"]
    assert report.bytes_after < report.bytes_before
    with torch.no_grad():
        assert rel_error(model(x), ref) < FP32_TOL

    model.train()  # the unfused path, with autograd through the quantized layers and into the kept attention
    x.requires_grad_(True)
    model(x).square().sum().backward()
    assert torch.isfinite(x.grad).all() and model.layers[0].self_attn.in_proj_weight.grad is not None

    model.eval().to(torch.bfloat16)
    with torch.no_grad():
        assert rel_error(model(x.detach().bfloat16()), ref) < BF16_TOL


def test_multihead_attention_out_proj_quantized_by_hand_works():
    """What the report's reason offers: it runs, through `weight`, dequantizing out_proj on every call."""
    mha = nn.MultiheadAttention(64, 4, batch_first=True).eval()
    x = torch.randn(2, 7, 64)
    with torch.no_grad():
        ref = mha(x, x, x)[0]
        mha.out_proj = W8A16LinearLayer.from_linear(mha.out_proj)
        assert rel_error(mha(x, x, x)[0], ref) < FP32_TOL


def test_sequential_mlp():
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    x = torch.randn(8, 32)
    ref = model(x).detach()
    Quantizer(model, W8A16LinearLayer)
    assert model.w8a16_report.replaced == ["0", "2", "4"] and model.w8a16_report.kept == {}
    with torch.no_grad():
        assert rel_error(model(x), ref) < FP32_TOL
        assert rel_error(model.to(torch.bfloat16)(x.bfloat16()), ref) < BF16_TOL


class ReadsWeight(nn.Module):
    """Code found in the wild: a forward that looks at a Linear's ``.weight`` (dtype; or uses it with F.linear)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(32, 48)
        self.out = nn.Linear(48, 16)

    def forward(self, x):
        if self.proj.weight.dtype != torch.int8:
            x = x.to(self.proj.weight.dtype)
        return F.linear(torch.tanh(self.proj(x)), self.out.weight, self.out.bias)


def test_model_reading_weight_keeps_working_in_fp32_and_bf16():
    model = ReadsWeight().eval()
    x = torch.randn(4, 32)
    ref = model(x).detach()
    Quantizer(model, W8A16LinearLayer)
    assert model.w8a16_report.replaced == ["proj", "out"]
    with torch.no_grad():
        assert rel_error(model(x), ref) < FP32_TOL
        model.to(torch.bfloat16)
        out = model(x)  # fp32 input cast to the weight's dtype by the model itself
    assert out.dtype == torch.bfloat16 and rel_error(out, ref) < BF16_TOL


def test_model_reading_weight_exports_and_saves(tmp_path):
    model = Quantizer(ReadsWeight().eval(), W8A16LinearLayer)
    x = torch.randn(4, 32)
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), model(x))

    save_quantized(model, tmp_path)
    loaded = load_quantized(tmp_path, ReadsWeight())
    assert isinstance(loaded.proj, W8A16LinearLayer) and torch.equal(loaded(x), model(x))


# --- the `weight` property --------------------------------------------------------------------------------------


def test_weight_property_is_the_dequantized_matrix_and_nothing_else():
    linear = nn.Linear(24, 10, dtype=torch.bfloat16)
    layer = W8A16LinearLayer.from_linear(linear)
    w = layer.weight
    assert w.shape == (10, 24) and w.dtype == torch.bfloat16 and w.device == layer.int8_weights.device
    assert torch.equal(w, layer.dequantized_weight())
    assert w is not layer.weight  # a new dense tensor each access
    assert set(layer.state_dict()) == {"int8_weights", "scales", "bias"}
    assert "weight" not in dict(layer.named_parameters()) | dict(layer.named_buffers())
    with pytest.raises(AttributeError):
        layer.weight = torch.zeros(10, 24)
    with pytest.raises(KeyError):  # nn.Module refuses a parameter of a name the class already uses
        layer.weight = nn.Parameter(torch.zeros(10, 24))

    fresh = W8A16LinearLayer(24, 10, dtype=torch.bfloat16)
    fresh.load_state_dict(layer.state_dict())
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    for twin in (fresh, copy.deepcopy(layer), pickle.loads(pickle.dumps(layer)), torch.load(buf, weights_only=False)):
        assert torch.equal(twin.weight, w)
    wide = copy.deepcopy(layer).to(torch.float32)
    assert wide.weight.dtype == torch.float32 and wide.int8_weights.dtype == torch.int8
