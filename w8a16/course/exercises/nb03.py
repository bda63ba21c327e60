"""Checks for the exercises of notebook 03 (quantizing CodeGen): the module walker and the footprint arithmetic."""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import nn

from ...layer import W8A16LinearLayer
from ...quantizer import footprint_bytes, quantize_model
from .quiz import Question, Quiz
from ._core import Failed, NotAttempted, call, exercise

# ---- small models to walk -----------------------------------------------------------------------------------------


class _Block(nn.Module):
    def __init__(self, dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.attn = nn.ModuleDict({"qkv": nn.Linear(dim, 3 * dim, dtype=dtype), "out": nn.Linear(3 * dim, dim, bias=False, dtype=dtype)})
        self.norm = nn.LayerNorm(dim, dtype=dtype)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim, dtype=dtype), nn.GELU(), nn.Linear(2 * dim, dim, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn["out"](self.attn["qkv"](x))
        return x + self.mlp(self.norm(x))


class _TinyLM(nn.Module):
    """Embedding, two nested blocks, a final norm and an ``lm_head``: the shape of a causal LM, in miniature."""

    def __init__(self, dim: int = 8, vocab: int = 24, dtype: torch.dtype = torch.float32, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, dim, dtype=dtype)
        self.blocks = nn.ModuleList([_Block(dim, dtype) for _ in range(2)])
        self.ln_f = nn.LayerNorm(dim, dtype=dtype)
        self.lm_head = nn.Linear(dim, vocab, dtype=dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def _models() -> list[tuple[str, nn.Module, list[str]]]:
    """(description, model, exclusions)."""
    with torch.random.fork_rng(devices=[]):
        return [
            ("a tiny LM, nothing excluded", _TinyLM(seed=2), []),
            ("a tiny LM, lm_head excluded", _TinyLM(seed=0), ["lm_head"]),
            ("a tiny LM in bf16, lm_head and every 'out' excluded", _TinyLM(dtype=torch.bfloat16, seed=1), ["lm_head", "out"]),
            ("a bare nn.Sequential of Linear layers", nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3, bias=False)), []),
        ]


def _linear_names(model: nn.Module, cls: type) -> list[str]:
    return [name for name, m in model.named_modules() if type(m) is cls]


def _call_walker(fn: Callable[..., Any], *args: Any) -> Any:
    """Like `call`, but a walker that works in place and returns None is fine (the model is what we inspect)."""
    try:
        return fn(*args)
    except NotImplementedError:
        raise NotAttempted from None
    except Exception as err:  # noqa: BLE001 — the learner's bug, in one line
        raise Failed(f"your function raised {type(err).__name__}: {err}") from None


@exercise("Module walker with exclusions", passed="correct on 4 models: nested modules, exclusions by child name, bf16, no bias.")
def check_replace_linear(replace_linear: Callable[..., Any]) -> None:
    """``replace_linear(model, target_class, exclude)`` must replace, in place, every nested ``nn.Linear`` whose
    child name is not in ``exclude`` with ``target_class.from_linear(linear)``."""
    for description, original, exclude in _models():
        model = copy.deepcopy(original)
        result = _call_walker(replace_linear, model, W8A16LinearLayer, list(exclude))
        if result is not None and result is not model:
            model = result
        if not isinstance(model, nn.Module):
            raise Failed(f"on {description}: return the model (or None if you changed it in place), not {type(model).__name__}.")
        expected = copy.deepcopy(original)
        quantize_model(expected, W8A16LinearLayer, exclude)

        want_q, got_q = _linear_names(expected, W8A16LinearLayer), _linear_names(model, W8A16LinearLayer)
        want_f, got_f = _linear_names(expected, nn.Linear), _linear_names(model, nn.Linear)
        if not got_q:
            raise Failed(
                f"on {description}: no layer was replaced. Build the new layer with target_class.from_linear(child) "
                "and put it in place with setattr(parent, child_name, new_layer)."
            )
        missed = [n for n in want_q if n not in got_q]
        if missed and all("." not in n for n in got_q):
            raise Failed(
                f"on {description}: only top-level children were replaced; nested ones like {missed[0]!r} are still "
                "nn.Linear. Recurse: call your function again on every child that is not a Linear."
            )
        wrongly = [n for n in got_q if n in want_f]
        if wrongly:
            raise Failed(
                f"on {description}: {wrongly[0]!r} was replaced but {exclude} excludes it. Compare the child name "
                "(the last part of the dotted name, e.g. 'lm_head' or 'out') with the exclusion list before replacing."
            )
        if missed:
            raise Failed(f"on {description}: {missed[0]!r} is still an nn.Linear but should have been replaced.")
        if got_f != want_f:
            raise Failed(f"on {description}: kept {got_f}, expected {want_f} to stay nn.Linear.")
        for name in want_q:
            mine, ref = model.get_submodule(name), expected.get_submodule(name)
            if (mine.bias is None) != (ref.bias is None):
                raise Failed(f"on {description}: {name!r} lost (or gained) its bias. from_linear keeps it — use it.")
            if not torch.equal(mine.int8_weights, ref.int8_weights) or not torch.equal(mine.scales, ref.scales):
                raise Failed(
                    f"on {description}: {name!r} holds the wrong int8 weights or scales. A fresh "
                    "target_class(in, out) has random weights: use target_class.from_linear(child), which quantizes "
                    "the child's weights."
                )
            if ref.bias is not None and not torch.equal(mine.bias, ref.bias):
                raise Failed(f"on {description}: {name!r} has the wrong bias; copy the Linear's bias (from_linear does).")
        if sorted(n for n, _ in model.named_modules()) != sorted(n for n, _ in expected.named_modules()):
            raise Failed(f"on {description}: the module tree changed shape; replace layers where they are, nothing else.")


