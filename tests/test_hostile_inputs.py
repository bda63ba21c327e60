"""A checkpoint directory is data, never code; and the CLI answers every bad input with one line, no traceback.

Each hostile input is tried twice where it can be: through `load_quantized` (a `QuantizedFormatError` naming the
file and the field) and through ``python -m w8a16`` (``w8a16: error: ...`` as the only line on stderr, exit 1).
The code-execution cases also check that nothing ran (a marker file the code would write stays absent) and that
nothing was asked (``input`` is never called, even when it would answer "y").
"""

from __future__ import annotations

import builtins
import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from transformers import CodeGenConfig, CodeGenForCausalLM

import w8a16
from w8a16 import QuantizedFormatError, load_quantized, save_quantized
from w8a16.io import cli
from w8a16.io.serialization import MANIFEST_FILE, WEIGHTS_FILE

def tiny_codegen() -> CodeGenForCausalLM:
    torch.manual_seed(0)
    config = CodeGenConfig(n_layer=1, n_embd=32, n_head=4, rotary_dim=4, vocab_size=96, n_positions=64, n_ctx=64,
                           bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return CodeGenForCausalLM(config).eval()


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CodeGen saved with save_pretrained(): what `quantize` reads."""
    directory = tmp_path_factory.mktemp("pretrained")
    tiny_codegen().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same model quantized (lm_head kept) and saved with save_quantized(): what `load_quantized` reads."""
    model = tiny_codegen()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w8a16.Quantizer(model, w8a16.W8A16LinearLayer, ["lm_head"])
    directory = tmp_path_factory.mktemp("saved")
    save_quantized(model, directory)
    return directory


@pytest.fixture
def pretrained(tmp_path: Path, pretrained_dir: Path) -> Path:
    return Path(shutil.copytree(pretrained_dir, tmp_path / "pretrained"))


@pytest.fixture
def saved(tmp_path: Path, saved_dir: Path) -> Path:
    return Path(shutil.copytree(saved_dir, tmp_path / "saved"))


@pytest.fixture
def no_prompt(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Answer "y" to any question on the terminal, and record it: the list must stay empty."""
    asked: list[str] = []

    def answer_yes(prompt: str = "") -> str:
        asked.append(prompt)
        return "y"

    monkeypatch.setattr(builtins, "input", answer_yes)
    return asked


def run_main(capsys: pytest.CaptureFixture, *args: Any) -> str:
    """``main(args)`` in this process; it must fail with exactly one ``w8a16: error:`` line. Returns that line."""
    code = cli.main([str(a) for a in args])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("w8a16: error: "), err
    return err


def run_subprocess(*args: Any, cwd: Path, **kwargs: Any) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "HF_HOME": str(cwd / "hf-home")}
    return subprocess.run([sys.executable, "-m", "w8a16", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300, **kwargs)


# --------------------------------------------------------------------------------------------- no code run


def plant_custom_code(directory: Path, model_type: str = "w8a16-hostile") -> Path:
    """Point config.json's auto_map at a hostile.py beside it (which writes a marker when run); return the marker."""
    marker = directory / "MARKER-code-ran"
    (directory / "hostile.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import PretrainedConfig, PreTrainedModel\n"
        "class HostileConfig(PretrainedConfig):\n    model_type = 'w8a16-hostile'\n"
        "class HostileModel(PreTrainedModel):\n    config_class = HostileConfig\n"
    )
    config = json.loads((directory / "config.json").read_text())
    config.update(model_type=model_type, auto_map={"AutoConfig": "hostile.HostileConfig",
                                                   "AutoModelForCausalLM": "hostile.HostileModel"})
    (directory / "config.json").write_text(json.dumps(config))
    return marker


def test_load_quantized_never_runs_code_from_the_directory(saved: Path, no_prompt: list[str]) -> None:
    marker = plant_custom_code(saved)
    with pytest.raises(QuantizedFormatError, match=r"config\.json: .*hostile\.py.* never runs code"):
        load_quantized(saved)
    assert not marker.exists() and no_prompt == []


def test_cli_never_runs_code_from_the_directory(capsys, tmp_path: Path, pretrained: Path, no_prompt: list[str]) -> None:
    marker = plant_custom_code(pretrained)
    err = run_main(capsys, "quantize", pretrained, "--out", tmp_path / "out", "--no-measure")
    assert "config.json" in err and "hostile.py" in err
    assert not marker.exists() and no_prompt == []


@pytest.mark.parametrize("stdin", ["y\n", None], ids=["stdin-answers-y", "stdin-devnull"])
def test_cli_subprocess_never_prompts(tmp_path: Path, pretrained: Path, stdin: str | None) -> None:
    """A real process with a stdin that would say "y" to transformers' "run the custom code?" prompt."""
    marker = plant_custom_code(pretrained)
    stdin_kwargs = {"input": stdin} if stdin is not None else {"stdin": subprocess.DEVNULL}
    done = run_subprocess("quantize", pretrained, "--out", tmp_path / "out", cwd=tmp_path, **stdin_kwargs)
    assert done.returncode == 1
    assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith("w8a16: error: "), done.stderr
    assert "hostile.py" in done.stderr and "[y/N]" not in done.stdout + done.stderr
    assert not marker.exists()


def test_builtin_model_type_ignores_auto_map(pretrained: Path, no_prompt: list[str]) -> None:
    """A model_type transformers knows wins over auto_map: the model loads, and still no code runs."""
    marker = plant_custom_code(pretrained, model_type="codegen")
    model = cli.load_pretrained(str(pretrained))
    assert type(model) is CodeGenForCausalLM
    assert not marker.exists() and no_prompt == []


class Spy:
    """Stands in for an attribute of transformers; records being called."""

    calls: list[Any] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        Spy.calls.append(args)


CLASS_NAMES = ["logging", "AutoConfig", "__class__", "is_torch_available", "W8a16Spy", "NoSuchModel", "a b"]


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    # sys.modules, not the name imported above: transformers replaces its lazy module there on first use
    monkeypatch.setattr(sys.modules["transformers"], "W8a16Spy", Spy, raising=False)
    monkeypatch.setattr(Spy, "calls", [])
    return Spy.calls


def set_architecture(directory: Path, name: str) -> None:
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "architectures": [name]}))


