"""The model walker on toy models and on small same-architecture transformers models (offline)."""

import copy
import warnings

import pytest
import torch
from torch import nn

from w8a16 import Quantizer, W8A16Conv2d, W8A16LinearLayer, footprint_bytes, quantize_model


class Block(nn.Module):
    def __init__(self, width=16):
        super().__init__()
        self.attn = nn.ModuleDict({"q": nn.Linear(width, width), "k": nn.Linear(width, width, bias=False)})
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x):
        return self.mlp(self.attn["q"](x) + self.attn["k"](x))


class Toy(nn.Module):
    def __init__(self, width=16, vocab=50, tie=False):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.h = nn.ModuleList([Block(width) for _ in range(2)])
        self.lm_head = nn.Linear(width, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.h:
            x = x + block(x)
        return self.lm_head(x)


def linear_names(model, cls=nn.Linear):
    return sorted(n for n, m in model.named_modules() if isinstance(m, cls))


def test_seed_call_replaces_all_but_excluded_and_returns_model():
    model = Toy()
    out = Quantizer(model, W8A16LinearLayer, ["lm_head"])
    assert out is model
    assert linear_names(model) == ["lm_head"]
    assert len(linear_names(model, W8A16LinearLayer)) == 8
    report = model.w8a16_report
    assert len(report.replaced) == 8 and report.kept == {"lm_head": "excluded by 'lm_head'"}
    assert report.bytes_after < report.bytes_before == footprint_bytes(Toy())


@pytest.mark.parametrize(
    "pattern, kept",
    [
        ("q", ["h.0.attn.q", "h.1.attn.q"]),  # child name
        ("h.1.mlp.2", ["h.1.mlp.2"]),  # fully-qualified name
        ("h.*.attn.*", ["h.0.attn.k", "h.0.attn.q", "h.1.attn.k", "h.1.attn.q"]),  # glob
    ],
)
def test_exclusion_patterns(pattern, kept):
    model = Toy()
    report = quantize_model(model, W8A16LinearLayer, [pattern, "lm_head"])
    assert linear_names(model) == sorted(kept + ["lm_head"])
    assert sorted(report.kept) == sorted(kept + ["lm_head"])


def test_pattern_that_matches_nothing_warns_with_its_name():
    with pytest.warns(UserWarning, match="'transformer.nope'"):
        Quantizer(Toy(), W8A16LinearLayer, ["transformer.nope"])


def test_calling_twice_is_harmless():
    model = Quantizer(Toy(), W8A16LinearLayer, ["lm_head"])
    ids = torch.randint(0, 50, (2, 5))
    first = model(ids)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no spurious "matches nothing" on the second pass
        Quantizer(model, W8A16LinearLayer, ["lm_head"])
    assert model.w8a16_report.replaced == []
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert torch.equal(model(ids), first)


def test_tied_lm_head_is_kept_with_a_reason():
    model = Toy(tie=True)
    with pytest.warns(UserWarning, match="tied to embed.weight"):
        Quantizer(model, W8A16LinearLayer)
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.embed.weight
    assert "tied" in model.w8a16_report.kept["lm_head"]


def test_tied_lm_head_quantized_when_asked():
    model = Toy(tie=True)
    Quantizer(model, W8A16LinearLayer, quantize_tied=True)
    assert isinstance(model.lm_head, W8A16LinearLayer)
    assert model.embed.weight.dtype == torch.float32  # the embedding itself is untouched


def test_bad_weight_names_the_layer():
    model = Toy()
    with torch.no_grad():
        model.h[1].mlp[2].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"layer 'h\.1\.mlp\.2'.*NaN"):
        Quantizer(model, W8A16LinearLayer, ["lm_head"])


def test_report_prints_and_counts_bytes():
    model = Toy(width=32)
    report = quantize_model(model, W8A16LinearLayer, ["lm_head"])
    text = str(report)
    assert "replaced 8 Linear layer(s), kept 1" in text and "kept lm_head" in text
    # each replaced layer: weights go from 4 bytes to 1 byte; scales (4 bytes each) are added
    replaced_weights = sum(m.int8_weights.numel() for m in model.modules() if isinstance(m, W8A16LinearLayer))
    replaced_rows = sum(m.scales.numel() for m in model.modules() if isinstance(m, W8A16LinearLayer))
    assert report.bytes_before - report.bytes_after == 3 * replaced_weights - 4 * replaced_rows


