"""Checks for the exercises of notebook 06 (save and load).

1. `check_layer_bytes`: the bytes a quantized layer takes in ``model.safetensors``, from its shape alone —
   compared with the byte ranges of a file saved here by `w8a16.save_quantized`.
2. `check_logits_identical`: decide whether two models give *bit-identical* logits — tested on pairs that
   are identical, differ by one rounding step of one scale (allclose cannot see it), or differ only in dtype.
"""

from __future__ import annotations

import copy
import tempfile
from types import SimpleNamespace

import torch
from torch import nn

from ...layer import W8A16LinearLayer
from ...io.serialization import read_safetensors_header, save_quantized, WEIGHTS_FILE
from ._core import Failed, call, exercise

__all__ = ["check_layer_bytes", "check_logits_identical", "layer_bytes", "logits_identical"]

_ITEMSIZE = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


# ----------------------------------------------------------------------------------------- references


def layer_bytes(in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> int:
    """Reference: one int8 byte per weight, plus one scale (and one bias) per output row in ``dtype``."""
    return out_features * in_features + out_features * _ITEMSIZE[dtype] * (2 if bias else 1)


def logits_identical(model_a: nn.Module, model_b: nn.Module, ids: torch.Tensor) -> bool:
    """Reference: same dtype, same shape, same values, computed without autograd.

    ``torch.equal`` alone compares shapes and values, not dtypes: a bf16 and an fp32 tensor holding the same
    numbers are "equal" to it, so the dtype is compared first.
    """
    with torch.no_grad():
        a, b = model_a(ids).logits, model_b(ids).logits
    return a.dtype == b.dtype and torch.equal(a, b)


# ----------------------------------------------------------------------------------------- exercise 1


_LAYER_CASES = [  # (in, out, bias, dtype)
    (256, 64, True, torch.bfloat16),  # first: here "4-byte scales" and "a bias too many" give different sums
    (64, 192, False, torch.bfloat16),
    (48, 48, True, torch.float32),
    (40, 24, False, torch.float16),
]


def _bytes_in_a_real_file(in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> int:
    """Save one quantized layer and add up its tensors' byte ranges in the safetensors header."""
    layer = nn.Sequential(nn.Linear(in_features, out_features, bias=bias, dtype=dtype))
    layer[0] = W8A16LinearLayer.from_linear(layer[0])
    with tempfile.TemporaryDirectory() as directory:
        save_quantized(layer, directory)
        header = read_safetensors_header(f"{directory}/{WEIGHTS_FILE}")
    return sum(end - begin for _, _, begin, end in header.values())


@exercise("Bytes of a quantized layer", passed="matches the file for 4 layers (bias on/off, fp32/bf16/fp16).")
def check_layer_bytes(fn):
    """``fn(in_features, out_features, bias, dtype)`` -> bytes of int8 weights + scales (+ bias) on disk."""
    for n_in, n_out, bias, dtype in _LAYER_CASES:
        name = str(dtype).removeprefix("torch.")
        case = f"a {n_in}→{n_out} layer, bias={bias}, {name}"
        got = call(fn, n_in, n_out, bias, dtype)
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = got.item()
        if not isinstance(got, (int, float)) or isinstance(got, bool):
            raise Failed(f"your function returned a {type(got).__name__}; return a number of bytes (an int).")
        ref = _bytes_in_a_real_file(n_in, n_out, bias, dtype)
        if got == ref:
            continue
        size = _ITEMSIZE[dtype]
        weights = n_out * n_in
        extras = n_out * size * (2 if bias else 1)
        if got == weights * size + extras:
            raise Failed(f"on {case} you counted the weights in {name}: they are stored as int8, one byte each.")
        if got == weights:
            raise Failed(f"on {case} you counted only the int8 weights: the scales (one per output row) are stored.")
        if got == weights + n_in * size * (2 if bias else 1):
            raise Failed(f"on {case} you used in_features for the scales: there is one scale per *output* row.")
        if not bias and got == weights + 2 * n_out * size:
            raise Failed(f"on {case} you counted a bias, but this layer has none (bias=False).")
        if bias and got == weights + n_out * size:
            raise Failed(f"on {case} you forgot the bias: it is stored in {name}, one value per output row.")
        if got == weights + n_out * 4 * (2 if bias else 1):
            raise Failed(f"on {case} you counted 4-byte scales: scales and bias are in the layer dtype ({name}).")
        raise Failed(
            f"on {case} you said {got} bytes, the file holds {ref}. Count: out×in int8 weights (1 byte), "
            "out scales and, if bias, out biases (each in the layer dtype)."
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