@pytest.mark.parametrize("name", CLASS_NAMES)
def test_load_quantized_only_builds_model_classes(saved: Path, spy: list[Any], name: str) -> None:
    set_architecture(saved, name)
    edit_manifest(saved, lambda m: m.update(model_class=name))
    with pytest.raises(QuantizedFormatError, match="not a model class|model_class must be"):
        load_quantized(saved)
    assert spy == []


@pytest.mark.parametrize("name", CLASS_NAMES)
def test_cli_only_builds_model_classes(capsys, tmp_path: Path, pretrained: Path, spy: list[Any], name: str) -> None:
    set_architecture(pretrained, name)
    err = run_main(capsys, "quantize", pretrained, "--out", tmp_path / "out", "--no-measure")
    assert "config.json" in err and "is not a model class" in err
    assert spy == []


class _Touch:
    """Unpickling this creates a file: what a hostile pytorch_model.bin would do (with worse code)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Callable, tuple]:
        return Path.touch, (self.path,)


def test_cli_refuses_a_pickle_checkpoint(capsys, tmp_path: Path, pretrained: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "MARKER-unpickled"
    (pretrained / WEIGHTS_FILE).unlink()
    (pretrained / "pytorch_model.bin").write_bytes(pickle.dumps({"transformer.wte.weight": _Touch(marker)}))
    loads: list[str] = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append("torch.load"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: loads.append("pickle.load"))
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: loads.append("pickle.loads"))
    err = run_main(capsys, "quantize", pretrained, "--out", tmp_path / "out", "--no-measure")
    assert "pytorch_model.bin" in err and "safetensors" in err
    assert loads == [] and not marker.exists()


# ---------------------------------------------------------------------------------------------- manifests


def edit_manifest(directory: Path, edit: Callable[[dict], Any]) -> None:
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    edit(manifest)
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))


def raw_manifest(text: Callable[[str], str]) -> Callable[[Path], None]:
    """A damage that rewrites the manifest's text (for what json.dumps cannot write)."""
    def damage(directory: Path) -> None:
        path = directory / MANIFEST_FILE
        path.write_text(text(path.read_text()))
    return damage