def test_state_dict_loads_into_fresh_quantized_model():
    model = Quantizer(Toy(), W8A16LinearLayer, ["lm_head"])
    fresh = Quantizer(Toy(), W8A16LinearLayer, ["lm_head"])
    fresh.load_state_dict(model.state_dict())
    ids = torch.randint(0, 50, (1, 7))
    assert torch.equal(fresh(ids), model(ids))


# --- transformers models, tiny same-architecture configs (no hub) ---------------------------------------------


def tiny_codegen(dtype=torch.float32):
    from transformers import CodeGenConfig, CodeGenForCausalLM

    config = CodeGenConfig(
        n_layer=2, n_embd=64, n_head=4, rotary_dim=8, vocab_size=128, n_positions=64, n_ctx=64,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    return CodeGenForCausalLM(config).to(dtype).eval()


def tiny_detr():
    from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig

    config = DetrConfig(
        use_timm_backbone=False, use_pretrained_backbone=False, backbone=None,
        backbone_config=ResNetConfig(out_features=["stage4"], embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1]),
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=10, num_labels=5,
    )
    return DetrForObjectDetection(config).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_codegen_lm_head_kept_logits_close_generate_works(dtype):
    model = tiny_codegen(dtype)
    ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        ref = model(ids).logits.float()
    bytes_before = model.get_memory_footprint()
    Quantizer(model, W8A16LinearLayer, ["lm_head"])
    assert isinstance(model.lm_head, nn.Linear)
    assert all(isinstance(b.mlp.fc_in, W8A16LinearLayer) for b in model.transformer.h)
    with torch.no_grad():
        out = model(ids).logits.float()
    rel = (out - ref).norm() / ref.norm()
    assert rel < (0.02 if dtype == torch.float32 else 0.05)
    gen = model.generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert gen.shape == (1, 13)
    assert model.get_memory_footprint() < bytes_before


def test_detr_every_linear_replaced_outputs_close():
    model = tiny_detr()
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(pixel_values=pixels)
    Quantizer(model, W8A16LinearLayer)
    assert linear_names(model) == []
    with torch.no_grad():
        out = model(pixel_values=pixels)
    assert torch.allclose(out.logits, ref.logits, atol=0.05 * ref.logits.abs().max().item())
    assert torch.allclose(out.pred_boxes, ref.pred_boxes, atol=0.02)


def test_model_half_after_quantizing_keeps_int8():
    model = Quantizer(tiny_codegen(), W8A16LinearLayer, ["lm_head"])
    model.to(torch.bfloat16)
    layer = model.transformer.h[0].attn.qkv_proj
    assert layer.int8_weights.dtype == torch.int8 and layer.scales.dtype == torch.bfloat16


# --- what is not replaced is reported, never skipped silently -------------------------------------------------


class Router(nn.Linear):
    """A Linear subclass whose forward returns something else: swapping it for a plain layer would break the model."""

    def forward(self, x):
        logits = super().forward(x)
        return logits.softmax(-1), logits


class PlainSubclass(nn.Linear):
    pass


