"""Save a quantized model to disk and load it back at quantized memory cost.

A saved directory holds three kinds of file, and no pickle anywhere:

* ``model.safetensors`` — every tensor of the model: the int8 weights, scales and biases of the quantized
  layers, the full-precision tensors that were kept, and the *non-persistent* buffers (rotary tables,
  causal masks). Those are not in ``state_dict()``, and a model rebuilt on the ``meta`` device would have
  no values for them, so they are stored too, under the reserved prefix ``NONPERSISTENT_PREFIX``.
  Tensors shared by several names (an lm_head tied to the embeddings) are stored once; safetensors
  refuses shared storage, and storing the tie keeps the file small. The ties are restored on load.
* ``w8a16.json`` — the manifest: format version, which Linear layers were quantized (name, shape, bias,
  dtype, error statistics when known), which were kept and why, the ties, and the file's size and CRC-32.
* ``config.json`` (+ ``generation_config.json``) for a transformers model, so ``load_quantized(dir)``
  can rebuild it without the original checkpoint.

Loading never materialises the full-precision weights: the model is built on ``meta`` (no memory), the
recorded Linear layers are swapped for meta `W8A16LinearLayer` shells, and each tensor is read straight
from the file into a fresh CPU tensor that is then *assigned* (``load_state_dict(assign=True)``). Fresh
tensors own 64-byte-aligned, contiguous memory, which the fast int8 kernels need (a tensor viewing an
mmap of the file is only 8-byte aligned), and reading with ``readinto`` keeps the peak close to the
quantized size. Every problem with the input is a `QuantizedFormatError` (a ``ValueError``) or a
``FileNotFoundError`` whose message names the file.

A saved directory is data, never code. Its JSON is parsed with limits (size, nesting depth, finite numbers)
and the manifest is checked field by field before anything trusts it; transformers is asked never to run
code that a ``config.json`` points to (``auto_map``), and a class named in a file is only ever a transformers
model class, never any other attribute of the library.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import reprlib
import sys
import zlib
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

import numpy as np
import torch
from torch import nn

from ..layer import W8A16Conv2d, W8A16LinearLayer, linear_weight
from ..quant import ErrorStats
from ..quantizer import QuantizationReport, footprint_bytes, is_linear_like

FORMAT_NAME = "w8a16"
FORMAT_VERSION = 1
MANIFEST_FILE = "w8a16.json"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
# No module name can contain ":" in practice (nor "." at all), so this never collides with a state-dict key.
NONPERSISTENT_PREFIX = "w8a16:nonpersistent/"

_MAX_HEADER_BYTES = 100 * 2**20  # a header this large is a corrupt length field, not a model
_MAX_JSON_BYTES = 16 * 2**20  # w8a16.json and config.json are kilobytes, even for the largest models
_MAX_JSON_DEPTH = 32  # our files nest 4 levels, transformers configs a few more; json recurses once per level
_MAX_COUNT = 2**63 - 1  # sizes and offsets must fit torch's int64
_CHUNK = 64 * 2**20  # read at most this many bytes per system call

# safetensors dtype codes <-> torch dtypes (only those torch can hold)
_ST_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _code, _name in [("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")]:
    if hasattr(torch, _name):
        _ST_TO_TORCH[_code] = getattr(torch, _name)


# Every floating dtype this torch has, by the name save_quantized writes (read from vars(), which runs nothing).
_FLOAT_DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype) and d.is_floating_point
}

_T = TypeVar("_T")


class QuantizedFormatError(ValueError):
    """A saved quantized model is damaged, of another format version, or does not fit the skeleton."""


# ----------------------------------------------------------------------------------------------- save


def save_quantized(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    report: QuantizationReport | None = None,
    error_stats: Mapping[str, ErrorStats] | None = None,
) -> Path:
    """Write ``model`` (already quantized) to ``directory``; return the path of the manifest.

    ``report`` (default: ``model.w8a16_report`` left by `Quantizer`) says why Linear layers were kept;
    ``error_stats`` (layer name -> `ErrorStats`, computed while the original weights were still there)
    goes into the manifest so ``python -m w8a16 report`` can show it later. Existing files of the same
    names are replaced; the manifest is written last, so a directory without one is an unfinished save.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    report = report if report is not None else getattr(model, "w8a16_report", None)

    tensors, ties = _collect_tensors(model)
    nonpersistent = [k[len(NONPERSISTENT_PREFIX):] for k in tensors if k.startswith(NONPERSISTENT_PREFIX)]
    layers = _quantized_layers(model, error_stats or {})
    convs = _quantized_convs(model, error_stats or {})
    for layer in [*layers, *convs]:
        scales = tensors[f"{layer['name']}.scales"]
        if not torch.isfinite(scales).all():
            raise QuantizedFormatError(f"refusing to save: {layer['name']}.scales contains NaN or Inf")

    from safetensors.torch import save_file  # the reference writer, so any safetensors reader can open it

    weights = directory / WEIGHTS_FILE
    tmp = weights.with_name(weights.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, weights)
    del tensors

    is_transformers = _save_transformers_config(model, directory)
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "w8a16_version": _package_version(),
        "model_class": type(model).__name__,
        "transformers": is_transformers,
        "dtype": _dtype_name(_main_dtype(model)),
        "footprint_bytes": footprint_bytes(model),
        "files": {WEIGHTS_FILE: {"bytes": weights.stat().st_size, "crc32": _file_crc32(weights)}},
        "quantized": layers,
        "quantized_conv2d": convs,
        "kept": _kept_layers(model, report),
        "tied": ties,
        "nonpersistent_buffers": {"prefix": NONPERSISTENT_PREFIX, "names": nonpersistent},
    }
    path = directory / MANIFEST_FILE
    path.write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n")
    return path


