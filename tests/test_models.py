"""w8a16.course.models: the real loaders are tried first; offline, an honest random-weight model of the same architecture."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from w8a16 import Quantizer, W8A16LinearLayer
from w8a16.course import models as M

transformers = pytest.importorskip("transformers")
from transformers import CodeGenConfig, CodeGenForCausalLM, DetrConfig, DetrForObjectDetection  # noqa: E402
from transformers.initialization import no_init_weights  # noqa: E402


# ---- tiny configs, so most tests run in well under a second ------------------------------------------------------


_SHIPPED = M.shipped_config  # the real reader, before any test patches it


def tiny_codegen_config() -> dict:
    config = _SHIPPED("codegen-350M-mono")
    config.update(n_embd=64, n_head=4, n_layer=2, rotary_dim=8, vocab_size=300, n_positions=64, n_ctx=64)
    return config


def tiny_detr_config() -> dict:
    config = _SHIPPED("detr-resnet-50")
    config.update(
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_ffn_dim=64, decoder_ffn_dim=64,
        encoder_attention_heads=2, decoder_attention_heads=2, num_queries=10,
    )
    config["backbone_config"] = {
        "model_type": "resnet", "embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1],
        "layer_type": "basic", "out_features": ["stage2"],
    }
    return config


@pytest.fixture
def tiny_configs(monkeypatch):
    """Make the loaders' fallback build tiny models (same code path, shipped values overridden)."""
    tiny = {"codegen-350M-mono": tiny_codegen_config, "detr-resnet-50": tiny_detr_config}
    monkeypatch.setattr(M, "shipped_config", lambda name: tiny[name]())


@pytest.fixture
def no_hub(monkeypatch):
    """No network and nothing cached: from_pretrained fails as it does on an air-gapped machine."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(M, "hub_reachable", lambda timeout=3.0: False)

    def refuse(*args, **kwargs):
        raise OSError("not in the local cache (test)")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.DetrForObjectDetection, "from_pretrained", refuse)


# ---- the shipped configs are the real architectures -------------------------------------------------------------


def _meta_params(model_cls, config) -> int:
    with torch.device("meta"), no_init_weights():
        return M.count_parameters(model_cls(config))


def test_shipped_codegen_config_is_codegen_350m_mono():
    config = CodeGenConfig.from_dict(M.shipped_config("codegen-350M-mono"))
    assert (config.n_embd, config.n_head, config.n_layer, config.rotary_dim) == (1024, 16, 20, 32)
    assert (config.vocab_size, config.n_positions, config.n_ctx) == (51200, 2048, 2048)
    assert config.activation_function == "gelu_new" and config.tie_word_embeddings is False
    assert (config.bos_token_id, config.eos_token_id) == (1, 50256)
    assert _meta_params(CodeGenForCausalLM, config) == 356_712_448  # codegen-350M-mono: 356.7 M


def test_shipped_detr_config_is_detr_resnet_50_no_timm():
    config = DetrConfig.from_dict(M.shipped_config("detr-resnet-50"))
    assert config.backbone_config.model_type == "resnet" and list(config.backbone_config.out_features) == ["stage4"]
    assert config.backbone_config.depths == [3, 4, 6, 3] and config.backbone_config.layer_type == "bottleneck"
    assert (config.d_model, config.encoder_layers, config.decoder_layers, config.num_queries) == (256, 6, 6, 100)
    assert (config.encoder_attention_heads, config.encoder_ffn_dim) == (8, 2048)
    assert config.num_labels == 91
    labels = config.id2label
    assert labels[1] == "person" and labels[90] == "toothbrush" and labels[18] == "dog"
    assert sorted(i for i, name in labels.items() if name == "N/A") == [0, 12, 26, 29, 30, 45, 66, 68, 69, 71, 83]
    assert _meta_params(DetrForObjectDetection, config) == 41_524_768  # detr-resnet-50: 41.5 M


# ---- the real path is tried first ----------------------------------------------------------------------------


def test_from_pretrained_is_tried_first_when_the_hub_is_reachable(monkeypatch, capsys):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(M, "hub_reachable", lambda timeout=3.0: True)
    tiny = M.build_random_codegen(torch.float32, CodeGenConfig.from_dict(tiny_codegen_config())).train()
    calls = []

    def fake_model(model_id, **kwargs):
        calls.append(("model", model_id, kwargs))
        return tiny

    def fake_tokenizer(model_id, **kwargs):
        calls.append(("tokenizer", model_id, kwargs))
        return "the-real-tokenizer"

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake_tokenizer)
    loaded = M.load_codegen()
    assert loaded.is_pretrained and loaded.model is tiny and not tiny.training  # eval mode
    assert loaded.tokenizer == "the-real-tokenizer"
    assert calls[0] == ("model", "Salesforce/codegen-350M-mono", {"dtype": torch.bfloat16, "local_files_only": False})
    out = capsys.readouterr().out
    assert "RANDOM" not in out and "pretrained weights" in out


def test_detr_from_pretrained_uses_the_no_timm_revision(monkeypatch, capsys):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(M, "hub_reachable", lambda timeout=3.0: True)
    tiny = M.build_random_detr(torch.float32, DetrConfig.from_dict(tiny_detr_config()))
    seen = {}

    def fake_model(model_id, **kwargs):
        seen["model"] = (model_id, kwargs)
        return tiny

    monkeypatch.setattr(transformers.DetrForObjectDetection, "from_pretrained", fake_model)
    monkeypatch.setattr(transformers.AutoImageProcessor, "from_pretrained", lambda *a, **k: "processor")
    loaded = M.load_detr()
    assert loaded.is_pretrained and loaded.processor == "processor"
    assert seen["model"] == ("facebook/detr-resnet-50", {"revision": "no_timm", "dtype": torch.float32, "local_files_only": False})
    assert "RANDOM" not in capsys.readouterr().out


def test_hf_hub_offline_is_honoured(monkeypatch, tiny_configs, capsys):
    """HF_HUB_OFFLINE=1: no network probe, from_pretrained tried on the local cache only, then the fallback."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_probe(timeout=3.0):
        raise AssertionError("the hub must not be contacted when HF_HUB_OFFLINE is set")

    monkeypatch.setattr(M, "hub_reachable", no_probe)
    seen = []

    def cache_only(model_id, **kwargs):
        seen.append(kwargs["local_files_only"])
        raise OSError("not cached")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", cache_only)
    loaded = M.load_codegen()
    assert seen == [True]
    assert not loaded.is_pretrained and loaded.tokenizer is None
    assert "HF_HUB_OFFLINE" in loaded.reason
    assert "RANDOM WEIGHTS" in capsys.readouterr().out


