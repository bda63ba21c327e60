"""Checks for the exercises of notebook 06 (save and load).

1. `check_tensor_bytes`: find one tensor's raw bytes in a ``model.safetensors`` file by reading its header by
   hand (8-byte little-endian length, JSON, offsets counted from the end of the header) — compared with the
   tensors of a file saved here by `w8a16.save_quantized`.
2. `check_logits_identical`: decide whether two models give *bit-identical* logits — tested on pairs that
   are identical, differ by one rounding step of one scale (allclose cannot see it), or differ only in dtype.
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from ...layer import W8A16LinearLayer
from ...io.serialization import save_quantized, WEIGHTS_FILE
from .quiz import Question, Quiz
from ._core import Failed, call, exercise

__all__ = ["QUIZ", "check_logits_identical", "check_tensor_bytes", "logits_identical", "tensor_bytes"]


# ----------------------------------------------------------------------------------------- references


def tensor_bytes(path: str | Path, name: str) -> bytes:
    """Reference: the raw bytes of tensor ``name`` in the safetensors file at ``path``.

    The file is: 8 bytes, the header's length N as a little-endian unsigned integer; N bytes of JSON mapping
    each name to its dtype, shape and ``data_offsets`` [begin, end); then the data, where offsets start.
    """
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        begin, end = header[name]["data_offsets"]
        f.seek(8 + n + begin)
        return f.read(end - begin)


def logits_identical(model_a: nn.Module, model_b: nn.Module, ids: torch.Tensor) -> bool:
    """Reference: same dtype, same shape, same values, computed without autograd.

    ``torch.equal`` alone compares shapes and values, not dtypes: a bf16 and an fp32 tensor holding the same
    numbers are "equal" to it, so the dtype is compared first.
    """
    with torch.no_grad():
        a, b = model_a(ids).logits, model_b(ids).logits
    return a.dtype == b.dtype and torch.equal(a, b)


# ----------------------------------------------------------------------------------------- exercise 1

_LENGTH_HINT = (
    " The first 8 bytes are the header's length as a little-endian unsigned integer: "
    "int.from_bytes(f.read(8), \"little\"); then read exactly that many bytes and json.loads them."
)


def _saved_model(directory: str) -> tuple[Path, dict[str, torch.Tensor]]:
    """Two quantized layers (bf16 with bias, fp32 without) saved with `save_quantized`; their tensors by name."""
    gen = torch.Generator().manual_seed(606)
    model = nn.Sequential(nn.Linear(24, 16, dtype=torch.bfloat16), nn.Linear(16, 8, bias=False))
    with torch.no_grad():
        for lin in model:
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen))
            if lin.bias is not None:
                lin.bias.copy_(torch.randn(lin.bias.shape, generator=gen))
    model[0], model[1] = W8A16LinearLayer.from_linear(model[0]), W8A16LinearLayer.from_linear(model[1])
    save_quantized(model, directory)
    return Path(directory) / WEIGHTS_FILE, dict(model.state_dict())


def _raw(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@exercise("A tensor's bytes in a safetensors file", passed="right for 4 tensors (int8 weights, bf16 scales and bias, fp32 scales).")
def check_tensor_bytes(fn):
    """``fn(path, name)`` -> the raw bytes of tensor ``name`` in the safetensors file at ``path``."""
    with tempfile.TemporaryDirectory() as directory:
        path, tensors = _saved_model(directory)
        data = path.read_bytes()
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
        for name in ("0.int8_weights", "0.scales", "0.bias", "1.scales"):
            case = f"tensor {name!r} ({str(tensors[name].dtype).removeprefix('torch.')}, {tuple(tensors[name].shape)})"
            try:
                got = call(fn, path, name)
            except Failed as err:
                message = str(err)
                if any(k in message for k in ("JSONDecodeError", "UnicodeDecodeError", "MemoryError", "OverflowError",
                                              "Expecting value", "Extra data")):
                    raise Failed(message + _LENGTH_HINT) from None
                raise
            if isinstance(got, (bytearray, memoryview)):
                got = bytes(got)
            if isinstance(got, torch.Tensor):
                raise Failed("you returned a tensor; return the raw bytes as they are in the file (a bytes object).")
            if not isinstance(got, bytes):
                raise Failed(f"your function returned a {type(got).__name__}; return the raw bytes (f.read(...) gives bytes).")
            want = _raw(tensors[name])
            if got == want:
                continue
            begin, end = header[name]["data_offsets"]
            if got == data[begin:end]:
                raise Failed(
                    f"on {case} you read from the start of the file: data_offsets count from the end of the "
                    "header, so the tensor starts at 8 + header length + begin."
                )
            if got == data[8 + n + begin : 8 + n + end + begin] or got == data[8 + n + begin : 8 + n + begin + end]:
                raise Failed(
                    f"on {case} you read too many bytes: data_offsets is [begin, end) — both are positions, "
                    "so the tensor is end - begin bytes long."
                )
            if len(got) == len(want):
                raise Failed(f"on {case} the length is right but not the bytes: check where you seek to (8 + N + begin).")
            raise Failed(
                f"on {case} expected {len(want)} bytes, got {len(got)}. The file is 8 bytes of header length, the "
                "JSON header, then the data; header[name]['data_offsets'] gives [begin, end) within the data."
            )


# ----------------------------------------------------------------------------------------- exercise 2


class _TinyLM(nn.Module):
    """Stands in for a causal LM: ids -> an object with ``.logits``, through one quantized layer."""

    def __init__(self, dtype: torch.dtype = torch.bfloat16, out_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(6)
        self.emb = nn.Embedding(32, 16, dtype=dtype)
        with torch.no_grad():
            self.emb.weight.copy_(torch.randn(32, 16, generator=gen))
            linear = nn.Linear(16, 32, dtype=dtype)
            linear.weight.copy_(torch.randn(32, 16, generator=gen) * 0.3)
            linear.bias.copy_(torch.randn(32, generator=gen) * 0.1)
        self.head = W8A16LinearLayer.from_linear(linear)
        self.emb.requires_grad_(False)  # inference only: the learner need not remember torch.no_grad()
        self.out_dtype = out_dtype

    def forward(self, ids: torch.Tensor) -> SimpleNamespace:
        logits = self.head(self.emb(ids))
        return SimpleNamespace(logits=logits if self.out_dtype is None else logits.to(self.out_dtype))


def _pairs() -> list[tuple[str, nn.Module, nn.Module, bool]]:
    base32 = _TinyLM(torch.float32).eval()
    nudged = copy.deepcopy(base32)
    with torch.no_grad():  # one fp32 scale moved to the next float: a real difference far below allclose's rtol
        s = nudged.head.scales
        s[3] = torch.nextafter(s[3], torch.tensor(float("inf")))
    base16 = _TinyLM(torch.bfloat16).eval()
    upcast = copy.deepcopy(base16)
    upcast.out_dtype = torch.float32  # same values, another dtype
    return [
        ("a model and its exact copy", base16, copy.deepcopy(base16), True),
        ("two fp32 models whose scales differ by one float step in one row", base32, nudged, False),
        ("two models with the same values but bf16 vs fp32 logits", base16, upcast, False),
        ("a model and itself", base32, base32, True),
    ]


@exercise("Bit-identical logits", passed="right on 4 pairs (exact copy, one-step scale change, dtype change).")
def check_logits_identical(fn):
    """``fn(model_a, model_b, ids)`` -> True exactly when both give the same logits, bit for bit (dtype included)."""
    ids = torch.tensor([[1, 4, 9, 16, 25, 31, 0, 7]])
    for case, a, b, want in _pairs():
        got = call(fn, a, b, ids.clone())
        if isinstance(got, torch.Tensor):
            if got.numel() != 1:
                raise Failed(
                    f"on {case} you returned a tensor of {got.numel()} values; reduce it to one True/False "
                    "(torch.equal does it in one step)."
                )
            got = bool(got.item())
        if not isinstance(got, bool):
            raise Failed(f"your function returned a {type(got).__name__}; return True or False.")
        if got == want:
            continue
        if want is False and "scales differ" in case:
            raise Failed(
                f"on {case} you said identical. The logits differ slightly: torch.allclose (or a tolerance) "
                "hides that. Bit-identical means torch.equal."
            )
        if want is False and "bf16 vs fp32" in case:
            raise Failed(
                f"on {case} you said identical. The values match but one is bf16 and the other fp32, and "
                "neither `(a == b).all()` nor torch.equal looks at dtypes: compare a.dtype == b.dtype as well."
            )
        raise Failed(
            f"on {case} you said {got}, but the answer is {want}. Run both models on ids, take .logits, "
            "and compare their dtypes and then their values with torch.equal."
        )


# ------------------------------------------------------------------------------------------------- quiz

QUIZ = Quiz("06", [
    Question("Why save with safetensors rather than torch.save (pickle)?",
             ("the files are smaller", "loading it runs no code: it is a JSON header and raw bytes",
              "it is faster on GPUs"), "b",
             "A pickle can execute arbitrary code when loaded; safetensors only describes tensors.",
             {"a": "the tensor bytes are the same either way.", "c": "the format is not what makes a GPU faster."}),
    Question("load_quantized builds the model on the meta device first. Why?",
             ("meta tensors compute faster", "so that the full-precision weights are never allocated",
              "meta is the only device that supports int8"), "b",
             "Meta tensors have a shape and no data; the loaded int8 tensors are then assigned in their place.",
             {"a": "meta tensors cannot compute at all: they have no data.",
              "c": "int8 works on every device."}),
    Question("Which check proves a save/load round trip is right?",
             ("torch.allclose on the logits", "the same dtype and torch.equal on the logits",
              "the same generated tokens"), "b",
             "Nothing should change on the way, so demand bit-identical logits of the same dtype.",
             {"a": "a tolerance hides a changed scale (exercise 2 shows one).",
              "c": "tokens can agree while the logits differ; it is a weaker check."}),
])