def _collect_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Everything to store, each storage once, plus ``{alias: stored name}`` for the shared ones."""
    state = model.state_dict()
    named: dict[str, torch.Tensor] = dict(state)
    for name, buf in model.named_buffers(remove_duplicate=False):
        if buf is not None and name not in state:
            named[NONPERSISTENT_PREFIX + name] = buf

    tensors: dict[str, torch.Tensor] = {}
    ties: dict[str, str] = {}
    first_view: dict[tuple, str] = {}  # exact same view -> name it was stored under
    storages: set[int] = set()
    for name, tensor in named.items():
        if tensor.device.type == "meta":
            raise QuantizedFormatError(f"cannot save {name!r}: it is on the meta device (it has no data)")
        tensor = tensor.detach()
        key = _view_key(tensor)
        if key in first_view:
            ties[name] = first_view[key]
            continue
        first_view[key] = name
        storage = tensor.untyped_storage().data_ptr() if tensor.numel() else None
        # A tensor that overlaps another one only partly cannot be stored shared: store its own copy.
        shared = storage in storages
        storages.add(storage)
        tensors[name] = tensor.to("cpu").contiguous().clone() if shared else tensor.to("cpu").contiguous()
    return tensors, ties


def _view_key(t: torch.Tensor) -> tuple:
    if t.numel() == 0:
        return ("empty", id(t))
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device)


def _quantized_entries(model: nn.Module, stats: Mapping[str, ErrorStats], cls: type[nn.Module],
                       shape: Callable[[Any], dict[str, Any]]) -> list[dict[str, Any]]:
    """A manifest entry per ``cls`` layer: name, ``shape(layer)``'s fields, bias, dtype, and error stats if known."""
    entries = []
    for name, module in model.named_modules():
        if isinstance(module, cls):
            entry: dict[str, Any] = {"name": name, **shape(module), "bias": module.bias is not None,
                                     "dtype": _dtype_name(module.scales.dtype)}
            if name in stats:
                entry["error"] = {k: _json_float(v) for k, v in vars(stats[name]).items()}
            entries.append(entry)
    return entries


def _quantized_layers(model: nn.Module, stats: Mapping[str, ErrorStats]) -> list[dict[str, Any]]:
    return _quantized_entries(model, stats, W8A16LinearLayer,
                              lambda m: {"in_features": m.in_features, "out_features": m.out_features})


def _quantized_convs(model: nn.Module, stats: Mapping[str, ErrorStats]) -> list[dict[str, Any]]:
    """The `W8A16Conv2d` layers; stride, padding, dilation and padding mode come from the skeleton when loading."""
    return _quantized_entries(model, stats, W8A16Conv2d, lambda m: {
        "in_channels": m.in_channels, "out_channels": m.out_channels, "kernel_size": list(m.kernel_size),
        "groups": m.groups})


def _kept_layers(model: nn.Module, report: QuantizationReport | None) -> dict[str, dict[str, Any]]:
    reasons = report.kept if report is not None else {}
    kept = {}
    for name, m in model.named_modules():
        if is_linear_like(m):
            n_in, n_out, bias = _linear_shape(m)
            why = reasons.get(name, "not quantized (reason not recorded)")
            kept[name] = {"in_features": n_in, "out_features": n_out, "bias": bias,
                          "dtype": _dtype_name(m.weight.dtype), "why": why}
    return kept


