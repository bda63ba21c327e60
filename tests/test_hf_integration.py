"""w8a16.io.hf: ``from_pretrained(quantization_config=W8A16Config(...))``, ``save_pretrained``/``from_pretrained`` round
trips, device_map offload, pipeline, and the memory of quantizing while loading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

import w8a16
from w8a16 import Quantizer, W8A16Config, W8A16LinearLayer

VOCAB = 96
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}


def _llama() -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))


def _gpt2() -> GPT2LMHeadModel:  # Conv1D layers, lm_head tied to the embeddings
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                      bos_token_id=0, eos_token_id=0))


def _bert() -> BertForMaskedLM:  # encoder-only, decoder tied to the embeddings
    return BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=96, max_position_embeddings=64))


def _t5() -> T5ForConditionalGeneration:  # encoder-decoder
    return T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=96, num_layers=2,
                                               num_heads=4, decoder_start_token_id=0))


ARCHS: dict[str, Callable[[], torch.nn.Module]] = {"llama": _llama, "gpt2": _gpt2, "bert": _bert, "t5": _t5}
IDS = torch.tensor([[3, 17, 42, 5, 60, 11, 7]])


def logits(model: torch.nn.Module) -> torch.Tensor:
    kwargs = {"decoder_input_ids": IDS[:, :4]} if model.config.is_encoder_decoder else {}
    with torch.no_grad():
        return model(IDS, **kwargs).logits


def float_checkpoint(tmp_path: Path, arch: str, dtype: torch.dtype) -> Path:
    """A float checkpoint saved as a user's would be; models are compared only after loading it, so that both
    sides have the buffers from_pretrained computes (a from_config model cast with .to() differs there)."""
    torch.manual_seed(0)
    path = tmp_path / f"{arch}-float"
    ARCHS[arch]().to(dtype).save_pretrained(path)
    return path


def auto_class(arch: str):
    return {"bert": BertForMaskedLM, "t5": T5ForConditionalGeneration}.get(arch, AutoModelForCausalLM)


def load(path: Path, arch: str, **kwargs) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the walker's warnings (tied lm_head kept...) are tested elsewhere
        return auto_class(arch).from_pretrained(path, **kwargs).eval()


def quantized_by_walker(path: Path, arch: str, dtype: torch.dtype, exclude=("lm_head",)) -> torch.nn.Module:
    model = load(path, arch, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Quantizer(model, W8A16LinearLayer, list(exclude))


def assert_same_model(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key
    assert torch.equal(logits(a), logits(b))


def w8a16_modules(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, W8A16LinearLayer)]


# ---- quantizing while loading ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_quantize_while_loading_is_bit_identical_to_quantizer(tmp_path: Path, arch: str, dtype: torch.dtype) -> None:
    path = float_checkpoint(tmp_path, arch, dtype)
    loaded = load(path, arch, quantization_config=W8A16Config(exclude=["lm_head"]), dtype=dtype)
    walked = quantized_by_walker(path, arch, dtype)
    assert_same_model(loaded, walked)
    assert w8a16_modules(loaded) == walked.w8a16_report.replaced
    assert loaded.config.quantization_config.modules == walked.w8a16_report.replaced
    assert loaded.w8a16_report.replaced == walked.w8a16_report.replaced
    assert loaded.w8a16_report.kept == walked.w8a16_report.kept
    assert loaded.is_quantized and not any(type(m).__name__ == "FloatWeightSlot" for m in loaded.modules())


def test_tied_head_is_kept_while_loading_and_quantize_tied_is_refused(tmp_path: Path) -> None:
    path = float_checkpoint(tmp_path, "gpt2", torch.float32)
    model = load(path, "gpt2", quantization_config=W8A16Config())
    assert "lm_head" in model.w8a16_report.kept and "tied" in model.w8a16_report.kept["lm_head"]
    assert model.lm_head.weight is model.transformer.wte.weight
    with pytest.raises(ValueError, match=r"quantize_tied=True\) cannot quantize while loading"):
        load(path, "gpt2", quantization_config=W8A16Config(quantize_tied=True))


# ---- save_pretrained -> from_pretrained --------------------------------------------------------------------


@pytest.mark.parametrize("how", ["while-loading", "quantizer"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_save_pretrained_round_trip(tmp_path: Path, arch: str, how: str) -> None:
    path = float_checkpoint(tmp_path, arch, torch.bfloat16)
    if how == "quantizer":
        model = quantized_by_walker(path, arch, torch.bfloat16)
    else:
        model = load(path, arch, quantization_config=W8A16Config(exclude=["lm_head"]), dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "q")

    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "w8a16" and config["modules"] == w8a16_modules(model)
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        for name in w8a16_modules(model):  # int8 on disk, and no float copy of the weight
            assert f.get_slice(f"{name}.int8_weights").get_dtype() == "I8"
            assert f"{name}.weight" not in keys

    back = load(tmp_path / "q", arch)  # no quantization_config argument: the saved config says it all
    assert w8a16_modules(back) == w8a16_modules(model)
    assert_same_model(back, model)
    assert back.dtype == torch.bfloat16
    back.save_pretrained(tmp_path / "again")  # and round again
    assert_same_model(load(tmp_path / "again", arch), model)


def test_quantize_tied_head_round_trip(tmp_path: Path) -> None:
    """Quantizer(quantize_tied=True) unties the head; the saved config says so, or transformers would re-tie it."""
    path = float_checkpoint(tmp_path, "gpt2", torch.float32)
    model = load(path, "gpt2")
    Quantizer(model, W8A16LinearLayer, [], quantize_tied=True)
    assert isinstance(model.lm_head, W8A16LinearLayer)
    model.save_pretrained(tmp_path / "q")
    back = load(tmp_path / "q", "gpt2")
    assert isinstance(back.lm_head, W8A16LinearLayer) and not back.config.tie_word_embeddings
    assert_same_model(back, model)


def test_one_format_save_quantized_and_save_pretrained_read_each_other(tmp_path: Path) -> None:
    path = float_checkpoint(tmp_path, "llama", torch.bfloat16)
    model = quantized_by_walker(path, "llama", torch.bfloat16)
    w8a16.save_quantized(model, tmp_path / "sq")
    model.save_pretrained(tmp_path / "sp")
    assert_same_model(load(tmp_path / "sq", "llama"), model)  # the non-persistent tables it also stores: ignored
    assert_same_model(w8a16.load_quantized(tmp_path / "sp"), model)


def test_a_quantized_non_transformers_model_is_left_alone() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(8, 8))
    Quantizer(net, W8A16LinearLayer)
    assert not hasattr(net, "config") and not hasattr(net, "hf_quantizer")


# ---- registration ------------------------------------------------------------------------------------------


LOAD_SAVED = """
import sys, torch
{imports}
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
print(type(model.model.layers[0].mlp.up_proj).__name__)
"""


@pytest.mark.parametrize("imports", ["import w8a16", "import transformers.modeling_utils\nimport w8a16"],
                         ids=["w8a16-first", "transformers-first"])
def test_import_w8a16_is_enough_to_load_a_saved_model(tmp_path: Path, imports: str) -> None:
    path = float_checkpoint(tmp_path, "llama", torch.bfloat16)
    quantized_by_walker(path, "llama", torch.bfloat16).save_pretrained(tmp_path / "q")
    done = subprocess.run([sys.executable, "-c", LOAD_SAVED.format(imports=imports), str(tmp_path / "q")],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["W8A16LinearLayer"]


def test_import_w8a16_does_not_import_transformers() -> None:
    code = "import sys, w8a16; print('transformers' in sys.modules, 'w8a16.io.hf' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert done.stdout.split() == ["False", "False"], done.stderr


# ---- bad input: a config or a checkpoint is data -----------------------------------------------------------


def _edit_config(directory: Path, edit: Callable[[dict], None]) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    edit(config["quantization_config"])
    path.write_text(json.dumps(config))


def _edit_tensor(directory: Path, key: str, change: Callable[[torch.Tensor], torch.Tensor]) -> None:
    path = str(directory / "model.safetensors")
    tensors = load_file(path)
    tensors[key] = change(tensors[key])
    save_file(tensors, path, metadata={"format": "pt"})


UP = "model.layers.0.mlp.up_proj"
BAD_INPUTS = {
    "unknown-field": (lambda d: _edit_config(d, lambda c: c.update(run_me="now")), "unknown field"),
    "newer-format": (lambda d: _edit_config(d, lambda c: c.update(format_version=2)), "format_version 2"),
    "modules-not-a-list": (lambda d: _edit_config(d, lambda c: c.update(modules="lm_head")), "list of module names"),
    "module-missing": (lambda d: _edit_config(d, lambda c: c["modules"].append("model.nope")), "'model.nope'"),
    "module-not-linear": (lambda d: _edit_config(d, lambda c: c["modules"].append("model.norm")),
                          "'model.norm' is a LlamaRMSNorm"),
    "quantize-tied-not-bool": (lambda d: _edit_config(d, lambda c: c.update(quantize_tied="yes")), "true or false"),
    "float-int8-weights": (lambda d: _edit_tensor(d, f"{UP}.int8_weights", lambda t: t.float()),
                           f"{UP}.int8_weights must be stored as int8"),
    "integer-scales": (lambda d: _edit_tensor(d, f"{UP}.scales", lambda t: t.to(torch.int32)),
                       f"{UP}.scales must be stored as floating point"),
    "nan-scales": (lambda d: _edit_tensor(d, f"{UP}.scales", lambda t: t * float("nan")), f"{UP}.scales holds NaN"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_a_damaged_saved_model_raises_naming_what(tmp_path: Path, case: str) -> None:
    damage, words = BAD_INPUTS[case]
    path = float_checkpoint(tmp_path, "llama", torch.float32)
    quantized_by_walker(path, "llama", torch.float32).save_pretrained(tmp_path / "q")
    damage(tmp_path / "q")
    with pytest.raises(ValueError) as caught:
        load(tmp_path / "q", "llama")
    assert words in str(caught.value)


@pytest.mark.parametrize("bad", [{"exclude": 3}, {"exclude": [""]}, {"modules": [None]}, {"quant_method": "gptq"}])
def test_config_arguments_are_checked(bad: dict) -> None:
    with pytest.raises(ValueError, match="W8A16Config"):
        W8A16Config(**bad)


def test_config_round_trips_through_a_dict() -> None:
    config = W8A16Config(exclude="lm_head")
    config.error_stats = {"x": 1}  # runtime only
    again = W8A16Config.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict() and again.exclude == ["lm_head"] and again.error_stats is None
    assert "error_stats" not in config.to_dict()


# ---- device_map: CPU and disk offload ----------------------------------------------------------------------


@pytest.mark.parametrize("offload_buffers", [False, True])
@pytest.mark.parametrize("source", ["float", "saved"])
def test_device_map_with_disk_offload(tmp_path: Path, source: str, offload_buffers: bool) -> None:
    pytest.importorskip("accelerate")
    path = float_checkpoint(tmp_path, "llama", torch.bfloat16)
    reference = load(path, "llama", quantization_config=W8A16Config(exclude=["lm_head"]), dtype=torch.bfloat16)
    kwargs = {"quantization_config": W8A16Config(exclude=["lm_head"]), "dtype": torch.bfloat16}
    if source == "saved":
        reference.save_pretrained(tmp_path / "q")
        path, kwargs = tmp_path / "q", {}
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = load(path, "llama", device_map=device_map, offload_folder=tmp_path / "offload",
                 offload_buffers=offload_buffers, **kwargs)
    offloaded = model.model.layers[1].mlp.up_proj
    assert isinstance(offloaded, W8A16LinearLayer)
    assert offloaded.int8_weights.is_meta == offload_buffers  # on disk between calls, or kept in memory
    for _ in range(2):  # accelerate puts the weights in before each call and takes them out after
        assert torch.equal(logits(model), logits(reference))


def test_device_map_auto_everything_on_disk(tmp_path: Path) -> None:
    pytest.importorskip("accelerate")
    path = float_checkpoint(tmp_path, "llama", torch.bfloat16)
    reference = quantized_by_walker(path, "llama", torch.bfloat16)
    reference.save_pretrained(tmp_path / "q")
    model = load(tmp_path / "q", "llama", device_map="auto", max_memory={"cpu": "10KB"},
                 offload_folder=tmp_path / "offload")
    assert set(model.hf_device_map.values()) == {"disk"}
    assert torch.equal(logits(model), logits(reference))


# ---- pipeline ----------------------------------------------------------------------------------------------


def test_text_generation_pipeline_as_the_seed_writes_it(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, pipeline

    words = [f"w{i}" for i in range(VOCAB)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w1"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w1", eos_token="w0", pad_token="w0")
    path = float_checkpoint(tmp_path, "llama", torch.bfloat16)
    model = quantized_by_walker(path, "llama", torch.bfloat16)

    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
    out = pipe("w3 w17 w42", max_new_tokens=6, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    ids = tokenizer("w3 w17 w42", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert list(out) == expected[0].tolist() and len(out) == ids.shape[1] + 6


# ---- memory ------------------------------------------------------------------------------------------------


MEASURE = """
import gc, json, sys, threading, torch, w8a16
from transformers import CodeGenForCausalLM
from w8a16.io.cli import _rss_anon
torch.ones(8, 8) @ torch.ones(8, 8)
gc.collect()
baseline = _rss_anon(); peak = [baseline]; stop = threading.Event()
def poll():
    while not stop.is_set():
        peak[0] = max(peak[0], _rss_anon()); stop.wait(0.0005)
