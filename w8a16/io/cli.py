"""``python -m w8a16``: quantize a model to a directory, and report on a saved one.

    python -m w8a16 quantize Salesforce/codegen-350M-mono --exclude lm_head --out codegen-w8a16
    python -m w8a16 quantize ./my-saved-model --out ./my-w8a16 --dtype bfloat16
    python -m w8a16 report codegen-w8a16

``quantize`` records each layer's error statistics in ``w8a16.json`` while the original weights are still
in memory, so ``report`` can show them later from the saved directory alone. It then loads the result in a
fresh process and measures the memory that load plus one forward costs (``--no-measure`` skips it).
Every user error is one line on stderr and a non-zero exit status, never a traceback. A model directory is
read as data: no code from it is run (or offered on the terminal), and no pickle in it is ever loaded.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from .. import quant
from ..layer import W8A16LinearLayer, linear_weight
from ..quantizer import QuantizationReport, footprint_bytes, is_linear_like, quantize_model
from .serialization import (
    CONFIG_FILE,
    MANIFEST_FILE,
    QuantizedFormatError,
    config_architecture,
    load_quantized,
    load_transformers_config,
    read_manifest,
    save_quantized,
    saved_sizes,
    transformers_model_class,
)

MEMORY_BOUND = 1.3  # load + one forward may cost at most this many times the quantized size
_DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_MEANINGFUL_BYTES = 50_000_000  # below this, the forward's fixed costs (thread pools, kernels) dominate
_OFFLINE_VALUES = {"1", "true", "yes", "on"}
_PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}


class CliError(Exception):
    """A user error: printed as one line, exit status 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m w8a16",
        description="W8A16: int8 weights with per-output-channel scales, 16-bit activations.",
        epilog="Run 'python -m w8a16 COMMAND --help' for the options of each command.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    q = commands.add_parser(
        "quantize",
        help="quantize a transformers model (hub id or local directory) and save it",
        description="Load a transformers model, replace its Linear layers by W8A16 layers, and save the result "
        "(safetensors + w8a16.json + config.json). Works offline on a local directory saved with "
        "save_pretrained(); a hub id needs the Hugging Face hub.",
    )
    q.add_argument(
        "model", metavar="MODEL_ID_OR_DIR", help="hub id (e.g. Salesforce/codegen-350M-mono) or local directory"
    )
    q.add_argument("--out", required=True, metavar="DIR", help="directory to write (must be empty or new, see --force)")
    q.add_argument(
        "--exclude", action="append", default=[], metavar="NAME",
        help="keep this Linear in full precision: a full name, a child name (lm_head) or a glob "
        "(transformer.h.*.attn.*); repeat or separate with commas",
    )
    q.add_argument(
        "--dtype", choices=list(_DTYPES), default="auto",
        help="dtype to load the model in; scales, biases and kept layers use it (default: the checkpoint's)",
    )
    q.add_argument("--force", action="store_true", help="write into --out even if it is not empty")
    q.add_argument("--no-measure", action="store_true", help="skip measuring the memory cost of loading the result")

    r = commands.add_parser(
        "report",
        help="per-layer sizes and quantization errors of a saved directory",
        description="Read w8a16.json of a saved directory and print each layer's size and error statistics "
        "(recorded at quantize time), the layers kept in full precision, and the files on disk.",
    )
    r.add_argument("directory", metavar="DIR", help="a directory written by 'quantize' or save_quantized()")
    return parser