def _linear_shape(module: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, has bias) of an nn.Linear, a transformers Conv1D or a W8A16LinearLayer."""
    if isinstance(module, W8A16LinearLayer):
        return module.in_features, module.out_features, module.bias is not None
    n_out, n_in = linear_weight(module).shape
    return n_in, n_out, module.bias is not None


def _save_transformers_config(model: nn.Module, directory: Path) -> bool:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        return False
    config = copy.deepcopy(config)
    config.architectures = [type(model).__name__]  # from_config() leaves it empty; load needs it
    config.dtype = _main_dtype(model)  # what save_pretrained writes: from_pretrained loads in this dtype
    if "transformers.quantizers.auto" in sys.modules:  # the quantization_config save_pretrained writes, so that
        from .hf import describe  # from_pretrained(directory) rebuilds the W8A16 layers too: one format, two readers

        describe(model)
        config.quantization_config = model.config.quantization_config
    config.save_pretrained(directory)
    generation = getattr(model, "generation_config", None)
    if generation is not None and hasattr(generation, "save_pretrained"):
        generation.save_pretrained(directory)
    return True


# ----------------------------------------------------------------------------------------------- load


def load_quantized(directory: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Load a directory written by `save_quantized`; return the model in eval mode, on the CPU.

    With ``model=None`` the transformers model is rebuilt from ``config.json``. Otherwise ``model`` is a
    skeleton of the same architecture — best built under ``with torch.device("meta"):`` so it costs no
    memory — full precision or already quantized; it is filled in place and returned. The file's dtypes
    win over the skeleton's (the skeleton only supplies the structure). Nothing is ever materialised
    in full precision, and the input is checked before any data is read: a problem raises
    `QuantizedFormatError` or ``FileNotFoundError`` naming the file, never a half-loaded model.
    No code from the directory is ever run, and nothing is asked on the terminal.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such directory (expected a save_quantized() output)")
    if model is None and not (directory / MANIFEST_FILE).exists() and _saved_by_transformers(directory):
        return _load_with_transformers(directory)
    manifest = read_manifest(directory)
    weights = directory / WEIGHTS_FILE
    header = read_safetensors_header(weights)
    recorded = manifest["files"][WEIGHTS_FILE]
    if weights.stat().st_size != recorded["bytes"]:
        raise QuantizedFormatError(
            f"{weights}: {weights.stat().st_size} bytes, but {MANIFEST_FILE} says {recorded['bytes']} "
            "(truncated or replaced?)"
        )
    _check_layers_against_header(manifest, header, weights)

    if model is None:
        model = _build_skeleton(directory, manifest)
    elif type(model).__name__ != manifest["model_class"]:
        raise QuantizedFormatError(
            f"{directory / MANIFEST_FILE}: the saved model is a {manifest['model_class']}, "
            f"the skeleton is a {type(model).__name__}"
        )
    _swap_in_shells(model, manifest, directory)
    plan = _plan_assignment(model, manifest, header, weights)

    tensors = _read_tensors(weights, header, recorded["crc32"])
    _check_values(manifest, tensors, weights)
    _assign(model, manifest, tensors, plan)
    return model.eval()


def _saved_by_transformers(directory: Path) -> bool:
    """A ``save_pretrained`` directory of a W8A16 model: config.json says ``"quant_method": "w8a16"``."""
    path = directory / CONFIG_FILE
    if not path.is_file():
        return False
    raw = read_json(path)
    quantization = raw.get("quantization_config") if isinstance(raw, dict) else None
    return isinstance(quantization, dict) and quantization.get("quant_method") == "w8a16"


def _load_with_transformers(directory: Path) -> nn.Module:
    """``from_pretrained`` on a W8A16 ``save_pretrained`` directory, read as data (no code, no pickle)."""
    config = load_transformers_config(directory)
    cls = transformers_model_class(config_architecture(config, directory / CONFIG_FILE), directory / CONFIG_FILE)
    model = _from_transformers(
        lambda: cls.from_pretrained(directory, config=config, trust_remote_code=False, use_safetensors=True),
        directory, "cannot be loaded as a W8A16 transformers model",
    )
    return model.eval()


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """Parse ``w8a16.json`` (with `parse_json`'s limits) and check every field, so the rest can trust it.

    Checked: the format name and version, then the type and range of each field `save_quantized` writes
    (keys it does not write are ignored). Any problem is a `QuantizedFormatError` naming the file and the
    field, never a ``KeyError`` or ``TypeError`` later on.
    """
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; not a save_quantized() directory or an unfinished save")
    manifest = read_json(path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise QuantizedFormatError(f"{path}: not a {FORMAT_NAME} manifest (no \"format\": \"{FORMAT_NAME}\")")
    version = manifest.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:  # `True == 1.0 == 1` to Python
        raise QuantizedFormatError(
            f"{path}: format_version {version!r} is not supported by this w8a16 "
            f"(it reads version {FORMAT_VERSION}); upgrade w8a16 or re-save the model"
        )
    _check_manifest(manifest, path)
    return manifest


# A check of one field: a test of its value, and what the value must be (for the message when it fails).
_Field = tuple[Callable[[Any], bool], str]


def _is_count(x: Any) -> bool:
    return type(x) is int and 0 <= x <= _MAX_COUNT  # `type(x) is int`: a bool is an int to Python


def _is_name(x: Any) -> bool:
    return isinstance(x, str) and all(x.split("."))  # "transformer.h.0.mlp"; not "", ".a" or "a..b"


_COUNT: _Field = (_is_count, "a non-negative integer below 2**63")
_SIZE: _Field = (lambda x: _is_count(x) and x > 0, "a positive integer below 2**63")
_BOOL: _Field = (lambda x: type(x) is bool, "true or false")
_TEXT: _Field = (lambda x: isinstance(x, str), "a string")
_NAME: _Field = (_is_name, "a dotted module or tensor name")
_CLASS: _Field = (lambda x: isinstance(x, str) and x.isidentifier(), "a class name")
_DTYPE: _Field = (lambda x: isinstance(x, str) and x in _FLOAT_DTYPES, 'a floating-point dtype name such as "bfloat16"')
_CRC32: _Field = (lambda x: isinstance(x, str) and re.fullmatch("[0-9a-f]{8}", x) is not None, "8 lowercase hex digits")
_STAT: _Field = (lambda x: x is None or (type(x) in (int, float) and -1e308 < x < 1e308), "a finite number or null")
_OBJECT: _Field = (lambda x: isinstance(x, dict), "a JSON object")
_NAMES: _Field = (lambda x: isinstance(x, list) and all(isinstance(n, str) for n in x), "a list of strings")
_PREFIX: _Field = (lambda x: x == NONPERSISTENT_PREFIX, f"{NONPERSISTENT_PREFIX!r} in format version 1")

_MANIFEST_FIELDS = {
    "w8a16_version": _TEXT, "model_class": _CLASS, "transformers": _BOOL, "dtype": _DTYPE,
    "footprint_bytes": _COUNT, "files": _OBJECT, "quantized": (lambda x: isinstance(x, list), "a JSON array"),
    "kept": _OBJECT, "tied": _OBJECT, "nonpersistent_buffers": _OBJECT,
}
_QUANTIZED_FIELDS = {"name": _NAME, "in_features": _SIZE, "out_features": _SIZE, "bias": _BOOL, "dtype": _DTYPE}
_KERNEL = (lambda x: isinstance(x, list) and len(x) == 2 and all(_is_count(k) and k > 0 for k in x),
           "two positive integers")
_CONV_FIELDS = {"name": _NAME, "in_channels": _SIZE, "out_channels": _SIZE, "kernel_size": _KERNEL, "groups": _SIZE,
                "bias": _BOOL, "dtype": _DTYPE}
_KEPT_FIELDS = {"in_features": _COUNT, "out_features": _COUNT, "bias": _BOOL, "dtype": _DTYPE, "why": _TEXT}
_FILE_FIELDS = {"bytes": _COUNT, "crc32": _CRC32}
_BUFFER_FIELDS = {"prefix": _PREFIX, "names": _NAMES}


def _check_manifest(manifest: dict, path: Path) -> None:
    """Every field `save_quantized` writes is present, of its type and in range; layer names are unique."""
    _check_fields(manifest, _MANIFEST_FIELDS, path, "")
    seen: set[str] = set()
    convs = manifest.setdefault("quantized_conv2d", [])  # absent in files written before W8A16Conv2d existed
    _check(convs, (lambda x: isinstance(x, list), "a JSON array"), path, "quantized_conv2d")
    entries = [(f"quantized[{i}]", _QUANTIZED_FIELDS, layer) for i, layer in enumerate(manifest["quantized"])]
    entries += [(f"quantized_conv2d[{i}]", _CONV_FIELDS, conv) for i, conv in enumerate(convs)]
    for where, fields, layer in entries:
        _check_fields(layer, fields, path, where)
        if layer["name"] in seen:
            raise QuantizedFormatError(f"{path}: {where}.name: layer {layer['name']!r} is listed twice")
        seen.add(layer["name"])
        _check(layer.get("error", {}), _OBJECT, path, f"{where}.error")
        for stat, value in layer.get("error", {}).items():
            _check(value, _STAT, path, f"{where}.error.{stat}")
    for name, info in manifest["kept"].items():
        _check(name, _NAME, path, "a key of kept")
        _check_fields(info, _KEPT_FIELDS, path, f"kept[{name!r}]")
    for alias, source in manifest["tied"].items():
        _check(alias, _NAME, path, "a key of tied")
        _check(source, _NAME, path, f"tied[{alias!r}]")
    if WEIGHTS_FILE not in manifest["files"]:
        raise QuantizedFormatError(f"{path}: files[{WEIGHTS_FILE!r}] is missing")
    for name, info in manifest["files"].items():
        _check_fields(info, _FILE_FIELDS, path, f"files[{name!r}]")
    _check_fields(manifest["nonpersistent_buffers"], _BUFFER_FIELDS, path, "nonpersistent_buffers")


def _check_fields(obj: Any, fields: Mapping[str, _Field], path: Path, where: str) -> None:
    """``obj`` is a JSON object holding each of ``fields``, each passing its check."""
    _check(obj, _OBJECT, path, where or "the manifest")
    for key, field in fields.items():
        name = f"{where}.{key}" if where else key
        if key not in obj:
            raise QuantizedFormatError(f"{path}: {name} is missing")
        _check(obj[key], field, path, name)


def _check(value: Any, field: _Field, path: Path, name: str) -> None:
    test, expected = field
    if not test(value):
        # reprlib: a hostile value may be a huge list; its message should stay one short line
        raise QuantizedFormatError(f"{path}: {name} must be {expected}, not {reprlib.repr(value)}")


def read_json(path: Path) -> Any:
    """A small JSON file (a regular file of at most ``_MAX_JSON_BYTES``), parsed by `parse_json`."""
    with open(path, "rb") as f:
        raw = f.read(_MAX_JSON_BYTES + 1)  # never more: the file may be huge
    if len(raw) > _MAX_JSON_BYTES:
        raise QuantizedFormatError(
            f"{path}: larger than {_MAX_JSON_BYTES // 2**20} MiB, refusing to parse it (expected a small JSON file)"
        )
    return parse_json(raw, str(path))


def parse_json(raw: bytes, label: str) -> Any:
    """``json.loads`` for input we did not write: every problem is a `QuantizedFormatError` starting ``label``.

    Python's parser recurses once per nesting level, so the depth is measured first (`_nesting_depth`); a
    ``RecursionError`` is still caught in case the stack is already deep. NaN, Infinity and floats that
    overflow to infinity are refused (they are not JSON, and no field of ours may hold one), and so is an
    integer longer than the interpreter's limit on digits (a ``ValueError``).
    """
    depth = _nesting_depth(raw)
    if depth > _MAX_JSON_DEPTH:
        raise QuantizedFormatError(f"{label}: refused: JSON nested {depth} levels deep (at most {_MAX_JSON_DEPTH})")
    try:
        return json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise QuantizedFormatError(f"{label}: not valid JSON ({err})") from None


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range for a float")
    return value


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # a string, escaped quotes included
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_BRACKET_STEPS = bytes(1 if b in b"[{" else 255 for b in range(256))  # as int8: opener +1, closer -1
_DEPTH_CHUNK = 2**22  # brackets summed at a time (16 MiB of int32)


def _nesting_depth(raw: bytes) -> int:
    """How deeply arrays and objects nest in ``raw``, found without parsing it.

    Strings are cut out (they may hold brackets), every byte but brackets dropped, and the depth is the
    largest running sum of +1 per opener and -1 per closer, computed by numpy in chunks: a hostile header
    of 100 MiB of brackets costs a second or so and bounded memory. Malformed JSON may give a wrong depth;
    the parser then reports it.
    """
    steps = np.frombuffer(_JSON_STRING.sub(b"", raw).translate(_BRACKET_STEPS, _NOT_BRACKETS), dtype=np.int8)
    deepest = level = 0
    for start in range(0, len(steps), _DEPTH_CHUNK):
        levels = np.cumsum(steps[start:start + _DEPTH_CHUNK], dtype=np.int32) + level
        deepest, level = max(deepest, int(levels.max())), int(levels[-1])
    return deepest


def read_safetensors_header(path: str | os.PathLike) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
    """``{name: (dtype, shape, begin, end)}`` from a safetensors file, every field checked.

    Checked: the header length fits the file, the header is JSON (parsed with `parse_json`'s limits), each
    dtype is known, each dimension and offset is an integer in 0..2**63-1, each byte range matches its shape
    and dtype, and the ranges tile the data section exactly (so a truncated or padded file is caught here,
    before any data is read).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing")
    size = path.stat().st_size

    def bad(problem: str) -> QuantizedFormatError:
        return QuantizedFormatError(f"{path}: not a valid safetensors file: {problem}")

    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise bad(f"only {size} bytes, too short for a header")
        n = int.from_bytes(raw, "little")
        if n > min(size - 8, _MAX_HEADER_BYTES):
            raise bad(f"header length {n} does not fit a {size}-byte file (truncated or corrupt)")
        header = parse_json(f.read(n), f"{path}: not a valid safetensors file: header")
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    header.pop("__metadata__", None)

    entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
    for name, info in header.items():
        try:
            dtype = _ST_TO_TORCH[info["dtype"]]
            shape = tuple(_count(d) for d in info["shape"])
            begin, end = (_count(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise bad(f"entry {name!r} has a bad or unknown dtype/shape/data_offsets: {reprlib.repr(info)}") from None
        nbytes = math.prod(shape) * _itemsize(dtype)
        if end - begin != nbytes:
            raise bad(f"tensor {name!r}: {end - begin} bytes for shape {list(shape)} of {dtype}")
        entries[name] = (dtype, shape, begin, end)

    cursor = 0
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin != cursor:
            raise bad(f"tensor {name!r} starts at byte {begin}, expected {cursor} (gap or overlap)")
        cursor = end
    if 8 + n + cursor != size:
        raise bad(f"header describes {8 + n + cursor} bytes, the file has {size} (truncated or corrupt)")
    return entries


def _count(x: Any) -> int:
    """``x`` if it is a dimension or offset torch can hold; else TypeError (``int("3")`` or ``int(2.5)`` would pass)."""
    if not _is_count(x):
        raise TypeError(f"{x!r} is not an integer in 0..2**63-1")
    return x


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _int8_shape(layer: dict) -> tuple[int, ...]:
    """The int8 weight's shape of a manifest entry: ``(out, in)``, or ``(out, in / groups, kh, kw)`` for a Conv2d."""
    if "kernel_size" in layer:
        return (layer["out_channels"], layer["in_channels"] // layer["groups"], *layer["kernel_size"])
    return (layer["out_features"], layer["in_features"])


def _check_layers_against_header(manifest: dict, header: dict, weights: Path) -> None:
    """Each recorded quantized layer must have int8 weights, scales and bias of the recorded shape/dtype."""
    for layer in [*manifest["quantized"], *manifest["quantized_conv2d"]]:
        name, shape = layer["name"], _int8_shape(layer)
        n_out = shape[0]
        dtype = _FLOAT_DTYPES[layer["dtype"]]
        want = {f"{name}.int8_weights": (torch.int8, shape), f"{name}.scales": (dtype, (n_out,))}
        if layer["bias"]:
            want[f"{name}.bias"] = (dtype, (n_out,))
        elif f"{name}.bias" in header:
            raise QuantizedFormatError(f"{weights}: {name}.bias is present but {MANIFEST_FILE} says bias=False")
        for key, (want_dtype, want_shape) in want.items():
            if key not in header:
                raise QuantizedFormatError(f"{weights}: tensor {key!r} is missing")
            got_dtype, got_shape = header[key][:2]
            if got_dtype != want_dtype:
                raise QuantizedFormatError(f"{weights}: tensor {key!r} is {got_dtype}, expected {want_dtype}")
            if got_shape != want_shape:
                raise QuantizedFormatError(
                    f"{weights}: tensor {key!r} has shape {list(got_shape)}, expected {list(want_shape)}"
                )


# ------------------------------------------------------------------------------ transformers, as data


def _build_skeleton(directory: Path, manifest: dict) -> nn.Module:
    """The saved transformers model, built on meta from config.json (no memory, no download, no code run)."""
    if not manifest["transformers"]:
        raise QuantizedFormatError(
            f"{directory}: the saved {manifest['model_class']} is not a transformers model, so it cannot be "
            "rebuilt from a config; pass a skeleton: load_quantized(directory, model=...)"
        )
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: missing; it is needed to rebuild the model (or pass a skeleton)")
    import transformers

    config = load_transformers_config(directory)
    name = config_architecture(config, config_path) or manifest["model_class"]
    if name != manifest["model_class"]:
        raise QuantizedFormatError(
            f"{config_path}: architectures says {name}, {MANIFEST_FILE} says {manifest['model_class']}"
        )
    cls = transformers_model_class(name, config_path)
    with torch.device("meta"):
        model = _from_transformers(lambda: cls(config), config_path, f"cannot build a {name} from it")
    generation = directory / GENERATION_CONFIG_FILE
    if generation.is_file() and hasattr(model, "generation_config"):
        read_json(generation)  # our limits first: transformers parses it with none
        model.generation_config = _from_transformers(
            lambda: transformers.GenerationConfig.from_pretrained(directory), generation,
            "cannot be read as a generation config",
        )
    return model


def load_transformers_config(directory: str | os.PathLike) -> Any:
    """``config.json`` of a local directory as a transformers config, read as data.

    The file is parsed with `parse_json`'s limits first (transformers' own parsing has none). A config whose
    model_type only the directory's own code provides (``auto_map`` and a ``.py`` file beside it) is refused
    naming that file; and ``trust_remote_code=False`` makes transformers refuse any such code itself rather
    than ask on the terminal (its prompt reads stdin, and an answer of "y" runs the file).
    """
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing")
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise QuantizedFormatError(f"{path}: not a JSON object")
    _refuse_custom_code(raw, path)
    import transformers

    return _from_transformers(
        lambda: transformers.AutoConfig.from_pretrained(directory, trust_remote_code=False), path,
        "cannot be read as a transformers config",
    )


def _refuse_custom_code(config: dict, path: Path) -> None:
    """A model_type unknown to transformers, with an ``auto_map``, can only be loaded by running the auto_map's code."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config.get("model_type")
    if "auto_map" not in config or (isinstance(model_type, str) and model_type in CONFIG_MAPPING):
        return  # a built-in model_type wins over auto_map when trust_remote_code=False
    refs = config["auto_map"].values() if isinstance(config["auto_map"], dict) else [config["auto_map"]]
    refs = [r for ref in refs for r in (ref if isinstance(ref, list) else [ref]) if isinstance(r, str)]
    files = sorted({r.split("--")[-1].rpartition(".")[0] + ".py" for r in refs})  # "[repo--]module.Class"
    raise QuantizedFormatError(
        f"{path}: model_type {model_type!r} is not built into transformers and its auto_map points to code "
        f"({', '.join(files) or 'unnamed'}) in the model directory; w8a16 never runs code from a checkpoint"
    )


def config_architecture(config: Any, path: Path | str) -> str | None:
    """The first class name in ``config.architectures``, or None when it names none."""
    names = getattr(config, "architectures", None)
    if not names:
        return None
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise QuantizedFormatError(f"{path}: architectures must be a list of class names, not {reprlib.repr(names)}")
    return names[0]


def transformers_model_class(name: Any, where: Path | str) -> type:
    """The transformers model class called ``name`` (a name read from a file), and nothing else.

    A bare ``getattr(transformers, name)`` could return any attribute — ``logging``, ``AutoConfig``,
    ``__class__`` — which the caller would then call with the config.
    """
    import transformers

    cls = None
    if isinstance(name, str) and name.isidentifier() and not name.startswith("_"):
        try:
            cls = getattr(transformers, name, None)
        except (ImportError, RuntimeError):  # a lazily imported class whose optional backend is missing
            cls = None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise QuantizedFormatError(f"{where}: {name!r} is not a model class of transformers {transformers.__version__}")
    return cls


def _from_transformers(call: Callable[[], _T], path: Path, problem: str) -> _T:
    """``call()``, any exception becoming a `QuantizedFormatError` "``path``: ``problem`` (why)".

    transformers reports a bad config as a ValueError, KeyError, TypeError, AttributeError, OSError...
    depending on the field; each of them means the file is bad, and our callers promise one error type.
    """
    try:
        return call()
    except Exception as err:
        raise QuantizedFormatError(f"{path}: {problem} ({err})") from err


def _swap_in_shells(model: nn.Module, manifest: dict, directory: Path) -> None:
    """Replace each recorded Linear (Conv2d) of the skeleton with an empty (meta) `W8A16LinearLayer` (`W8A16Conv2d`)."""
    for layer in manifest["quantized"]:
        name = layer["name"]
        old = _skeleton_module(model, name, directory)
        if not (is_linear_like(old) or isinstance(old, W8A16LinearLayer)):
            raise QuantizedFormatError(
                f"{directory / MANIFEST_FILE}: {name!r} is a {type(old).__name__} in the skeleton, not a Linear"
            )
        shape = _linear_shape(old)
        if shape != (layer["in_features"], layer["out_features"], layer["bias"]):
            raise QuantizedFormatError(
                f"{directory / MANIFEST_FILE}: {name!r} is ({layer['in_features']} -> {layer['out_features']}, "
                f"bias={layer['bias']}) in the file but ({shape[0]} -> {shape[1]}, bias={shape[2]}) in the skeleton"
            )
        shell = W8A16LinearLayer(
            layer["in_features"], layer["out_features"], bias=layer["bias"],
            dtype=_FLOAT_DTYPES[layer["dtype"]], device="meta",
        )
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, shell)
    for conv in manifest["quantized_conv2d"]:
        name = conv["name"]
        old = _skeleton_module(model, name, directory)
        if not isinstance(old, (nn.Conv2d, W8A16Conv2d)):
            raise QuantizedFormatError(
                f"{directory / MANIFEST_FILE}: {name!r} is a {type(old).__name__} in the skeleton, not a Conv2d"
            )
        found = (old.in_channels, old.out_channels, list(old.kernel_size), old.groups, old.bias is not None)
        recorded = (conv["in_channels"], conv["out_channels"], conv["kernel_size"], conv["groups"], conv["bias"])
        if found != recorded:
            raise QuantizedFormatError(
                f"{directory / MANIFEST_FILE}: {name!r} is (in, out, kernel, groups, bias) = {recorded} in the file "
                f"but {found} in the skeleton"
            )
        shell = W8A16Conv2d.empty_like(old, _FLOAT_DTYPES[conv["dtype"]])
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, shell)


def _skeleton_module(model: nn.Module, name: str, directory: Path) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise QuantizedFormatError(
            f"{directory / MANIFEST_FILE}: quantized layer {name!r} does not exist in the skeleton "
            f"({type(model).__name__}); is it the same architecture and size?"
        ) from None


def _plan_assignment(model: nn.Module, manifest: dict, header: dict, weights: Path) -> dict[str, tuple]:
    """Match the file against the skeleton's tensors before reading anything; return name -> skeleton info."""
    ties: dict[str, str] = manifest["tied"]
    prefix = NONPERSISTENT_PREFIX  # read_manifest checked that the file says the same
    state = model.state_dict(keep_vars=True)
    expected = {k: v for k, v in state.items()}
    for name, buf in model.named_buffers(remove_duplicate=False):
        if buf is not None and name not in state:
            expected[prefix + name] = buf
    available = set(header) | set(ties)

    # A non-persistent buffer may be absent from the file if the skeleton already holds real values for it.
    missing = [k for k, t in expected.items() if k not in available and (t.is_meta or not k.startswith(prefix))]
    unexpected = [k for k in available if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} skeleton tensor(s) not in the file, e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} file tensor(s) the skeleton lacks, e.g. {sorted(unexpected)[:3]}")
        skeleton = type(model).__name__
        raise QuantizedFormatError(f"{weights}: does not fit the skeleton ({skeleton}): " + "; ".join(parts))
    for alias, source in ties.items():
        if source not in header:
            raise QuantizedFormatError(f"{weights}: {alias!r} is tied to {source!r}, which is not in the file")

    for name, target in expected.items():
        if name not in available:
            continue
        dtype, shape = header[ties.get(name, name)][:2]
        if tuple(target.shape) != shape:
            raise QuantizedFormatError(
                f"{weights}: tensor {name!r} has shape {list(shape)}, the skeleton expects {list(target.shape)}"
            )
        if target.dtype != dtype and not (target.dtype.is_floating_point and dtype.is_floating_point):
            raise QuantizedFormatError(
                f"{weights}: tensor {name!r} is {dtype}, the skeleton expects {target.dtype}"
            )
    return {name: (tuple(t.shape), t.dtype) for name, t in expected.items()}


def _read_tensors(path: Path, header: dict, crc32: str | None) -> dict[str, torch.Tensor]:
    """Read every tensor into fresh, aligned, contiguous CPU memory, checking the file's CRC-32 on the way."""
    if sys.byteorder != "little":
        raise QuantizedFormatError(f"{path}: safetensors is little-endian; this machine is not")
    tensors: dict[str, torch.Tensor] = {}
    with open(path, "rb", buffering=0) as f:
        head = f.read(8)
        head += f.read(int.from_bytes(head, "little"))
        crc = zlib.crc32(head)
        for name, (dtype, shape, begin, end) in sorted(header.items(), key=lambda kv: kv[1][2]):
            tensor = torch.empty(shape, dtype=dtype)  # the CPU allocator aligns to 64 bytes
            if end > begin:
                view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy()).cast("B")
                _readinto_exactly(f, view, path, name)
                crc = zlib.crc32(view, crc)
            tensors[name] = tensor
    if crc32 is not None and f"{crc & 0xFFFFFFFF:08x}" != crc32:
        raise QuantizedFormatError(
            f"{path}: CRC-32 is {crc & 0xFFFFFFFF:08x}, {MANIFEST_FILE} says {crc32}: "
            "the file is corrupt or was modified"
        )
    return tensors


def _readinto_exactly(f, view: memoryview, path: Path, name: str) -> None:
    done = 0
    while done < len(view):
        n = f.readinto(view[done:done + _CHUNK])
        if not n:
            raise QuantizedFormatError(f"{path}: ends inside tensor {name!r} (truncated)")
        done += n


def _check_values(manifest: dict, tensors: dict[str, torch.Tensor], weights: Path) -> None:
    """Scales must be finite and non-negative (absmax / 127): anything else is a damaged file."""
    for layer in [*manifest["quantized"], *manifest["quantized_conv2d"]]:
        scales = tensors[f"{layer['name']}.scales"]
        if not torch.isfinite(scales).all():
            raise QuantizedFormatError(f"{weights}: {layer['name']}.scales contains NaN or Inf")
        if (scales < 0).any():
            raise QuantizedFormatError(f"{weights}: {layer['name']}.scales has negative values")


def _assign(model: nn.Module, manifest: dict, tensors: dict[str, torch.Tensor], plan: dict) -> None:
    ties: dict[str, str] = manifest["tied"]
    prefix = NONPERSISTENT_PREFIX  # read_manifest checked that the file says the same
    state = {k: t for k, t in tensors.items() if not k.startswith(prefix)}
    for alias, source in ties.items():
        if not alias.startswith(prefix):
            state[alias] = tensors[source]
    model.load_state_dict(state, strict=True, assign=True)

    for key, tensor in tensors.items():
        if key.startswith(prefix) and key in plan:
            _set_tensor(model, key[len(prefix):], tensor)
    # Re-tie: make each alias the *same* Parameter/buffer object as its source, as it was when saved.
    for alias, source in ties.items():
        _set_tensor(model, _unprefix(alias, prefix), _get_tensor(model, _unprefix(source, prefix)))

    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t is not None and t.is_meta]
    if left:
        raise QuantizedFormatError(
            f"{manifest['model_class']}: {len(left)} tensor(s) of the skeleton were not in the file and have no "
            f"data, e.g. {left[:3]}"
        )


def _unprefix(name: str, prefix: str) -> str:
    return name[len(prefix):] if name.startswith(prefix) else name


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, leaf = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), leaf


def _get_tensor(model: nn.Module, name: str) -> torch.Tensor:
    module, leaf = _owner(model, name)
    return module._parameters[leaf] if leaf in module._parameters else module._buffers[leaf]


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module, leaf = _owner(model, name)
    if leaf in module._parameters:
        if not isinstance(tensor, nn.Parameter):
            tensor = nn.Parameter(tensor, requires_grad=module._parameters[leaf].requires_grad)
        module._parameters[leaf] = tensor
    else:
        module._buffers[leaf] = tensor


# -------------------------------------------------------------------------------------------- helpers


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _main_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype holding the most elements (the model's "dtype" for humans)."""
    counts: dict[torch.dtype, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def _json_float(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None  # JSON has no Inf (an exact layer has SQNR = inf)


def _file_crc32(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc & 0xFFFFFFFF:08x}"


def _package_version() -> str:
    from .. import __version__

    return __version__


def saved_sizes(directory: str | os.PathLike) -> dict[str, int]:
    """Bytes on disk of each file in a saved directory (what the notebook and ``report`` show)."""
    return {p.name: p.stat().st_size for p in sorted(Path(directory).iterdir()) if p.is_file()}


__all__ = [
    "save_quantized", "load_quantized", "read_manifest", "read_safetensors_header", "saved_sizes",
    "read_json", "parse_json", "load_transformers_config", "config_architecture", "transformers_model_class",
    "QuantizedFormatError", "FORMAT_VERSION", "MANIFEST_FILE", "WEIGHTS_FILE", "NONPERSISTENT_PREFIX",
]
