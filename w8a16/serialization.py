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
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import zlib
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .layer import W8A16LinearLayer
from .quant import ErrorStats
from .quantizer import QuantizationReport, footprint_bytes

FORMAT_NAME = "w8a16"
FORMAT_VERSION = 1
MANIFEST_FILE = "w8a16.json"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
# No module name can contain ":" in practice (nor "." at all), so this never collides with a state-dict key.
NONPERSISTENT_PREFIX = "w8a16:nonpersistent/"

_MAX_HEADER_BYTES = 100 * 2**20  # a header this large is a corrupt length field, not a model
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
    for layer in layers:
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


def _quantized_layers(model: nn.Module, stats: Mapping[str, ErrorStats]) -> list[dict[str, Any]]:
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, W8A16LinearLayer):
            entry: dict[str, Any] = {
                "name": name,
                "in_features": module.in_features,
                "out_features": module.out_features,
                "bias": module.bias is not None,
                "dtype": _dtype_name(module.scales.dtype),
            }
            if name in stats:
                entry["error"] = {k: _json_float(v) for k, v in vars(stats[name]).items()}
            layers.append(entry)
    return layers


def _kept_layers(model: nn.Module, report: QuantizationReport | None) -> dict[str, dict[str, Any]]:
    reasons = report.kept if report is not None else {}
    return {
        name: {
            "in_features": m.in_features,
            "out_features": m.out_features,
            "bias": m.bias is not None,
            "dtype": _dtype_name(m.weight.dtype),
            "why": reasons.get(name, "not quantized (reason not recorded)"),
        }
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
    }