_MEASURE = "_measure-load"  # hidden command, run in a child process by measure_load()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == [_MEASURE]:
            print(json.dumps(_measure_here(argv[1], int(argv[2]))))
            return 0
        args = build_parser().parse_args(argv)
        if args.command == "quantize":
            return _quantize(args)
        print(format_report(args.directory))
        return 0
    except (CliError, QuantizedFormatError, OSError) as err:  # OSError: FileNotFoundError, PermissionError...
        print(f"w8a16: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("w8a16: interrupted", file=sys.stderr)
        return 130


# ------------------------------------------------------------------------------------------- quantize


def _quantize(args: argparse.Namespace) -> int:
    out = Path(args.out)
    _prepare_out(out, args.force)
    exclude = [p.strip() for item in args.exclude for p in item.split(",") if p.strip()]

    from .hf import W8A16Config

    # Quantized while loading, one tensor at a time (transformers reads the shards lazily): the peak is the
    # quantized model plus about one float layer, so a checkpoint larger than memory quantizes too.
    config = W8A16Config(exclude=exclude)
    config.error_stats = {}  # filled while each float weight is still in memory; not written to config.json
    started = time.perf_counter()
    model = load_pretrained(args.model, _DTYPES[args.dtype], quantization_config=config)
    print(f"loaded and quantized {type(model).__name__} from {args.model} ({_mb(footprint_bytes(model))}, "
          f"{time.perf_counter() - started:.1f} s)")
    save_quantized(model, out, report=model.w8a16_report, error_stats=config.error_stats)
    del model
    gc.collect()
    print(format_report(out))
    if not args.no_measure:
        print(format_measurement(measure_load(out)))
    return 0


def _prepare_out(out: Path, force: bool) -> None:
    """Fail now, not after minutes of loading, if ``--out`` cannot be written.

    Asking the permission bits is not enough (root ignores them; a read-only mount or a path under a
    regular file does not show in them), so the directory is created and a probe file written and removed.
    """
    if out.is_dir():
        if not force and any(out.iterdir()):
            raise CliError(f"--out {out} exists and is not an empty directory (pass --force to write into it)")
    elif out.exists() or out.is_symlink():
        raise CliError(f"--out {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".w8a16-probe-"):
            pass
    except OSError as err:
        raise CliError(f"--out {out} cannot be written: {err.strerror or err}") from None


def load_pretrained(source: str, dtype: Any = "auto", quantization_config: Any = None) -> nn.Module:
    """A transformers model from a local directory, or from the hub when it is reachable — read as data.

    With a ``quantization_config`` (`W8A16Config`), its layers are quantized while it loads.

    No code from the checkpoint runs: ``trust_remote_code=False`` everywhere (else transformers asks on the
    terminal, and runs the checkpoint's ``.py`` file on "y"), and only safetensors weights are read
    (``use_safetensors=True``), since unpickling a ``pytorch_model.bin`` can run any code.
    """
    import transformers

    local = Path(source).expanduser()
    if local.is_dir():
        config, ref, where = _local_config(local), str(local), local / CONFIG_FILE
    else:
        _check_hub_id(source, local)
        config, ref, where = None, source, source
    try:
        if config is None:
            config = transformers.AutoConfig.from_pretrained(ref, trust_remote_code=False)
        name = config_architecture(config, where)
        cls = transformers_model_class(name, where) if name else transformers.AutoModelForCausalLM
        already = getattr(config, "quantization_config", None)  # a dict, as AutoConfig reads it from config.json
        if quantization_config is not None and already is not None:
            method = already.get("quant_method") if isinstance(already, dict) else already.quant_method
            raise CliError(f"{source} is already quantized ({method}); pass the original model")
        extra = {} if quantization_config is None else {"quantization_config": quantization_config}
        model = cls.from_pretrained(ref, config=config, dtype=dtype, trust_remote_code=False, use_safetensors=True,
                                    **extra)
    except (QuantizedFormatError, CliError):
        raise  # it names the file already
    except Exception as err:  # a bad checkpoint raises anything: OSError, ValueError, SafetensorError...
        raise CliError(f"cannot load {source!r}: {_one_line(err)}") from None
    return model.eval()


def _local_config(local: Path) -> Any:
    """The config of a local checkpoint directory, once it is known to hold safetensors weights."""
    if (local / MANIFEST_FILE).is_file():
        raise CliError(f"{local} holds a model already quantized by w8a16 ({MANIFEST_FILE}); pass the original")
    config = load_transformers_config(local)
    if not any(local.glob("*.safetensors")):
        pickles = sorted(p.name for p in local.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        found = f"only a pickle checkpoint ({', '.join(pickles)})" if pickles else "none"
        raise CliError(
            f"{local}: w8a16 reads safetensors weights only, and found {found}; a pickle is never loaded "
            "(unpickling can run code): re-save the model with save_pretrained(), which writes safetensors"
        )
    return config


def _check_hub_id(source: str, local: Path) -> None:
    """``source`` is not a directory: say so if it looks like a path, or if the hub is switched off."""
    if source.startswith((".", "/", "~")) or local.exists():
        raise CliError(f"{source}: no such directory")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in _OFFLINE_VALUES:
        raise CliError(
            f"{source!r} is not a local directory and HF_HUB_OFFLINE is set, so it cannot be downloaded "
            "from the hub (unset HF_HUB_OFFLINE or pass a directory saved with save_pretrained())"
        )


class _Tracked(W8A16LinearLayer):
    """A target class for `quantize_model` that also records error stats and ticks a progress bar.

    It returns plain `W8A16LinearLayer` objects, so the saved model holds no trace of it.
    """

    names: dict[int, str] = {}
    stats: dict[str, quant.ErrorStats] = {}
    bar: Any = None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> W8A16LinearLayer:
        layer = W8A16LinearLayer.from_linear(linear)
        name = cls.names[id(linear)]
        cls.stats[name] = quant.error_stats(linear_weight(linear), layer.int8_weights, layer.scales)
        if cls.bar is not None:
            cls.bar.set_postfix_str(".".join(name.split(".")[-4:]), refresh=False)
            cls.bar.update(1)
        return layer


def quantize_with_stats(
    model: nn.Module, exclude: Iterable[str] = (), progress: bool = True
) -> tuple[QuantizationReport, dict[str, quant.ErrorStats]]:
    """`quantize_model` with a tqdm bar over the layers, returning each layer's `ErrorStats` as well."""
    from tqdm.auto import tqdm

    linears = {id(m): n for n, m in model.named_modules() if is_linear_like(m)}
    tracked = type("Tracked", (_Tracked,), {"names": linears, "stats": {}, "bar": None})
    with tqdm(total=len(linears), desc="quantizing", unit="layer", disable=not progress) as bar:
        tracked.bar = bar
        report = quantize_model(model, tracked, list(exclude))
        bar.update(bar.total - bar.n)  # the kept ones
    return report, dict(tracked.stats)


# --------------------------------------------------------------------------------------------- report


def format_report(directory: str | os.PathLike) -> str:
    """A table of every layer of a saved directory: shape, bytes, and the error recorded at quantize time."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such directory")
    manifest = read_manifest(directory)
    lines = [
        f"{directory}: {manifest['model_class']}, {manifest.get('dtype', '?')}, "
        f"w8a16 format v{manifest['format_version']}",
        f"{'layer':<40} {'out x in':>13} {'bytes':>10} {'SQNR dB':>8} {'rel err':>8} {'max|err|/scale':>14}",
    ]
    q_bytes = 0
    for layer in [*manifest["quantized"], *manifest["quantized_conv2d"]]:
        if "kernel_size" in layer:  # a Conv2d: one row per output channel, of in/groups · kh · kw weights
            kh, kw = layer["kernel_size"]
            n_out, n_in = layer["out_channels"], layer["in_channels"] // layer["groups"] * kh * kw
        else:
            n_out, n_in = layer["out_features"], layer["in_features"]
        size = n_out * n_in + n_out * _itemsize(layer["dtype"]) * (2 if layer["bias"] else 1)
        q_bytes += size
        err = layer.get("error") or {}
        lines.append(
            f"{layer['name']:<40} {f'{n_out}x{n_in}':>13} {_mb(size):>10} {_fmt(err.get('sqnr_db'), '.1f'):>8} "
            f"{_fmt(err.get('rel_fro'), '.3%'):>8} {_fmt(err.get('max_err_over_scale'), '.3f'):>14}"
        )
    k_bytes = 0
    if manifest["kept"]:
        lines.append("kept in full precision:")
    for name, info in manifest["kept"].items():
        n_out, n_in = info["out_features"], info["in_features"]
        size = (n_out * n_in + (n_out if info["bias"] else 0)) * _itemsize(info["dtype"])
        shares = manifest["tied"].get(f"{name}.weight")
        k_bytes += 0 if shares else size
        shown = f"(= {shares.removesuffix('.weight')})" if shares else _mb(size)  # stored once, with the other
        lines.append(f"  {name:<38} {f'{n_out}x{n_in}':>13} {shown:>10}  {info['why']}")
    n_quantized = len(manifest["quantized"]) + len(manifest["quantized_conv2d"])
    lines.append(
        f"{n_quantized} quantized layer(s): {_mb(q_bytes)}; {len(manifest['kept'])} kept: "
        f"{_mb(k_bytes)}{' (tied weights counted once)' if any(manifest['tied']) else ''}; "
        f"whole model in memory: {_mb(manifest['footprint_bytes'])}"
    )
    sizes = saved_sizes(directory)
    files = ", ".join(f"{n} {_mb(s)}" for n, s in sizes.items())
    lines.append(f"on disk: {files}; total {_mb(sum(sizes.values()))}")
    return "\n".join(lines)


def _itemsize(dtype_name: str) -> int:
    return torch.empty((), dtype=getattr(torch, dtype_name)).element_size()


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.2f} MB" if n >= 10_000 else f"{n / 1e3:.1f} kB"


def _one_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0] if text else type(err).__name__


# -------------------------------------------------------------------------------------- memory check


def measure_load(directory: str | os.PathLike, tokens: int = 8, timeout: float = 600) -> dict[str, Any]:
    """Load ``directory`` in a fresh Python process, run one forward, and return what it measured.

    See `_measure_here` for what exactly is measured. A fresh process, so nothing this process already
    holds (the full-precision model, allocator caches) can hide or inflate the cost.
    """
    cmd = [sys.executable, "-m", "w8a16", _MEASURE, str(directory), str(tokens)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise CliError(f"measuring the load of {directory} took over {timeout:.0f} s; gave up") from None
    if done.returncode != 0:
        raise CliError(f"measuring the load of {directory} failed: {_one_line(done.stderr or done.stdout)}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _rss_anon() -> int:
    """Resident anonymous memory of this process in bytes (heap, not file-backed pages like an mmap)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise CliError("/proc/self/status has no RssAnon (Linux only)")


def _measure_here(directory: str, tokens: int) -> dict[str, Any]:
    """Peak RssAnon during ``load_quantized(directory)`` plus one forward, over the baseline before it.

    The baseline is taken after importing torch, transformers and the model's class and running one tiny
    matmul (thread pools), so it holds the libraries but no model. A thread polls /proc/self/status every
    millisecond; the peak is the largest reading, also read once more at the end.
    """
    manifest = read_manifest(directory)
    if manifest["transformers"]:
        transformers_model_class(manifest["model_class"], directory)  # import the modelling code before the baseline
    torch.ones(8, 8) @ torch.ones(8, 8)
    gc.collect()
    baseline = _rss_anon()
    peak = [baseline]
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_anon())
            stop.wait(0.001)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    t0 = time.perf_counter()
    model = load_quantized(directory)
    t1 = time.perf_counter()
    vocab = getattr(getattr(model, "config", None), "vocab_size", 2)
    ids = torch.randint(0, vocab, (1, tokens))
    with torch.inference_mode():
        model(ids)
    t2 = time.perf_counter()
    stop.set()
    poller.join()
    peak[0] = max(peak[0], _rss_anon())
    return {
        "baseline_bytes": baseline,
        "peak_bytes": peak[0],
        "extra_bytes": peak[0] - baseline,
        "quantized_bytes": footprint_bytes(model),
        "bound_bytes": int(MEMORY_BOUND * footprint_bytes(model)),
        "load_s": t1 - t0,
        "forward_s": t2 - t1,
        "tokens": tokens,
    }


def format_measurement(m: dict[str, Any]) -> str:
    ok = "within" if m["extra_bytes"] <= m["bound_bytes"] else "OVER"
    if m["quantized_bytes"] < _MEANINGFUL_BYTES:
        ok = f"a model under {_mb(_MEANINGFUL_BYTES)} is too small to test, fixed costs dominate; not checking"
    return (
        f"load + one forward ({m['tokens']} tokens) in a fresh process: +{_mb(m['extra_bytes'])} anonymous memory "
        f"({m['extra_bytes'] / m['quantized_bytes']:.2f}x the quantized {_mb(m['quantized_bytes'])}; {ok} the "
        f"{MEMORY_BOUND}x bound), load {m['load_s']:.2f} s, forward {m['forward_s']:.2f} s"
    )


__all__ = ["main", "build_parser", "quantize_with_stats", "load_pretrained", "format_report", "measure_load"]
