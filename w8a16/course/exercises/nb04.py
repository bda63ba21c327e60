"""Checks for the exercises of notebook 04 (quantizing DETR): where the parameters sit, and what quantizing saves."""

from __future__ import annotations

import copy
import warnings
from typing import Any, Callable

import torch
from torch import nn

from ...quantizer import footprint_bytes, quantize_model
from ._core import Failed, call, exercise


class _TinyDetector(nn.Module):
    """A convolutional backbone, a 1×1 projection, a small transformer-ish head: DETR's layout in miniature."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False, dtype=dtype),
            nn.BatchNorm2d(8, dtype=dtype),
            nn.ReLU(),
            nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, dtype=dtype), nn.ReLU()),
        )
        self.projection = nn.Conv2d(16, 12, 1, dtype=dtype)
        self.queries = nn.Embedding(5, 12, dtype=dtype)
        self.head = nn.ModuleDict(
            {
                "ffn": nn.Sequential(nn.Linear(12, 24, dtype=dtype), nn.ReLU(), nn.Linear(24, 12, dtype=dtype)),
                "norm": nn.LayerNorm(12, dtype=dtype),
                "classes": nn.Linear(12, 7, dtype=dtype),
                "boxes": nn.Linear(12, 4, bias=False, dtype=dtype),
            }
        )


def _models() -> list[tuple[str, nn.Module]]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return [
            ("a tiny detector (conv backbone + linear head)", _TinyDetector()),
            ("the same detector in bf16", _TinyDetector(torch.bfloat16)),
            ("a Linear-only MLP", nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))),
            ("a Conv-only stack", nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.Conv2d(4, 2, 1, bias=False)))),
        ]


def _shares(model: nn.Module) -> tuple[float, float]:
    total = sum(p.numel() for p in model.parameters())
    conv = sum(p.numel() for m in model.modules() if isinstance(m, nn.Conv2d) for p in m.parameters(recurse=False))
    linear = sum(p.numel() for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters(recurse=False))
    return conv / total, linear / total


def _pair(value: Any, what: str, description: str) -> tuple[float, float]:
    if isinstance(value, dict):
        raise Failed(f"on {description}: return a tuple ({what}), not a dict.")
    try:
        a, b = value
        return float(a), float(b)
    except (TypeError, ValueError):
        raise Failed(f"on {description}: return a pair ({what}); you returned {type(value).__name__}.") from None


@exercise("Conv2d vs Linear share of parameters", passed="correct on 4 models, nested containers and bf16 included.")
def check_conv_linear_share(fn: Callable[..., Any]) -> None:
    """``fn(model)`` -> ``(conv_share, linear_share)``: fractions of all of ``model``'s parameters held by
    ``nn.Conv2d`` and by ``nn.Linear`` layers."""
    for description, model in _models():
        got = _pair(call(fn, model), "conv_share, linear_share", description)
        want = _shares(model)
        if all(abs(g - w) < 1e-9 for g, w in zip(got, want)):
            continue
        if all(abs(g - 100 * w) < 1e-6 for g, w in zip(got, want)):
            raise Failed(f"on {description}: you returned percentages {got}; return fractions between 0 and 1.")
        if abs(got[0] - want[1]) < 1e-9 and abs(got[1] - want[0]) < 1e-9:
            raise Failed(f"on {description}: conv and linear are swapped; return (conv_share, linear_share).")
        total = sum(p.numel() for p in model.parameters())
        weights_only = tuple(
            sum(m.weight.numel() for m in model.modules() if isinstance(m, cls)) / total for cls in (nn.Conv2d, nn.Linear)
        )
        if all(abs(g - w) < 1e-9 for g, w in zip(got, weights_only)):
            raise Failed(f"on {description}: you counted only the weights; the biases are parameters too.")
        both = want[0] + want[1]
        if both and all(abs(g - w / both) < 1e-9 for g, w in zip(got, want)):
            raise Failed(
                f"on {description}: your shares add up to 1, so you divided by the Conv2d + Linear parameters only. "
                "Divide by all the model's parameters (norms and embeddings included)."
            )
        if sum(got) > 1 + 1e-9 or any(g > w + 1e-9 for g, w in zip(got, want)):
            raise Failed(
                f"on {description}: your shares are too large ({got[0]:.3f}, {got[1]:.3f}; expected {want[0]:.3f}, "
                f"{want[1]:.3f}). Counting module.parameters() on every module counts a container's children again: "
                "use module.parameters(recurse=False), or visit only the Conv2d and Linear modules."
            )
        raise Failed(
            f"on {description}: you got ({got[0]:.4f}, {got[1]:.4f}), expected ({want[0]:.4f}, {want[1]:.4f}). Hint: "
            "numel() of the parameters of each nn.Conv2d / nn.Linear, over numel() of all parameters."
        )


@exercise("Quantize and measure the footprint", passed="correct on 4 models: all Linear layers replaced, bytes right.")
def check_quantize_and_measure(fn: Callable[..., Any]) -> None:
    """``fn(model)`` quantizes every ``nn.Linear`` of ``model`` in place and returns ``(bytes_before, bytes_after)``,
    counting parameters *and* buffers."""
    for description, original in _models():
        model = copy.deepcopy(original)
        with warnings.catch_warnings():
            # The Conv-only stack has nothing to quantize on purpose; the quantizer may say so, the check need not.
            warnings.filterwarnings("ignore", message="Quantizer: the model has no nn.Linear", category=UserWarning)
            got = _pair(call(fn, model), "bytes_before, bytes_after", description)
            reference = copy.deepcopy(original)
            before = footprint_bytes(reference)
            after = quantize_model(reference, exclude=()).bytes_after
        left = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        if left:
            raise Failed(f"on {description}: {left[0]!r} is still an nn.Linear; quantize every Linear (no exclusions here).")
        got_before, got_after = int(got[0]), int(got[1])
        if (got_before, got_after) == (before, after):
            continue
        if got_before == got_after:
            raise Failed(
                f"on {description}: before and after are both {got_before:,} bytes. Measure once before quantizing and "
                "once after — `Quantizer` changes the model in place, so the 'before' must be taken first."
            )
        numel_before = sum(t.numel() for t in [*original.parameters(), *original.buffers()])
        if got_before == numel_before:
            raise Failed(f"on {description}: {got_before:,} is a number of values, not bytes; multiply by element_size().")
        params_after = sum(p.numel() * p.element_size() for p in model.parameters())
        if got_after == params_after and params_after != after:
            raise Failed(
                f"on {description}: 'after' is {got_after:,} bytes, too small: W8A16LinearLayer keeps its int8 weights "
                "and scales in *buffers*, not parameters. Count model.buffers() too (or use footprint_bytes)."
            )
        raise Failed(
            f"on {description}: you measured ({got_before:,}, {got_after:,}) bytes, expected ({before:,}, {after:,}). "
            "Hint: sum numel() * element_size() over parameters and buffers, before and after quantizing."
        )


# ----------------------------------------------------------------------------------------------------- quiz

from .quiz import Question, Quiz  # noqa: E402 (the quiz comes after the checks, as in the notebook)

QUIZ = Quiz("04", [
    Question("A Linear-only quantizer took DETR from 166.5 MB to 114.3 MB, not to a quarter. Why?",
             ("DETR's Linear layers are stored in fp16", "most of DETR's weights are in Conv2d layers (the ResNet "
              "backbone), which a Linear-only quantizer leaves in fp32", "the int8 weights need as much room as "
              "fp32 ones once their scales are added"), "b",
             "Count parameters by module type first: the backbone's convolutions hold most of DETR's bytes.",
             {"a": "DETR runs in fp32 here; the Linear layers shrink 4×, they are just a minority of the bytes.",
              "c": "one scale per output channel is tiny next to the int8 weights."}),
    Question("On the CPU this notebook runs DETR with int8 weights and fp32 activations. What is that scheme?",
             ("W8A8", "W8A16", "W8A32"), "c",
             "Weights are int8, activations stay fp32: W8A32. Every difference then comes from the weights alone.",
             {"a": "nothing here rounds the activations to 8 bits.",
              "b": "A16 would mean 16-bit activations; the CPU run keeps them fp32."}),
    Question("With random weights (offline), all of DETR's queries give the same box. What follows?",
             ("five listed detections are one box five times, so 'same top class on every query' is one "
              "decision, not many", "the quantized model is broken", "the float model is broken"), "a",
             "Say what a number can mean before reading it: compare against the model's own response to a "
             "change of the input instead.",
             {"b": "the float model does the same: it is the random weights, not the quantization.",
              "c": "with random weights no model detects anything; it is not broken, it is untrained."}),
])