# ---- footprint arithmetic ------------------------------------------------------------------------------------------

_LAYER_CASES = [  # fp32 with a bias first: there every typical mistake gives a different number
    (92, 256, True, torch.float32),
    (1024, 1024, True, torch.bfloat16),
    (4096, 1024, False, torch.bfloat16),
    (51200, 1024, True, torch.bfloat16),
    (3, 5, False, torch.float16),
]


def _layer_bytes(out_features: int, in_features: int, bias: bool, dtype: torch.dtype) -> int:
    size = torch.empty((), dtype=dtype).element_size()
    return out_features * in_features + out_features * size + (out_features * size if bias else 0)


@exercise("Bytes of one W8A16 layer", passed="correct for 5 layers: bf16, fp16 and fp32; with and without bias.")
def check_w8a16_layer_bytes(fn: Callable[..., Any]) -> None:
    """``fn(out_features, in_features, bias, dtype)`` -> bytes of a `W8A16LinearLayer` with those settings."""
    for out_f, in_f, bias, dtype in _LAYER_CASES:
        got = call(fn, out_f, in_f, bias, dtype)
        want = _layer_bytes(out_f, in_f, bias, dtype)
        real = footprint_bytes(W8A16LinearLayer(in_f, out_f, bias=bias, dtype=dtype))
        assert want == real  # the reference matches the real layer
        size = torch.empty((), dtype=dtype).element_size()
        case = f"for out={out_f}, in={in_f}, bias={bias}, dtype={str(dtype).removeprefix('torch.')}"
        if not isinstance(got, (int, float)) and not (isinstance(got, torch.Tensor) and got.numel() == 1):
            raise Failed(f"{case} you returned {type(got).__name__}; return a number of bytes.")
        got = int(got)
        if got == want:
            continue
        if got == out_f * in_f * size + (out_f * size if bias else 0):
            raise Failed(f"{case} you got {got:,}, the size of the original nn.Linear. The int8 weights take 1 byte each.")
        if got == out_f * in_f + out_f + (out_f if bias else 0) and size > 1:
            raise Failed(
                f"{case} you got {got:,}: you counted the scales (and bias) as 1 byte each. Only the weights are int8; "
                f"scales and bias stay in {str(dtype).removeprefix('torch.')}, {size} bytes each."
            )
        if bias and got == want - out_f * size:
            raise Failed(f"{case} you got {got:,}: you forgot the bias, {out_f} values of {size} bytes.")
        if got == want - out_f * size:
            raise Failed(f"{case} you got {got:,}: you forgot the scales, one per output row ({out_f} × {size} bytes).")
        if got == out_f * in_f + out_f * 4 + (out_f * 4 if bias else 0):
            raise Failed(f"{case} you got {got:,}: scales and bias are stored in the layer's dtype, not always fp32.")
        if got == out_f * in_f:
            raise Failed(f"{case} you got {got:,}: that is only the int8 weights; add the scales and the bias.")
        raise Failed(f"{case} you got {got:,}, expected {want:,}. Hint: weights 1 byte each + one scale per row + bias.")