def _hub_up(monkeypatch, answers=None):
    """Hub reachable (or the probe answers ``answers`` in turn), no offline variables."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    answers = list(answers or [])
    monkeypatch.setattr(M, "hub_reachable", lambda timeout=3.0: answers.pop(0) if answers else True)


def _failing_codegen(monkeypatch, error: BaseException) -> None:
    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", broken)


@pytest.mark.parametrize(
    "error",
    [ValueError("model type 'codegen9' not recognised"), MemoryError(), RuntimeError("size mismatch"),
     OSError("Salesforce/codegen-350M-mon is not a valid model identifier")],
    ids=["version-mismatch", "out-of-memory", "corrupt", "typo-in-id"],
)
def test_a_failing_load_with_the_hub_up_raises_with_advice(monkeypatch, tiny_configs, capsys, error):
    """Only an unreachable hub justifies random weights: anything else raises, saying what to do."""
    _hub_up(monkeypatch)
    _failing_codegen(monkeypatch, error)
    with pytest.raises(M.ModelLoadError, match="no random-weight stand-in was built") as info:
        M.load_codegen()
    assert type(error).__name__ in str(info.value) and "upgrade transformers" in str(info.value)
    assert info.value.__cause__ is error
    assert "RANDOM" not in capsys.readouterr().out


def test_offline_a_cached_model_that_fails_to_load_raises(monkeypatch, tiny_configs):
    """HF_HUB_OFFLINE with the model cached but unreadable by this transformers: not a reason for random weights."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _failing_codegen(monkeypatch, ValueError("checkpoint needs a newer transformers"))
    with pytest.raises(M.ModelLoadError, match="newer transformers"):
        M.load_codegen()


def test_the_hub_going_away_during_the_download_falls_back(monkeypatch, tiny_configs, capsys):
    _hub_up(monkeypatch, answers=[True, False])  # reachable at first, gone when the download failed
    _failing_codegen(monkeypatch, OSError("connection reset"))
    loaded = M.load_codegen()
    assert not loaded.is_pretrained and "not reachable" in loaded.reason
    assert "RANDOM WEIGHTS" in capsys.readouterr().out


# ---- the fallback -----------------------------------------------------------------------------------------------


def test_offline_codegen_fallback_full_size(no_hub, capsys):
    loaded = M.load_codegen()
    out = capsys.readouterr().out
    assert "RANDOM WEIGHTS" in out and "NOT the pretrained Salesforce/codegen-350M-mono" in out
    assert "MEANINGLESS" in out and str(loaded) in out
    assert not loaded.is_pretrained and loaded.tokenizer is None
    model = loaded.model
    assert isinstance(model, CodeGenForCausalLM) and not model.training
    assert M.count_parameters(model) == 356_712_448
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    w = model.transformer.h[0].attn.qkv_proj.weight.float()
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.001
    assert torch.isfinite(model.lm_head.weight[:100].float()).all()
    assert (model.transformer.ln_f.weight == 1).all() and (model.lm_head.bias == 0).all()