def _save_transformers_config(model: nn.Module, directory: Path) -> bool:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        return False
    config = copy.deepcopy(config)
    config.architectures = [type(model).__name__]  # from_config() leaves it empty; load needs it
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
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such directory (expected a save_quantized() output)")
    manifest = read_manifest(directory)
    weights = directory / WEIGHTS_FILE
    header = read_safetensors_header(weights)
    expected = manifest["files"].get(WEIGHTS_FILE, {}).get("bytes")
    if expected is not None and weights.stat().st_size != expected:
        raise QuantizedFormatError(
            f"{weights}: {weights.stat().st_size} bytes, but {MANIFEST_FILE} says {expected} (truncated or replaced?)"
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

    tensors = _read_tensors(weights, header, manifest["files"].get(WEIGHTS_FILE, {}).get("crc32"))
    _check_values(manifest, tensors, weights)
    _assign(model, manifest, tensors, plan)
    return model.eval()


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """Parse and check ``w8a16.json`` (format name and version, required keys)."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; not a save_quantized() directory or an unfinished save")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise QuantizedFormatError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise QuantizedFormatError(f"{path}: not a {FORMAT_NAME} manifest (no \"format\": \"{FORMAT_NAME}\")")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise QuantizedFormatError(
            f"{path}: format_version {version!r} is not supported by this w8a16 "
            f"(it reads version {FORMAT_VERSION}); upgrade w8a16 or re-save the model"
        )
    for key, kind in [("model_class", str), ("quantized", list), ("kept", dict), ("tied", dict),
                      ("nonpersistent_buffers", dict), ("files", dict)]:
        if not isinstance(manifest.get(key), kind):
            raise QuantizedFormatError(f"{path}: key {key!r} missing or not a {kind.__name__}")
    return manifest


def read_safetensors_header(path: str | os.PathLike) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
    """``{name: (dtype, shape, begin, end)}`` from a safetensors file, every field checked.

    Checked: the header length fits the file, the header is JSON, each dtype is known, each byte range
    matches its shape and dtype, and the ranges tile the data section exactly (so a truncated or padded
    file is caught here, before any data is read).
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
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise bad(f"header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    header.pop("__metadata__", None)

    entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
    for name, info in header.items():
        try:
            dtype = _ST_TO_TORCH[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise bad(f"entry {name!r} has a bad or unknown dtype/shape/data_offsets: {info!r}") from None
        nbytes = math.prod(shape) * _itemsize(dtype)
        if min(shape, default=0) < 0 or end - begin != nbytes:
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


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _check_layers_against_header(manifest: dict, header: dict, weights: Path) -> None:
    """Each recorded quantized layer must have int8 weights, scales and bias of the recorded shape/dtype."""
    for layer in manifest["quantized"]:
        try:
            name, n_in, n_out = layer["name"], int(layer["in_features"]), int(layer["out_features"])
            dtype, has_bias = _parse_dtype(layer["dtype"]), bool(layer["bias"])
        except (KeyError, TypeError, ValueError, AttributeError):
            raise QuantizedFormatError(f"{weights.with_name(MANIFEST_FILE)}: bad layer entry {layer!r}") from None
        want = {f"{name}.int8_weights": (torch.int8, (n_out, n_in)), f"{name}.scales": (dtype, (n_out,))}
        if has_bias:
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


def _build_skeleton(directory: Path, manifest: dict) -> nn.Module:
    """The saved transformers model, built on meta from config.json (no memory, no download)."""
    if not manifest.get("transformers"):
        raise QuantizedFormatError(
            f"{directory}: the saved {manifest['model_class']} is not a transformers model, so it cannot be "
            "rebuilt from a config; pass a skeleton: load_quantized(directory, model=...)"
        )
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: missing; it is needed to rebuild the model (or pass a skeleton)")
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(directory)
    except (OSError, ValueError) as err:
        raise QuantizedFormatError(f"{config_path}: cannot be read as a transformers config ({err})") from None
    names = getattr(config, "architectures", None) or [manifest["model_class"]]
    if names[0] != manifest["model_class"]:
        raise QuantizedFormatError(
            f"{config_path}: architectures says {names[0]}, {MANIFEST_FILE} says {manifest['model_class']}"
        )
    cls = getattr(transformers, names[0], None)
    if cls is None:
        raise QuantizedFormatError(f"{config_path}: transformers {transformers.__version__} has no class {names[0]}")
    with torch.device("meta"):
        model = cls(config)
    generation = directory / GENERATION_CONFIG_FILE
    if generation.is_file() and hasattr(model, "generation_config"):
        model.generation_config = transformers.GenerationConfig.from_pretrained(directory)
    return model


def _swap_in_shells(model: nn.Module, manifest: dict, directory: Path) -> None:
    """Replace each recorded Linear of the skeleton with an empty (meta) `W8A16LinearLayer`."""
    for layer in manifest["quantized"]:
        name = layer["name"]
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise QuantizedFormatError(
                f"{directory / MANIFEST_FILE}: quantized layer {name!r} does not exist in the skeleton "
                f"({type(model).__name__}); is it the same architecture and size?"
            ) from None
        if not isinstance(old, (nn.Linear, W8A16LinearLayer)):
            raise QuantizedFormatError(
                f"{directory / MANIFEST_FILE}: {name!r} is a {type(old).__name__} in the skeleton, not a Linear"
            )
        shape = (old.in_features, old.out_features, old.bias is not None)
        if shape != (layer["in_features"], layer["out_features"], layer["bias"]):
            raise QuantizedFormatError(
                f"{directory / MANIFEST_FILE}: {name!r} is ({layer['in_features']} -> {layer['out_features']}, "
                f"bias={layer['bias']}) in the file but ({shape[0]} -> {shape[1]}, bias={shape[2]}) in the skeleton"
            )
        shell = W8A16LinearLayer(
            layer["in_features"], layer["out_features"], bias=layer["bias"],
            dtype=_parse_dtype(layer["dtype"]), device="meta",
        )
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, shell)


def _plan_assignment(model: nn.Module, manifest: dict, header: dict, weights: Path) -> dict[str, tuple]:
    """Match the file against the skeleton's tensors before reading anything; return name -> skeleton info."""
    ties: dict[str, str] = manifest["tied"]
    prefix = manifest["nonpersistent_buffers"].get("prefix", NONPERSISTENT_PREFIX)
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
    for layer in manifest["quantized"]:
        scales = tensors[f"{layer['name']}.scales"]
        if not torch.isfinite(scales).all():
            raise QuantizedFormatError(f"{weights}: {layer['name']}.scales contains NaN or Inf")
        if (scales < 0).any():
            raise QuantizedFormatError(f"{weights}: {layer['name']}.scales has negative values")


def _assign(model: nn.Module, manifest: dict, tensors: dict[str, torch.Tensor], plan: dict) -> None:
    ties: dict[str, str] = manifest["tied"]
    prefix = manifest["nonpersistent_buffers"].get("prefix", NONPERSISTENT_PREFIX)
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


def _parse_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


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
    from . import __version__

    return __version__


def saved_sizes(directory: str | os.PathLike) -> dict[str, int]:
    """Bytes on disk of each file in a saved directory (what the notebook and ``report`` show)."""
    return {p.name: p.stat().st_size for p in sorted(Path(directory).iterdir()) if p.is_file()}


__all__ = [
    "save_quantized", "load_quantized", "read_manifest", "read_safetensors_header", "saved_sizes",
    "QuantizedFormatError", "FORMAT_VERSION", "MANIFEST_FILE", "WEIGHTS_FILE", "NONPERSISTENT_PREFIX",
]
