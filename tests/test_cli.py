"""``python -m w8a16``: help, one-line errors, quantize and report on a tiny model saved in tmp_path (offline)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from transformers import CodeGenConfig, CodeGenForCausalLM

import w8a16
from w8a16.io.cli import main

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "w8a16", *args], capture_output=True, text=True, env=ENV, cwd=cwd,
                          timeout=300)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random CodeGen saved with save_pretrained(), as a downloaded checkpoint would be."""
    torch.manual_seed(0)
    config = CodeGenConfig(n_layer=2, n_embd=32, n_head=4, rotary_dim=4, vocab_size=96, n_positions=64, n_ctx=64,
                           bos_token_id=1, eos_token_id=2, pad_token_id=0)
    directory = tmp_path_factory.mktemp("pretrained")
    CodeGenForCausalLM(config).save_pretrained(directory)
    return directory


def test_help(tmp_path: Path) -> None:
    done = run("--help", cwd=tmp_path)
    assert done.returncode == 0 and "quantize" in done.stdout and "report" in done.stdout
    assert "_measure" not in done.stdout  # the internal command stays hidden
    done = run("quantize", "--help", cwd=tmp_path)
    assert done.returncode == 0
    for option in ["MODEL_ID_OR_DIR", "--exclude", "--out", "--dtype", "bfloat16"]:
        assert option in done.stdout


@pytest.mark.parametrize(
    "args, code, words",
    [
        (["quantize", "Salesforce/codegen-350M-mono", "--out", "x"], 1, "HF_HUB_OFFLINE"),
        (["quantize", "x", "--out", "y", "--dtype", "int4"], 2, "invalid choice: 'int4'"),
    ],
    ids=["offline-hub-id", "bad-dtype"],
)
def test_errors_in_a_subprocess_are_one_line(tmp_path: Path, args: list[str], code: int, words: str) -> None:
    done = run(*args, cwd=tmp_path)
    assert done.returncode == code
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert words in done.stderr and (code == 2 or "Salesforce/codegen-350M-mono" in done.stderr)


@pytest.mark.parametrize(
    "args, code, words",
    [
        ([], 2, "required: COMMAND"),
        (["shrink", "x"], 2, "invalid choice: 'shrink'"),
        (["quantize", "{pretrained}"], 2, "--out"),
        (["quantize", "./no-such-dir", "--out", "{tmp}/o"], 1, "./no-such-dir: no such directory"),
        (["quantize", "{pretrained}", "--out", "{pretrained}"], 1, "not an empty directory"),
        (["report", "{tmp}/missing"], 1, "no such directory"),
        (["report", "{pretrained}"], 1, "w8a16.json: missing"),
    ],
    ids=["no-command", "unknown-command", "no-out", "no-such-dir", "out-not-empty", "report-missing",
         "report-not-quantized"],
)
def test_errors(capsys, tmp_path: Path, pretrained: Path, args: list[str], code: int, words: str) -> None:
    args = [a.format(pretrained=pretrained, tmp=tmp_path) for a in args]
    try:
        got = main(args)
    except SystemExit as exit_:  # argparse errors
        got = exit_.code
    err = capsys.readouterr().err
    assert got == code and words in err and len(err.strip().splitlines()) == 1, err


def test_quantize_then_report(tmp_path: Path, pretrained: Path) -> None:
    out = tmp_path / "w8a16-out"
    done = run("quantize", str(pretrained), "--exclude", "lm_head", "--out", str(out), "--dtype", "bfloat16",
               cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Loading weights" in done.stderr  # transformers' bar: the layers are quantized while they load
    assert "transformer.h.1.mlp.fc_out" in done.stdout and "excluded by 'lm_head'" in done.stdout
    assert "anonymous memory" in done.stdout and "too small to test" in done.stdout  # measured in a fresh process

    manifest = json.loads((out / "w8a16.json").read_text())
    assert manifest["dtype"] == "bfloat16" and list(manifest["kept"]) == ["lm_head"]
    assert all(0 < layer["error"]["max_err_over_scale"] <= 0.5 + 1e-6 for layer in manifest["quantized"])

    # The saved model is exactly what quantizing in this process gives.
    reference = CodeGenForCausalLM.from_pretrained(pretrained, dtype=torch.bfloat16).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w8a16.Quantizer(reference, w8a16.W8A16LinearLayer, ["lm_head"])
    loaded = w8a16.load_quantized(out)
    ids = torch.tensor([[1, 7, 30, 64, 2]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, reference(ids).logits)

    report = run("report", str(out), cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    fc_in = next(layer for layer in manifest["quantized"] if layer["name"] == "transformer.h.0.mlp.fc_in")
    line = next(row for row in report.stdout.splitlines() if row.startswith("transformer.h.0.mlp.fc_in"))
    assert "128x32" in line and f"{fc_in['error']['sqnr_db']:.1f}" in line
    assert "model.safetensors" in report.stdout and "lm_head" in report.stdout


def test_quantize_a_gpt2_checkpoint_with_conv1d_layers(tmp_path: Path, capsys) -> None:
    """GPT-2's Linear layers are transformers' Conv1D (weight stored (in, out)): quantized, reported and reloaded."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=96, n_positions=64)).save_pretrained(
        tmp_path / "gpt2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tied lm_head is kept, with a warning
        assert main(["quantize", str(tmp_path / "gpt2"), "--out", str(tmp_path / "q"), "--no-measure"]) == 0
    out = capsys.readouterr().out
    assert "transformer.h.0.attn.c_attn" in out and "transformer.h.0.mlp.c_proj" in out
    manifest = json.loads((tmp_path / "q" / "w8a16.json").read_text())
    assert len(manifest["quantized"]) == 4 and all(layer["error"] for layer in manifest["quantized"])
    c_attn = next(layer for layer in manifest["quantized"] if layer["name"] == "transformer.h.0.attn.c_attn")
    assert (c_attn["in_features"], c_attn["out_features"]) == (32, 96)
    loaded = w8a16.load_quantized(tmp_path / "q")
    assert isinstance(loaded.transformer.h[0].attn.c_attn, w8a16.W8A16LinearLayer)


def test_quantize_a_sharded_checkpoint_shard_by_shard(tmp_path: Path, pretrained: Path, capsys) -> None:
    """A checkpoint in several shards (as large models are) quantizes while loading, to the same model."""
    model = CodeGenForCausalLM.from_pretrained(pretrained, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 3
    code = main(["quantize", str(tmp_path / "sharded"), "--exclude", "lm_head", "--out", str(tmp_path / "q"),
                 "--dtype", "bfloat16", "--no-measure"])
    assert code == 0, capsys.readouterr().err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w8a16.Quantizer(model, w8a16.W8A16LinearLayer, ["lm_head"])
    loaded = w8a16.load_quantized(tmp_path / "q")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_quantize_refuses_a_checkpoint_saved_already_quantized(tmp_path: Path, pretrained: Path, capsys) -> None:
    model = CodeGenForCausalLM.from_pretrained(pretrained)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w8a16.Quantizer(model, w8a16.W8A16LinearLayer, ["lm_head"])
    model.save_pretrained(tmp_path / "quantized")
    assert main(["quantize", str(tmp_path / "quantized"), "--out", str(tmp_path / "q"), "--no-measure"]) == 1
    assert "already quantized (w8a16)" in capsys.readouterr().err