def field(edit: Callable[[dict], Any]) -> Callable[[Path], None]:
    return lambda directory: edit_manifest(directory, edit)


def set_layer(key: str, value: Any) -> Callable[[Path], None]:
    return field(lambda m: m["quantized"][0].__setitem__(key, value))


def set_kept(key: str, value: Any) -> Callable[[Path], None]:
    return field(lambda m: m["kept"]["lm_head"].__setitem__(key, value))


def set_file(key: str, value: Any) -> Callable[[Path], None]:
    return field(lambda m: m["files"][WEIGHTS_FILE].__setitem__(key, value))


def nested(depth: int) -> Callable[[Path], None]:
    return raw_manifest(lambda text: text.rstrip()[:-1] + ', "x": ' + "[" * depth + "]" * depth + "}")


def sparse_file(size: int) -> Callable[[Path], None]:
    def damage(directory: Path) -> None:
        with open(directory / MANIFEST_FILE, "r+b") as f:
            f.truncate(size)  # sparse: costs no disk, and no time unless read
    return damage


MANIFESTS: dict[str, tuple[Callable[[Path], None], str]] = {
    # name: (damage, words the message must contain besides the file name)
    "nested-100000-deep": (nested(100_000), "nested 100001 levels deep"),
    "nested-40-deep": (nested(40), "nested 41 levels deep"),
    "huge-file": (sparse_file(17 * 2**20), "larger than 16 MiB"),
    "not-utf8": (lambda d: (d / MANIFEST_FILE).write_bytes(b"\xff\xfe\xfd{"), "not valid JSON"),
    "not-an-object": (raw_manifest(lambda t: "[1, 2]"), "not a w8a16 manifest"),
    "nan": (raw_manifest(lambda t: t.replace('"footprint_bytes": ', '"footprint_bytes": NaN, "_": ')), "NaN"),
    "infinity": (raw_manifest(lambda t: t.replace('"footprint_bytes": ', '"footprint_bytes": -Infinity, "_": ')),
                 "-Infinity"),
    "1e999": (raw_manifest(lambda t: t.replace('"footprint_bytes": ', '"footprint_bytes": 1e999, "_": ')), "1e999"),
    "5000-digit-int": (raw_manifest(lambda t: t.replace('"footprint_bytes": ', '"footprint_bytes": ' + "7" * 5000
                                                        + ', "_": ')), "digits"),
    "int-over-2**63": (field(lambda m: m.update(footprint_bytes=2**64)), "footprint_bytes must be"),
    "format-version-true": (field(lambda m: m.update(format_version=True)), "format_version True"),
    "format-version-float": (field(lambda m: m.update(format_version=1.0)), "format_version 1.0"),
    "footprint-missing": (field(lambda m: m.pop("footprint_bytes")), "footprint_bytes is missing"),
    "model-class-int": (field(lambda m: m.update(model_class=5)), "model_class must be a class name"),
    "transformers-string": (field(lambda m: m.update(transformers="yes")), "transformers must be true or false"),
    "dtype-int8": (field(lambda m: m.update(dtype="int8")), "dtype must be a floating-point dtype"),
    "quantized-dict": (field(lambda m: m.update(quantized={})), "quantized must be a JSON array"),
    "layer-string": (field(lambda m: m["quantized"].__setitem__(0, "fc_in")), "quantized[0] must be a JSON object"),
    "layer-list": (field(lambda m: m["quantized"].__setitem__(0, [1])), "quantized[0] must be a JSON object"),
    "in-features-string": (set_layer("in_features", "32"), "quantized[0].in_features must be a positive integer"),
    "in-features-float": (set_layer("in_features", 32.0), "quantized[0].in_features must be"),
    "in-features-bool": (set_layer("in_features", True), "quantized[0].in_features must be"),
    "in-features-negative": (set_layer("in_features", -32), "quantized[0].in_features must be"),
    "in-features-zero": (set_layer("in_features", 0), "quantized[0].in_features must be"),
    "out-features-missing": (field(lambda m: m["quantized"][0].pop("out_features")),
                             "quantized[0].out_features is missing"),
    "bias-string": (set_layer("bias", "yes"), "quantized[0].bias must be true or false"),
    "dtype-not-float": (set_layer("dtype", "int8"), "quantized[0].dtype must be a floating-point dtype"),
    "dtype-dunder": (set_layer("dtype", "__class__"), "quantized[0].dtype must be"),
    "dtype-attribute": (set_layer("dtype", "float"), "quantized[0].dtype must be"),
    "dtype-number": (set_layer("dtype", 16), "quantized[0].dtype must be"),
    "name-number": (set_layer("name", 5), "quantized[0].name must be a dotted module"),
    "name-empty": (set_layer("name", ""), "quantized[0].name must be"),
    "name-double-dot": (set_layer("name", "transformer..h"), "quantized[0].name must be"),
    "name-twice": (field(lambda m: m["quantized"].append(dict(m["quantized"][0]))), "listed twice"),
    "error-string": (set_layer("error", "high"), "quantized[0].error must be a JSON object"),
    "error-stat-string": (set_layer("error", {"sqnr_db": "40"}), "quantized[0].error.sqnr_db must be a finite"),
    "error-stat-4000-digits": (set_layer("error", {"sqnr_db": 10**3999}), "quantized[0].error.sqnr_db must be"),
    "kept-string": (field(lambda m: m["kept"].__setitem__("lm_head", "kept")), "kept['lm_head'] must be a JSON"),
    "kept-list": (field(lambda m: m.update(kept=["lm_head"])), "kept must be a JSON object"),
    "kept-dtype": (set_kept("dtype", "int64"), "kept['lm_head'].dtype must be"),
    "kept-why-number": (set_kept("why", 3), "kept['lm_head'].why must be a string"),
    "kept-in-features-negative": (set_kept("in_features", -1), "kept['lm_head'].in_features must be"),
    "kept-name-empty": (field(lambda m: m["kept"].__setitem__("", m["kept"]["lm_head"])), "a key of kept"),
    "tied-list": (field(lambda m: m.update(tied=[])), "tied must be a JSON object"),
    "tied-value-number": (field(lambda m: m.update(tied={"lm_head.weight": 5})), "tied['lm_head.weight'] must be"),
    "tied-value-null": (field(lambda m: m.update(tied={"lm_head.weight": None})), "tied['lm_head.weight'] must be"),
    "files-empty": (field(lambda m: m.update(files={})), "files['model.safetensors'] is missing"),
    "files-entry-string": (field(lambda m: m["files"].__setitem__(WEIGHTS_FILE, "x")),
                           "files['model.safetensors'] must be a JSON object"),
    "files-bytes-string": (set_file("bytes", "100"), "files['model.safetensors'].bytes must be"),
    "files-bytes-negative": (set_file("bytes", -1), "files['model.safetensors'].bytes must be"),
    "files-crc-number": (set_file("crc32", 5), "files['model.safetensors'].crc32 must be 8 lowercase hex"),
    "files-crc-bad": (set_file("crc32", "xyz"), "files['model.safetensors'].crc32 must be"),
    "buffers-missing": (field(lambda m: m.pop("nonpersistent_buffers")), "nonpersistent_buffers is missing"),
    "buffers-list": (field(lambda m: m.update(nonpersistent_buffers=[])), "nonpersistent_buffers must be a JSON"),
    "buffers-prefix-number": (field(lambda m: m["nonpersistent_buffers"].update(prefix=5)),
                              "nonpersistent_buffers.prefix must be"),
    "buffers-prefix-empty": (field(lambda m: m["nonpersistent_buffers"].update(prefix="")),
                             "nonpersistent_buffers.prefix must be"),
    "buffers-names-string": (field(lambda m: m["nonpersistent_buffers"].update(names="abc")),
                             "nonpersistent_buffers.names must be a list of strings"),
    "buffers-names-numbers": (field(lambda m: m["nonpersistent_buffers"].update(names=[1])),
                              "nonpersistent_buffers.names must be"),
}