poller = threading.Thread(target=poll, daemon=True); poller.start()
model = CodeGenForCausalLM.from_pretrained(sys.argv[1], quantization_config=w8a16.W8A16Config(exclude=["lm_head"]),
                                           dtype=torch.bfloat16)
stop.set(); poller.join(); peak[0] = max(peak[0], _rss_anon())
print(json.dumps({"extra": peak[0] - baseline, "quantized": w8a16.footprint_bytes(model),
                  "layers": len(model.w8a16_report.replaced)}))
"""


def test_quantizing_codegen_350m_while_loading_peaks_near_the_quantized_size(tmp_path: Path) -> None:
    """The float model (713 MB in bf16) is never in memory: peak anonymous memory while loading stays within
    1.3x the quantized footprint (462 MB). Measured in a fresh process, polling RssAnon every 0.5 ms."""
    from w8a16.course.models import build_random_codegen

    build_random_codegen(torch.bfloat16).save_pretrained(tmp_path / "codegen")
    done = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "codegen")], capture_output=True,
                          text=True, env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["layers"] == 80
    assert got["extra"] <= 1.3 * got["quantized"], got


def test_quantizing_while_loading_returns_freed_memory_before_each_layer(tmp_path: Path, monkeypatch) -> None:
    """glibc may otherwise keep every float tensor the loader freed (1.3 GB for CodeGen-350M in one CI run; see
    `w8a16.ops.cpu.return_freed_heap`)."""
    import w8a16.layer

    calls = []
    monkeypatch.setattr(w8a16.layer, "return_freed_heap", lambda: calls.append(1))
    path = float_checkpoint(tmp_path, "llama", torch.float32)
    model = load(path, "llama", quantization_config=W8A16Config(exclude=["lm_head"]))
    assert len(calls) == len(model.w8a16_report.replaced) > 0


def test_dequantize_gives_float_linears_with_the_quantized_values(tmp_path: Path) -> None:
    path = float_checkpoint(tmp_path, "gpt2", torch.float32)
    model = load(path, "gpt2", quantization_config=W8A16Config())
    expected = logits(model)
    up = model.transformer.h[0].mlp.c_fc.dequantized_weight()
    model.dequantize()
    assert not w8a16_modules(model) and not hasattr(model.config, "quantization_config")
    assert isinstance(model.transformer.h[0].mlp.c_fc, torch.nn.Linear)
    assert torch.equal(model.transformer.h[0].mlp.c_fc.weight, up)
    assert torch.allclose(logits(model), expected, atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path / "float-again")  # a plain float model now
    assert "quantization_config" not in json.loads((tmp_path / "float-again" / "config.json").read_text())


def test_quantizing_one_model_leaves_a_model_sharing_its_config_float(tmp_path: Path) -> None:
    """Notebooks build several models from one config object; Quantizer marks only the quantized one."""
    config = _llama().config
    quantized, twin = LlamaForCausalLM(config), LlamaForCausalLM(config)
    assert quantized.config is twin.config
    Quantizer(quantized, W8A16LinearLayer, ["lm_head"])
    assert quantized.config.quantization_config.modules and getattr(twin.config, "quantization_config", None) is None
    assert quantized.model.config is quantized.config  # the base model follows the copy
    twin.save_pretrained(tmp_path / "float")
    assert "quantization_config" not in json.loads((tmp_path / "float" / "config.json").read_text())


def test_a_float_checkpoint_with_a_w8a16_config_is_refused(tmp_path: Path) -> None:
    path = float_checkpoint(tmp_path, "llama", torch.float32)
    quantized = quantized_by_walker(path, "llama", torch.float32)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = quantized.config.quantization_config.to_dict()
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="the checkpoint has no model.layers.0.self_attn.q_proj.int8_weights"):
        load(path, "llama")


# ---- Conv2d (vision models) --------------------------------------------------------------------------------


def _tiny_detr_checkpoint(tmp_path: Path) -> Path:
    from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig

    backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="bottleneck",
                            out_features=["stage2"], out_indices=[2])
    config = DetrConfig(use_timm_backbone=False, backbone=None, backbone_config=backbone, use_pretrained_backbone=False,
                        d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=4,
                        num_labels=5)
    torch.manual_seed(0)
    DetrForObjectDetection(config).save_pretrained(tmp_path / "detr-float")
    return tmp_path / "detr-float"


def _detr_outputs(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = model(pixel_values=pixels)
    return out.logits, out.pred_boxes


def test_conv2d_quantized_while_loading_and_round_trip(tmp_path: Path) -> None:
    from transformers import DetrForObjectDetection
    from w8a16 import W8A16Conv2d

    path = _tiny_detr_checkpoint(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        on_load = DetrForObjectDetection.from_pretrained(path, quantization_config=W8A16Config(conv2d=True)).eval()
        walked = Quantizer(DetrForObjectDetection.from_pretrained(path).eval(), [W8A16LinearLayer, W8A16Conv2d])
    convs = [n for n, m in walked.named_modules() if isinstance(m, W8A16Conv2d)]
    assert len(convs) >= 5 and walked.w8a16_report.replaced == on_load.w8a16_report.replaced
    assert on_load.config.quantization_config.conv2d and walked.config.quantization_config.conv2d
    for key, value in walked.state_dict().items():
        assert torch.equal(on_load.state_dict()[key], value), key
    for a, b in zip(_detr_outputs(on_load), _detr_outputs(walked)):
        assert torch.equal(a, b)

    walked.save_pretrained(tmp_path / "detr-q")
    back = DetrForObjectDetection.from_pretrained(tmp_path / "detr-q").eval()
    assert [n for n, m in back.named_modules() if isinstance(m, W8A16Conv2d)] == convs
    for a, b in zip(_detr_outputs(back), _detr_outputs(walked)):
        assert torch.equal(a, b)

    back.dequantize()  # and back to float layers holding the quantized values
    assert not any(isinstance(m, (W8A16LinearLayer, W8A16Conv2d)) for m in back.modules())
    for a, b in zip(_detr_outputs(back), _detr_outputs(walked)):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