class HandRolled(nn.Module):
    """A Linear the quantizer cannot recognise: its own 2-D weight, used however it likes."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 16))

    def forward(self, x):
        return x @ self.weight.T


def test_unreplaceable_layers_are_kept_with_reasons_and_one_warning():
    model = nn.ModuleDict({
        "router": Router(16, 4), "plain": PlainSubclass(16, 8), "hand": HandRolled(), "rnn": nn.LSTM(16, 8),
        "emb": nn.Embedding(10, 16),
    })
    with pytest.warns(UserWarning, match=r"kept 4 Linear-like weight\(s\).*router: Router overrides Linear\.forward"):
        Quantizer(model, W8A16LinearLayer)
    report = model.w8a16_report
    assert report.replaced == ["plain"] and isinstance(model["router"], Router)
    assert list(report.kept) == ["router", "hand", "rnn.weight_ih_l0", "rnn.weight_hh_l0"]  # the embedding is a table
    assert "not a Linear the quantizer knows" in report.kept["hand"]
    assert "fused recurrent kernel" in report.kept["rnn.weight_hh_l0"]


def test_user_exclusion_wins_over_the_structural_reason():
    model = nn.ModuleDict({"mha": nn.MultiheadAttention(16, 2)})
    with pytest.warns(UserWarning, match="kept 1 Linear-like"):
        Quantizer(model, W8A16LinearLayer, ["out_proj"])
    assert model.w8a16_report.kept == {
        "mha.in_proj_weight": model.w8a16_report.kept["mha.in_proj_weight"], "mha.out_proj": "excluded by 'out_proj'",
    }


def test_model_without_linear_layers_warns():
    with pytest.warns(UserWarning, match="no nn.Linear or transformers Conv1D"):
        Quantizer(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), W8A16LinearLayer)


def test_a_bare_linear_is_reported_not_replaced():
    linear = nn.Linear(4, 4)
    with pytest.warns(UserWarning, match="the model itself"):
        assert Quantizer(linear, W8A16LinearLayer) is linear
    assert list(linear.w8a16_report.kept) == [""]


# --- several quantized classes: Linear and Conv2d ------------------------------------------------------------------


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList([nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.Conv2d(8, 8, 1)])
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x).relu()
        return self.head(x.mean(dim=(-2, -1)))


def test_seed_call_leaves_conv2d_alone_and_does_not_report_it():
    model = ConvNet()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Conv2d is not "kept" noise in a Linear-only run
        Quantizer(model, W8A16LinearLayer)
    report = model.w8a16_report
    assert report.replaced == ["head"] and report.kept == {}
    assert report.replaced_by_kind == {"Linear": 1}
    assert str(report).startswith("replaced 1 Linear layer(s), kept 0")  # the seed's wording, unchanged
    assert len(linear_names(model, nn.Conv2d)) == 3


def test_linear_and_conv2d_together_counts_each_kind():
    model = ConvNet()
    x = torch.randn(2, 3, 10, 10)
    ref = model(x)
    report = quantize_model(model, [W8A16LinearLayer, W8A16Conv2d])
    assert report.replaced_by_kind == {"Linear": 1, "Conv2d": 3} and report.kept == {}
    assert str(report).startswith("replaced 1 Linear + 3 Conv2d layer(s), kept 0")
    assert linear_names(model, nn.Conv2d) == [] and len(linear_names(model, W8A16Conv2d)) == 3
    assert (model(x) - ref).norm() / ref.norm() < 0.02
    # a Conv2d-only pass says so
    conv_only = quantize_model(ConvNet(), W8A16Conv2d)  # the Linear is none of its business: not "kept"
    assert str(conv_only).startswith("replaced 3 Conv2d layer(s), kept 0")


def test_linear_first_then_conv2d_then_again_is_harmless():
    model = Quantizer(ConvNet(), W8A16LinearLayer)
    report = quantize_model(model, (W8A16LinearLayer, W8A16Conv2d))
    assert report.replaced_by_kind == {"Linear": 0, "Conv2d": 3}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exclusions that match quantized layers do not warn either
        again = quantize_model(model, [W8A16LinearLayer, W8A16Conv2d], ["stem"])
    assert again.replaced == [] and again.kept == {}
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_exclusions_apply_to_conv2d():
    model = ConvNet()
    report = quantize_model(model, [W8A16LinearLayer, W8A16Conv2d], ["stem", "blocks.*"])
    assert report.kept == {"stem": "excluded by 'stem'", "blocks.0": "excluded by 'blocks.*'",
                           "blocks.1": "excluded by 'blocks.*'"}
    assert report.replaced == ["head"]
    with pytest.warns(UserWarning, match="'nope' matches no Linear or Conv2d layer"):
        quantize_model(ConvNet(), [W8A16LinearLayer, W8A16Conv2d], ["nope"])


class StandardisedConv(nn.Conv2d):
    """Weight standardisation in _conv_forward: a plain W8A16Conv2d would skip it."""

    def _conv_forward(self, x, weight, bias):
        weight = (weight - weight.mean(dim=(1, 2, 3), keepdim=True)) / (weight.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return super()._conv_forward(x, weight, bias)


class ConvWithActivation(nn.Conv2d):
    def forward(self, x):
        return super().forward(x).relu()


class PlainConvSubclass(nn.Conv2d):
    pass


def test_conv2d_that_cannot_be_replaced_are_kept_with_reasons_and_one_warning():
    model = nn.ModuleDict({
        "std": StandardisedConv(3, 4, 3), "act": ConvWithActivation(3, 4, 3), "plain": PlainConvSubclass(3, 4, 3),
        "c1d": nn.Conv1d(3, 4, 3), "up": nn.ConvTranspose2d(4, 3, 2),
    })
    with pytest.warns(UserWarning, match=r"kept 4 weight\(s\) in full precision.*std: StandardisedConv overrides "
                                         r"Conv2d\._conv_forward"):
        Quantizer(model, [W8A16LinearLayer, W8A16Conv2d])
    report = model.w8a16_report
    assert report.replaced == ["plain"] and isinstance(model["plain"], W8A16Conv2d)
    assert list(report.kept) == ["std", "act", "c1d", "up"]
    assert "overrides Conv2d.forward" in report.kept["act"]
    assert "not an nn.Conv2d" in report.kept["c1d"] and "ConvTranspose2d" in report.kept["up"]
    # the same model, Linear only: the convolutions are none of the quantizer's business
    with pytest.warns(UserWarning, match="no nn.Linear or transformers Conv1D"):
        assert quantize_model(copy.deepcopy(model), W8A16LinearLayer).kept == {}


def test_a_bare_conv2d_is_reported_not_replaced():
    conv = nn.Conv2d(3, 4, 3)
    with pytest.warns(UserWarning, match=r"the model itself.*W8A16Conv2d\.from_float"):
        assert Quantizer(conv, [W8A16LinearLayer, W8A16Conv2d]) is conv


def test_nan_in_a_conv_names_the_layer():
    model = ConvNet()
    with torch.no_grad():
        model.blocks[1].weight[2, 3] = float("inf")
    with pytest.raises(ValueError, match=r"layer 'blocks\.1'.*W8A16Conv2d\(8→8, 1×1\).*Inf at row 2"):
        Quantizer(model, [W8A16LinearLayer, W8A16Conv2d])


def test_tiny_detr_linear_and_conv2d_outputs_close():
    model = tiny_detr()
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(pixel_values=pixels)
    Quantizer(model, [W8A16LinearLayer, W8A16Conv2d])
    assert linear_names(model) == [] and linear_names(model, nn.Conv2d) == []
    assert model.w8a16_report.kept == {}
    with torch.no_grad():
        out = model(pixel_values=pixels)
    assert (out.logits - ref.logits).norm() / ref.logits.norm() < 0.05
    assert (out.pred_boxes - ref.pred_boxes).abs().max() < 0.02


# ---- what quantizing frees goes back to the OS (glibc keeps freed heap blocks otherwise) ---------------------

FRAGMENT = """
import ctypes, json, torch
from w8a16.ops import cpu
def rss_anon():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith("RssAnon:"))
# Blocks under 32 MB from the heap, not from mmap: where glibc's threshold is once a 32 MB tensor has been freed.
assert ctypes.CDLL(None).mallopt(-3, 32 << 20) == 1  # M_MMAP_THRESHOLD
base = rss_anon()
kept = []
for i in range(64):  # a temporary, then a kept block of the same size: every block is larger than any earlier hole,
    size = (1 << 20) + i * (64 << 10)  # so each kept block pins the temporary's hole below it
    temporary = torch.ones(size, dtype=torch.uint8)
    kept.append(torch.ones(size, dtype=torch.uint8))
    del temporary