@pytest.mark.parametrize("case", list(MANIFESTS))
def test_broken_manifest_load(saved: Path, case: str) -> None:
    damage, words = MANIFESTS[case]
    damage(saved)
    with pytest.raises(QuantizedFormatError) as caught:
        load_quantized(saved)
    message = str(caught.value)
    assert MANIFEST_FILE in message and words in message, message
    assert len(message) < 1000 and "\n" not in message


@pytest.mark.parametrize("case", list(MANIFESTS))
def test_broken_manifest_cli(capsys, saved: Path, case: str) -> None:
    damage, words = MANIFESTS[case]
    damage(saved)
    err = run_main(capsys, "report", saved)
    assert MANIFEST_FILE in err and words in err, err


def test_unknown_keys_and_error_stats_still_load(saved: Path) -> None:
    """The checks refuse wrong values, not what a format-1 manifest may carry: extra keys, null statistics."""
    edit_manifest(saved, lambda m: (m.update(comment="added by hand"),
                                    m["quantized"][0].update(error={"sqnr_db": None, "rel_fro": 0.01})))
    assert type(load_quantized(saved)) is CodeGenForCausalLM


# ---------------------------------------------------------------------------------------- safetensors header


def rewrite_header(text: Callable[[str], str]) -> Callable[[Path], None]:
    """Replace model.safetensors' header by ``text(header)`` (the length field follows; the data is kept)."""
    def damage(directory: Path) -> None:
        raw = (directory / WEIGHTS_FILE).read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = text(raw[8:8 + n].decode()).encode()
        (directory / WEIGHTS_FILE).write_bytes(len(header).to_bytes(8, "little") + header + raw[8 + n:])
    return damage


