"""save_quantized / load_quantized: exact round trips, skeletons on meta, the memory bound, damaged input."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CodeGenConfig, CodeGenForCausalLM, GPT2Config, GPT2LMHeadModel

import w8a16
from w8a16 import QuantizedFormatError, W8A16LinearLayer, load_quantized, save_quantized
from w8a16.course.models import shipped_config
from w8a16.io.serialization import (
    MANIFEST_FILE,
    NONPERSISTENT_PREFIX,
    WEIGHTS_FILE,
    _file_crc32,
)

VOCAB = 96
LAYER = "transformer.h.0.mlp.fc_in"  # a quantized layer with bias, (128, 32)


def tiny_config(tie: bool = False, n_embd: int = 32) -> CodeGenConfig:
    return CodeGenConfig(
        n_layer=2, n_embd=n_embd, n_head=4, rotary_dim=4, vocab_size=VOCAB, n_positions=64, n_ctx=64,
        activation_function="gelu_new", tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


def quantized_codegen(dtype: torch.dtype = torch.float32, tie: bool = False) -> CodeGenForCausalLM:
    """A tiny random CodeGen, quantized except lm_head (CodeGen has Linear layers with and without bias)."""
    model = CodeGenForCausalLM(tiny_config(tie)).to(dtype).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "kept lm_head: tied" when tie=True
        w8a16.Quantizer(model, W8A16LinearLayer, ["lm_head"])
    return model


def nonpersistent_buffers(model: nn.Module) -> list[str]:
    """Buffers that state_dict() leaves out (CodeGen's rotary tables; where they live varies by transformers version)."""
    state = model.state_dict()
    return [name for name, _ in model.named_buffers() if name not in state]


class TinyNet(nn.Module):
    """Not a transformers model: tied head, a non-persistent table, an integer buffer, bias on and off."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 32, dtype=dtype)
        self.up = nn.Linear(32, 64, bias=True, dtype=dtype)
        self.down = nn.Linear(64, 32, bias=False, dtype=dtype)
        self.head = nn.Linear(32, VOCAB, bias=False, dtype=dtype)
        self.head.weight = self.emb.weight  # tied
        self.register_buffer("table", torch.linspace(0, 1, 32, dtype=dtype), persistent=False)
        self.register_buffer("steps", torch.tensor(7, dtype=torch.int64))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids) + self.table
        return self.head(h + self.down(torch.relu(self.up(h))))


def quantized_tinynet(dtype: torch.dtype) -> TinyNet:
    net = TinyNet(dtype).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w8a16.Quantizer(net, W8A16LinearLayer)
    net.table.mul_(3)  # a non-persistent buffer whose value is not what __init__ makes: must come from the file
    return net


def all_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update((n, b) for n, b in model.named_buffers(remove_duplicate=False) if b is not None)
    return named


def assert_same_tensors(a: nn.Module, b: nn.Module) -> None:
    ta, tb = all_tensors(a), all_tensors(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        assert tb[name].dtype == ta[name].dtype, name
        assert torch.equal(tb[name], ta[name]), name
        # safe for every fast kernel: own, contiguous, 64-byte-aligned memory
        assert tb[name].is_contiguous() and tb[name].data_ptr() % 64 == 0, name


IDS = torch.tensor([[1, 5, 9, 33, 60, 2, 17, 40], [3, 3, 8, 90, 11, 0, 4, 77]])


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_transformers_round_trip(tmp_path: Path, dtype: torch.dtype, tie: bool) -> None:
    model = quantized_codegen(dtype, tie)
    save_quantized(model, tmp_path)
    loaded = load_quantized(tmp_path)

    assert type(loaded) is CodeGenForCausalLM and not loaded.training
    assert_same_tensors(model, loaded)
    assert w8a16.footprint_bytes(loaded) == w8a16.footprint_bytes(model)
    assert (loaded.lm_head.weight is loaded.transformer.wte.weight) == tie
    nonpersistent = nonpersistent_buffers(model)  # the rotary tables: not in state_dict(), still right
    assert nonpersistent and all(torch.equal(all_tensors(loaded)[b], all_tensors(model)[b]) for b in nonpersistent)
    with torch.no_grad():
        got, want = loaded(IDS).logits, model(IDS).logits
    assert got.dtype == want.dtype == dtype and torch.equal(got, want)  # bit-identical
    mask = torch.ones_like(IDS)
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(loaded.generate(IDS, **kwargs), model.generate(IDS, **kwargs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("quantized_skeleton", [False, True], ids=["fp-skeleton", "quantized-skeleton"])
def test_plain_module_into_meta_skeleton(tmp_path: Path, dtype: torch.dtype, quantized_skeleton: bool) -> None:
    net = quantized_tinynet(dtype)
    save_quantized(net, tmp_path)
    with torch.device("meta"):
        skeleton = TinyNet(torch.float32)  # full precision, fp32 even for a bf16 file: the file's dtypes win
    if quantized_skeleton:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            w8a16.Quantizer(skeleton, W8A16LinearLayer)
    loaded = load_quantized(tmp_path, skeleton)

    assert loaded is skeleton and not loaded.training
    assert not any(t.is_meta for t in all_tensors(loaded).values())
    assert_same_tensors(net, loaded)
    assert loaded.head.weight is loaded.emb.weight
    assert isinstance(loaded.up, W8A16LinearLayer) and loaded.down.bias is None and loaded.up.bias is not None
    assert "table" not in loaded.state_dict()  # stays non-persistent
    with torch.no_grad():
        assert torch.equal(loaded(IDS), net(IDS))


def test_transformers_skeleton_on_meta(tmp_path: Path) -> None:
    model = quantized_codegen(torch.bfloat16)
    save_quantized(model, tmp_path)
    with torch.device("meta"):
        skeleton = CodeGenForCausalLM(tiny_config())
    loaded = load_quantized(tmp_path, skeleton)
    assert_same_tensors(model, loaded)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def test_directory_contents(tmp_path: Path) -> None:
    """Only safetensors and JSON (no pickle); the safetensors file is standard; the manifest says what was done."""
    model = quantized_codegen(torch.bfloat16, tie=True)
    ref = model.get_submodule(LAYER)
    stats = {LAYER: w8a16.error_stats(torch.randn(128, 32), ref.int8_weights, ref.scales)}
    save_quantized(model, tmp_path, error_stats=stats)

    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "w8a16.json"
    ]
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert manifest["format_version"] == 1 and manifest["model_class"] == "CodeGenForCausalLM"
    assert len(manifest["quantized"]) == 8
    qkv = next(layer for layer in manifest["quantized"] if layer["name"] == "transformer.h.0.attn.qkv_proj")
    assert qkv == {"name": qkv["name"], "in_features": 32, "out_features": 96, "bias": False, "dtype": "bfloat16"}
    assert manifest["kept"]["lm_head"]["why"] == "excluded by 'lm_head'"
    assert manifest["tied"] == {"lm_head.weight": "transformer.wte.weight"}
    assert manifest["nonpersistent_buffers"]["names"] == nonpersistent_buffers(model)
    fc_in = next(layer for layer in manifest["quantized"] if layer["name"] == LAYER)
    assert fc_in["error"]["max_err_over_scale"] == pytest.approx(stats[fc_in["name"]].max_err_over_scale)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["CodeGenForCausalLM"]
    with safe_open(tmp_path / WEIGHTS_FILE, "pt") as f:  # the reference reader opens it
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and {NONPERSISTENT_PREFIX + b for b in nonpersistent_buffers(model)} <= keys
    assert manifest["files"][WEIGHTS_FILE]["bytes"] == (tmp_path / WEIGHTS_FILE).stat().st_size


def test_save_refuses_bad_models(tmp_path: Path) -> None:
    net = quantized_tinynet(torch.float32)
    net.up.scales[3] = float("nan")
    with pytest.raises(QuantizedFormatError, match="up.scales contains NaN"):
        save_quantized(net, tmp_path / "nan")
    with torch.device("meta"):
        meta = TinyNet()
    with pytest.raises(QuantizedFormatError, match="meta device"):
        save_quantized(meta, tmp_path / "meta")


# ------------------------------------------------------------------------------------------ damaged input


def rewrite(directory: Path, edit) -> None:
    """Change the tensors of a saved directory *consistently* (size and CRC updated), as a buggy writer would.

    So the semantic checks are tested on their own, not hidden behind the checksum.
    """
    tensors = load_file(directory / WEIGHTS_FILE)
    edit(tensors)
    save_file(tensors, directory / WEIGHTS_FILE, metadata={"format": "pt"})
    edit_manifest(directory, lambda m: m["files"][WEIGHTS_FILE].update(
        bytes=(directory / WEIGHTS_FILE).stat().st_size, crc32=_file_crc32(directory / WEIGHTS_FILE)
    ))


def edit_manifest(directory: Path, edit) -> None:
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    edit(manifest)
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))


def edit_bytes(path: Path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(data)] = data
    path.write_bytes(bytes(raw))


def truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


DAMAGE = {
    # name: (damage(dir), expected exception, file named in the message, words in the message)
    "truncated": (lambda d: truncate(d / WEIGHTS_FILE, (d / WEIGHTS_FILE).stat().st_size - 100),
                  QuantizedFormatError, WEIGHTS_FILE, "bytes"),
    "truncated-in-header": (lambda d: truncate(d / WEIGHTS_FILE, 200), QuantizedFormatError, WEIGHTS_FILE, "header"),
    "empty-file": (lambda d: truncate(d / WEIGHTS_FILE, 0), QuantizedFormatError, WEIGHTS_FILE, "too short"),
    "huge-header-length": (lambda d: edit_bytes(d / WEIGHTS_FILE, 0, (2**60).to_bytes(8, "little")),
                           QuantizedFormatError, WEIGHTS_FILE, "header length"),
    "header-not-json": (lambda d: edit_bytes(d / WEIGHTS_FILE, 8, b"#"), QuantizedFormatError, WEIGHTS_FILE, "JSON"),
    "flipped-data-byte": (lambda d: edit_bytes(d / WEIGHTS_FILE, (d / WEIGHTS_FILE).stat().st_size - 7, b"\x5a"),
                          QuantizedFormatError, WEIGHTS_FILE, "CRC-32"),
    "missing-weights": (lambda d: (d / WEIGHTS_FILE).unlink(), FileNotFoundError, WEIGHTS_FILE, "missing"),
    "missing-config": (lambda d: (d / "config.json").unlink(), FileNotFoundError, "config.json", "missing"),
    "manifest-not-json": (lambda d: (d / MANIFEST_FILE).write_text("{oops"), QuantizedFormatError, MANIFEST_FILE,
                          "not valid JSON"),
    "unknown-format-version": (lambda d: edit_manifest(d, lambda m: m.update(format_version=99)),
                               QuantizedFormatError, MANIFEST_FILE, "format_version 99"),
    "not-a-w8a16-manifest": (lambda d: edit_manifest(d, lambda m: m.update(format="gguf")),
                             QuantizedFormatError, MANIFEST_FILE, "not a w8a16 manifest"),
    "manifest-shape-mismatch": (lambda d: edit_manifest(d, lambda m: m["quantized"][2].update(in_features=33)),
                                QuantizedFormatError, WEIGHTS_FILE, "expected [128, 33]"),
    "manifest-dtype-mismatch": (lambda d: edit_manifest(d, lambda m: m["quantized"][2].update(dtype="float16")),
                                QuantizedFormatError, WEIGHTS_FILE, "expected torch.float16"),
    "int8-saved-as-float": (lambda d: rewrite(d, lambda t: t.update({f"{LAYER}.int8_weights":
                                                                     t[f"{LAYER}.int8_weights"].half()})),
                            QuantizedFormatError, WEIGHTS_FILE, "expected torch.int8"),
    "int8-saved-as-int16": (lambda d: rewrite(d, lambda t: t.update({f"{LAYER}.int8_weights":
                                                                     t[f"{LAYER}.int8_weights"].short()})),
                            QuantizedFormatError, WEIGHTS_FILE, "expected torch.int8"),
    "scales-wrong-dtype": (lambda d: rewrite(d, lambda t: t.update({f"{LAYER}.scales": t[f"{LAYER}.scales"].float()})),
                           QuantizedFormatError, WEIGHTS_FILE, "expected torch.bfloat16"),
    "scales-wrong-shape": (lambda d: rewrite(d, lambda t: t.update({f"{LAYER}.scales": t[f"{LAYER}.scales"][:-1]})),
                           QuantizedFormatError, WEIGHTS_FILE, "expected [128]"),
    "nan-in-scales": (lambda d: rewrite(d, lambda t: t[f"{LAYER}.scales"].__setitem__(5, float("nan"))),
                      QuantizedFormatError, WEIGHTS_FILE, "NaN or Inf"),
    "inf-in-scales": (lambda d: rewrite(d, lambda t: t[f"{LAYER}.scales"].__setitem__(0, float("inf"))),
                      QuantizedFormatError, WEIGHTS_FILE, "NaN or Inf"),
    "negative-scales": (lambda d: rewrite(d, lambda t: t[f"{LAYER}.scales"].__setitem__(0, -1.0)),
                        QuantizedFormatError, WEIGHTS_FILE, "negative"),
    "tensor-removed": (lambda d: rewrite(d, lambda t: t.pop("transformer.ln_f.weight")),
                       QuantizedFormatError, WEIGHTS_FILE, "not in the file"),
    "extra-tensor": (lambda d: rewrite(d, lambda t: t.update(surprise=torch.zeros(3))),
                     QuantizedFormatError, WEIGHTS_FILE, "skeleton lacks"),
    "kept-tensor-wrong-shape": (lambda d: rewrite(d, lambda t: t.update({"lm_head.weight": t["lm_head.weight"][:-1]})),
                                QuantizedFormatError, WEIGHTS_FILE, "the skeleton expects"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_directory(tmp_path: Path, case: str) -> None:
    damage, error, filename, words = DAMAGE[case]
    save_quantized(quantized_codegen(torch.bfloat16), tmp_path)
    damage(tmp_path)
    with pytest.raises(error) as caught:
        load_quantized(tmp_path)
    assert isinstance(caught.value, (ValueError, FileNotFoundError))
    assert filename in str(caught.value) and words in str(caught.value), str(caught.value)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_quantized(tmp_path / "nope")


@pytest.mark.parametrize(
    "skeleton, words",
    [
        (lambda: GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB)), "GPT2LMHeadModel"),
        (lambda: CodeGenForCausalLM(tiny_config(n_embd=64)), "is (32 -> NUMBER, bias=False) in the file"),
        (lambda: TinyNet(), "the skeleton is a TinyNet"),
    ],
    ids=["other-architecture", "other-size", "not-transformers"],
)
def test_wrong_skeleton(tmp_path: Path, skeleton, words: str) -> None:
    save_quantized(quantized_codegen(), tmp_path)
    with torch.device("meta"):
        model = skeleton()
    pattern = words.replace("(", r"\(").replace(")", r"\)").replace("NUMBER", r"\d+")
    with pytest.raises(QuantizedFormatError, match=pattern):
        load_quantized(tmp_path, model)


def test_plain_module_needs_a_skeleton(tmp_path: Path) -> None:
    save_quantized(quantized_tinynet(torch.float32), tmp_path)
    with pytest.raises(QuantizedFormatError, match="pass a skeleton"):
        load_quantized(tmp_path)


# ------------------------------------------------------------------------------------------------ memory


def codegen_350m_config() -> CodeGenConfig:
    return CodeGenConfig.from_dict(shipped_config("codegen-350M-mono"))


def test_memory_bound_codegen_350m_shape(tmp_path: Path) -> None:
    """Loading a codegen-350M-shaped bf16 model (lm_head kept, ~462 MB) plus one forward costs ≤ 1.3x its size.

    What is measured (`w8a16.io.cli._measure_here`, run in a fresh process by `measure_load`): the peak of
    RssAnon — anonymous resident memory, i.e. heap, *not* file-backed pages such as an mmap or the page
    cache of model.safetensors — polled every millisecond from /proc/self/status during load_quantized()
    and one 8-token forward, minus RssAnon just before the load (torch, transformers and the model class
    already imported). A load that materialised the bf16 weights (~714 MB) would exceed the bound by itself.
    The random weights are written straight into a meta-built, meta-quantized model so the test stays fast.
    """
    from w8a16.io.cli import MEMORY_BOUND, measure_load

    with torch.device("meta"):
        model = CodeGenForCausalLM._from_config(codegen_350m_config(), dtype=torch.bfloat16)
    w8a16.quantize_model(model, exclude=["lm_head"])
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in all_tensors(model).items():
            if t.dtype == torch.int8:
                t.random_(-127, 128, generator=gen)
            elif name.endswith("scales"):
                t.uniform_(1e-4, 2e-4, generator=gen)
            else:
                t.normal_(0, 0.02, generator=gen)
    quantized_bytes = w8a16.footprint_bytes(model)
    assert 455e6 < quantized_bytes < 470e6
    save_quantized(model, tmp_path)
    del model

    measured = measure_load(tmp_path)
    print(measured)
    assert measured["quantized_bytes"] == quantized_bytes
    assert measured["extra_bytes"] <= MEMORY_BOUND * quantized_bytes, measured


def test_without_manifest_a_transformers_save_is_read_as_save_pretrained_wrote_it(tmp_path: Path) -> None:
    """One format: save_quantized's config.json carries the quantization_config that save_pretrained writes, so a
    directory that lost its manifest still loads (through from_pretrained), identical; a plain nn.Module cannot."""
    model = quantized_codegen(torch.bfloat16)
    save_quantized(model, tmp_path / "tf")
    (tmp_path / "tf" / MANIFEST_FILE).unlink()
    back = load_quantized(tmp_path / "tf")
    assert back.config.quantization_config.modules == [n for n, m in model.named_modules()
                                                        if isinstance(m, W8A16LinearLayer)]
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key

    net = TinyNet()
    with pytest.warns(UserWarning, match="tied"):
        w8a16.Quantizer(net, W8A16LinearLayer)
    save_quantized(net, tmp_path / "plain")
    (tmp_path / "plain" / MANIFEST_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=MANIFEST_FILE):
        load_quantized(tmp_path / "plain")


class ConvNet(nn.Module):
    """Not a transformers model: convolutions of several kinds (strided, grouped, padded by reflection), a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False)
        self.reflect = nn.Conv2d(8, 16, (1, 3), padding=(0, 1), padding_mode="reflect")
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.reflect(self.grouped(self.stem(x))).mean(dim=(2, 3)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv2d_layers_round_trip(tmp_path: Path, dtype: torch.dtype) -> None:
    from w8a16 import W8A16Conv2d

    torch.manual_seed(0)
    net = ConvNet().to(dtype).eval()
    w8a16.Quantizer(net, [W8A16LinearLayer, W8A16Conv2d])
    save_quantized(net, tmp_path)
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert [c["name"] for c in manifest["quantized_conv2d"]] == ["stem", "grouped", "reflect"]
    with torch.device("meta"):
        skeleton = ConvNet().to(dtype)
    back = load_quantized(tmp_path, skeleton)
    assert isinstance(back.grouped, W8A16Conv2d) and back.reflect.padding_mode == "reflect"
    x = torch.randn(2, 3, 16, 16, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(back(x), net(x))


def test_conv2d_entry_that_does_not_fit_the_skeleton_is_refused(tmp_path: Path) -> None:
    from w8a16 import W8A16Conv2d

    net = ConvNet()
    w8a16.Quantizer(net, [W8A16LinearLayer, W8A16Conv2d])
    save_quantized(net, tmp_path)
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    manifest["quantized_conv2d"][1]["groups"] = 2
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with torch.device("meta"):
        skeleton = ConvNet()
    with pytest.raises(QuantizedFormatError, match="'grouped.int8_weights' has shape"):
        load_quantized(tmp_path, skeleton)
    manifest["quantized_conv2d"][1]["kernel_size"] = [3, "3"]
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(QuantizedFormatError, match=r"quantized_conv2d\[1\].kernel_size"):
        load_quantized(tmp_path, skeleton)