before = rss_anon() - base
print(json.dumps({"before": before, "returned": cpu.return_freed_heap(), "after": rss_anon() - base}))
"""


def test_freed_heap_blocks_between_kept_ones_go_back_to_the_os() -> None:
    import json
    import subprocess
    import sys

    from w8a16.ops import cpu

    if cpu._GLIBC_MALLOC is None:
        pytest.skip("not glibc's malloc: return_freed_heap does nothing here")
    done = subprocess.run([sys.executable, "-c", FRAGMENT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    kept = sum((1 << 20) + i * (64 << 10) for i in range(64))  # 193 MB, and as many freed
    assert got["before"] > kept + 150 * 2**20, got  # glibc kept the freed temporaries resident
    assert got["returned"] and got["after"] < kept + cpu.FREED_HEAP_LIMIT, got


def test_return_freed_heap_trims_only_above_its_limit(monkeypatch) -> None:
    from w8a16.ops import cpu

    trims = []
    free = {"bytes": 10 << 20}
    fake_info = lambda: cpu._MallocInfo(fordblks=free["bytes"])  # noqa: E731
    monkeypatch.setattr(cpu, "_GLIBC_MALLOC", (fake_info, trims.append))
    assert not cpu.return_freed_heap(limit=64 << 20) and trims == []
    free["bytes"] = 65 << 20
    assert cpu.return_freed_heap(limit=64 << 20) and trims == [0]
    monkeypatch.setattr(cpu, "_GLIBC_MALLOC", None)  # macOS, Windows, musl: nothing to do
    assert not cpu.return_freed_heap(limit=0)


def test_the_walker_returns_freed_memory_after_each_layer(monkeypatch) -> None:
    import w8a16.layer

    calls = []
    monkeypatch.setattr(w8a16.layer, "return_freed_heap", lambda: calls.append(1))
    model = Quantizer(Toy(), W8A16LinearLayer, ["lm_head"])
    assert len(calls) == len(model.w8a16_report.replaced) == 8