def add_entry(text: str) -> Callable[[Path], None]:
    """Add ``text`` (a key and a value) to the header object (the writer pads the header with spaces)."""
    return rewrite_header(lambda header: header.rstrip()[:-1] + ", " + text + "}")


def first_entry(edit: Callable[[dict], Any]) -> Callable[[Path], None]:
    def text(header: str) -> str:
        parsed = json.loads(header)
        edit(next(v for k, v in parsed.items() if k != "__metadata__"))
        return json.dumps(parsed)
    return rewrite_header(text)


HEADERS: dict[str, tuple[Callable[[Path], None], str]] = {
    "nested-100000-deep": (rewrite_header(lambda h: '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"), "nested"),
    "nan": (add_entry('"x": NaN'), "NaN"),
    "1e999": (add_entry('"x": 1e999'), "1e999"),
    "5000-digit-offset": (add_entry('"x": {"dtype": "I8", "shape": [1], "data_offsets": [0, ' + "9" * 5000 + "]}"),
                          "digits"),
    "offset-over-2**64": (first_entry(lambda e: e.update(data_offsets=[0, 2**64])), "bad or unknown"),
    "shape-strings": (first_entry(lambda e: e.update(shape=[str(d) for d in e["shape"]])), "bad or unknown"),
    "shape-floats": (first_entry(lambda e: e.update(shape=[float(d) for d in e["shape"]])), "bad or unknown"),
    "shape-bools": (first_entry(lambda e: e.update(shape=[True])), "bad or unknown"),
    "entry-not-object": (rewrite_header(lambda h: '{"x": [1, 2]}'), "bad or unknown"),
    "not-an-object": (rewrite_header(lambda h: "[]"), "not a JSON object"),
}


@pytest.mark.parametrize("case", list(HEADERS))
def test_broken_safetensors_header(saved: Path, case: str) -> None:
    damage, words = HEADERS[case]
    damage(saved)
    with pytest.raises(QuantizedFormatError) as caught:
        load_quantized(saved)
    message = str(caught.value)
    assert f"{WEIGHTS_FILE}: not a valid safetensors file" in message and words in message, message


# ------------------------------------------------------------------------------------- CLI: other bad input


def truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def test_measure_truncated_weights_is_one_line(capsys, saved: Path) -> None:
    """The hidden command that `quantize` runs in a child process reads model.safetensors: one line too."""
    truncate(saved / WEIGHTS_FILE, (saved / WEIGHTS_FILE).stat().st_size - 100)
    err = run_main(capsys, "_measure-load", saved, 8)
    assert WEIGHTS_FILE in err


PRETRAINED_DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated-weights": (lambda d: truncate(d / WEIGHTS_FILE, (d / WEIGHTS_FILE).stat().st_size - 100), "cannot load"),
    "weights-header-only": (lambda d: truncate(d / WEIGHTS_FILE, 5), "cannot load"),
    "config-not-json": (lambda d: (d / "config.json").write_text("{oops"), "config.json: not valid JSON"),
    "config-nested": (lambda d: (d / "config.json").write_text('{"a": ' + "[" * 5000 + "]" * 5000 + "}"), "nested"),
    "config-not-object": (lambda d: (d / "config.json").write_text("[]"), "config.json: not a JSON object"),
    "config-missing": (lambda d: (d / "config.json").unlink(), "config.json: missing"),
    "unknown-model-type": (lambda d: (d / "config.json").write_text('{"model_type": "martian"}'),
                           "config.json: cannot be read as a transformers config"),
    "unknown-architecture": (lambda d: set_architecture(d, "MartianForCausalLM"), "is not a model class"),
    "architectures-string": (lambda d: (d / "config.json").write_text(json.dumps(
        {**json.loads((d / "config.json").read_text()), "architectures": "CodeGenForCausalLM"})),
        "architectures must be a list"),
    "already-quantized": (lambda d: (d / MANIFEST_FILE).write_text("{}"), "already quantized by w8a16"),
}


@pytest.mark.parametrize("case", list(PRETRAINED_DAMAGE))
def test_cli_bad_model_directory(capsys, tmp_path: Path, pretrained: Path, case: str) -> None:
    damage, words = PRETRAINED_DAMAGE[case]
    damage(pretrained)
    err = run_main(capsys, "quantize", pretrained, "--out", tmp_path / "out", "--no-measure")
    assert words in err, err


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """`quantize` must fail before loading any model: record each load_pretrained() call (which then fails)."""
    calls: list[str] = []

    def load_pretrained(source: str, *args: Any, **kwargs: Any) -> None:
        calls.append(source)
        raise cli.CliError("stopped by the test after the --out checks")

    monkeypatch.setattr(cli, "load_pretrained", load_pretrained)
    return calls


@pytest.mark.parametrize(
    "out, force, words",
    [
        ("{file}", True, "exists and is not a directory"),
        ("{file}", False, "exists and is not a directory"),
        ("{file}/out", True, "cannot be written"),
        ("/proc/w8a16-test-out/out", False, "cannot be written"),
        ("{nonempty}", False, "not an empty directory"),
    ],
    ids=["file-with-force", "file", "under-a-file", "under-proc", "non-empty"],
)
def test_cli_out_fails_before_loading(capsys, tmp_path: Path, pretrained: Path, loads: list[str], out: str,
                                      force: bool, words: str) -> None:
    (tmp_path / "file").write_text("not a directory")
    (tmp_path / "nonempty").mkdir()
    (tmp_path / "nonempty" / "keep.txt").write_text("")
    out = out.format(file=tmp_path / "file", nonempty=tmp_path / "nonempty")
    err = run_main(capsys, "quantize", pretrained, "--out", out, *(["--force"] if force else []))
    assert words in err and loads == []
    assert (tmp_path / "file").read_text() == "not a directory"


def test_cli_out_probe_leaves_nothing(capsys, tmp_path: Path, pretrained: Path, loads: list[str]) -> None:
    """A writable --out is created, probed, and left empty for the save (the stubbed load stops the run)."""
    out = tmp_path / "new" / "out"
    assert "stopped by the test" in run_main(capsys, "quantize", pretrained, "--out", out)
    assert loads == [str(pretrained)] and out.is_dir() and list(out.iterdir()) == []