@exercise("Expected footprint of a quantized model", passed="matches the real footprint of 4 quantized models.")
def check_expected_footprint(fn: Callable[..., Any]) -> None:
    """``fn(model, exclude)`` -> predicted bytes of ``model`` after replacing every non-excluded Linear, computed
    from the layer shapes alone (without quantizing)."""
    for description, model, exclude in _models():
        untouched = copy.deepcopy(model)
        got = call(fn, model, list(exclude))
        if any(isinstance(m, W8A16LinearLayer) for m in model.modules()):
            raise Failed(f"on {description}: your function quantized the model. Predict from the shapes; do not change it.")
        quantized = copy.deepcopy(untouched)
        want = quantize_model(quantized, W8A16LinearLayer, exclude).bytes_after
        if isinstance(got, torch.Tensor):
            got = got.item()
        if not isinstance(got, (int, float)):
            raise Failed(f"on {description}: you returned {type(got).__name__}; return a number of bytes.")
        got = int(got)
        if got == want:
            continue
        before = footprint_bytes(untouched)
        linears = {n: m for n, m in untouched.named_modules() if isinstance(m, nn.Linear)}
        excluded = {n: m for n, m in linears.items() if n.rsplit(".", 1)[-1] in exclude}
        quantized_layers = {n: m for n, m in linears.items() if n not in excluded}
        q_bytes = sum(_layer_bytes(m.out_features, m.in_features, m.bias is not None, m.weight.dtype) for m in quantized_layers.values())
        all_q_bytes = sum(_layer_bytes(m.out_features, m.in_features, m.bias is not None, m.weight.dtype) for m in linears.values())
        if got == q_bytes and q_bytes != want:
            raise Failed(
                f"on {description}: you got {got:,}, only the quantized layers. The rest of the model (embeddings, "
                "norms, excluded layers) keeps its bytes: add it."
            )
        if excluded and got == before - sum(footprint_bytes(m) for m in linears.values()) + all_q_bytes:
            raise Failed(f"on {description}: you counted the excluded layers {sorted(excluded)} as quantized; they stay as they are.")
        if got == before:
            raise Failed(f"on {description}: you got the footprint before quantization ({got:,} bytes).")
        raise Failed(
            f"on {description}: you predicted {got:,} bytes, the quantized model takes {want:,}. Hint: start from the "
            "current footprint, and for each quantized Linear swap its bytes for 1 byte/weight + scales + bias."
        )


# ------------------------------------------------------------------------------------------------- quiz

QUIZ = Quiz("03", [
    Question("Quantizing CodeGen's block Linears shrinks the model by less than half. Why?",
             ("an int8 weight takes more than one byte", "the embedding and lm_head keep their bf16 bytes",
              "the scales take as many bytes as the weights"), "b",
             "Only the block Linears go from 2 bytes to 1 per weight; the embedding and lm_head are ~30 % of the "
             "parameters and stay in bf16.",
             {"a": "int8 is one byte per weight.",
              "c": "one bf16 scale per output row of 1024+ weights is well under 1 % extra."}),
    Question("After quantizing, one greedy-generated token changed. What does that tell you?",
             ("the quantizer is broken", "at that step the top two logits were closer than the change the rounding "
              "made", "the tokenizer changed"), "b",
             "A small perturbation flips the argmax only where the race was already close; after that, the "
             "continuation differs because it is conditioned on a different token.",
             {"a": "a small relative logits error can still flip a close call; check the error, not one token.",
              "c": "the tokenizer is not touched by the quantizer."}),
    Question('What does Quantizer(model, W8A16LinearLayer, ["lm_head"]) do to lm_head?',
             ("quantizes it like the others", "keeps it as an nn.Linear in its own dtype", "removes it"), "b",
             "The list names the layers to keep; the report lists lm_head as kept, excluded by 'lm_head'.",
             {"a": "the third argument is the exclusion list.",
              "c": "nothing is removed: excluded layers stay as they are."}),
])