def test_offline_detr_fallback(no_hub, tiny_configs, capsys):
    loaded = M.load_detr()
    out = capsys.readouterr().out
    assert "RANDOM WEIGHTS" in out and "facebook/detr-resnet-50" in out
    assert not loaded.is_pretrained and loaded.processor is None and not loaded.model.training
    assert loaded.model.config.id2label[1] == "person"


def test_fallback_weights_are_seeded_and_leave_the_global_rng_alone(tiny_configs):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = M.build_random_detr(torch.float32, DetrConfig.from_dict(tiny_detr_config()))
    b = M.build_random_detr(torch.float32, DetrConfig.from_dict(tiny_detr_config()))
    assert torch.equal(torch.rand(3), expected)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    c1 = M.build_random_codegen(torch.bfloat16, CodeGenConfig.from_dict(tiny_codegen_config()))
    c2 = M.build_random_codegen(torch.bfloat16, CodeGenConfig.from_dict(tiny_codegen_config()))
    assert all(torch.equal(p, q) for p, q in zip(c1.parameters(), c2.parameters()))


def test_stand_in_tokenizer_says_what_it_is(no_hub, tiny_configs):
    loaded = M.load_codegen(verbose=False)
    ids = loaded.encode("def f():")
    assert ids.tolist() == [list(b"def f():")]
    assert loaded.decode(ids) == "⟨ids 100 101 102 32 102 40 41 58⟩"
    assert "not the model's real tokenizer" in repr(loaded.text_tokenizer)


def test_preprocess_image_resizes_and_normalises():
    image = np.full((60, 90, 3), 255, dtype=np.uint8)
    pixels = M.preprocess_image(image, shortest_edge=40, longest_edge=1000)
    assert pixels.shape == (1, 3, 40, 60) and pixels.dtype == torch.float32
    expected = (1 - torch.tensor(M.IMAGENET_MEAN)) / torch.tensor(M.IMAGENET_STD)
    assert torch.allclose(pixels[0, :, 20, 30], expected, atol=1e-5)
    assert M.resized_size(100, 1000, 800, 1333) == (133, 1333)  # the long side caps the scale
    with pytest.raises(ValueError):
        M.preprocess_image(np.zeros((4, 4)))


# ---- the quantizer works on both architectures ------------------------------------------------------------------


def test_quantized_codegen_keeps_lm_head_and_generates():
    model = M.build_random_codegen(torch.bfloat16, CodeGenConfig.from_dict(tiny_codegen_config()))
    ids = torch.tensor([[1, 5, 9, 42, 7, 3]])
    with torch.no_grad():
        before = model(ids).logits.float()
    Quantizer(model, W8A16LinearLayer, ["lm_head"])
    report = model.w8a16_report
    assert list(report.kept) == ["lm_head"] and isinstance(model.lm_head, nn.Linear)
    assert len(report.replaced) == 2 * 4  # qkv_proj, out_proj, fc_in, fc_out per block
    assert report.bytes_after < report.bytes_before
    with torch.no_grad():
        after = model(ids).logits.float()
        generated = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert (after - before).norm() / before.norm() < 0.05
    assert generated.shape == (1, ids.shape[1] + 4) and torch.equal(generated[:, : ids.shape[1]], ids)


def test_quantized_detr_replaces_every_linear_and_stays_close():
    model = M.build_random_detr(torch.float32, DetrConfig.from_dict(tiny_detr_config()))
    reference = copy.deepcopy(model)
    pixels = torch.randn(1, 3, 64, 80, generator=torch.Generator().manual_seed(0))
    Quantizer(model, W8A16LinearLayer)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert any(isinstance(m, nn.Conv2d) for m in model.modules())  # convolutions are not Linear: left alone
    with torch.no_grad():
        a, b = reference(pixel_values=pixels), model(pixel_values=pixels)
    assert (b.logits - a.logits).norm() / a.logits.norm() < 0.02
    assert (b.pred_boxes - a.pred_boxes).abs().max() < 0.01


def test_preprocess_uses_the_real_processor_when_loaded_and_agrees_with_the_fallback():
    from transformers import DetrImageProcessor

    image = (np.random.default_rng(0).random((60, 80, 3)) * 255).astype(np.uint8)
    loaded = M.LoadedModel(model=None, model_id="facebook/detr-resnet-50", is_pretrained=True, source="test",
                           processor=DetrImageProcessor())
    real = loaded.preprocess(image, shortest_edge=48)
    ours = M.preprocess_image(image, shortest_edge=48)
    assert real.shape == ours.shape == (1, 3, 48, 64)
    assert (real - ours).abs().mean() < 0.05  # same resize + ImageNet normalisation, up to the resampling filter
