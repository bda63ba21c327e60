"""The model walker: swap every `nn.Linear` (and transformers' `Conv1D`) of a model for a quantized layer, in place.

`Quantizer(model, W8A16LinearLayer, ["lm_head"])` is the seed's call; `quantize_model` does the same and
returns a `QuantizationReport` instead of the model. Exclusions are matched against each Linear's
fully-qualified name (``"transformer.h.0.mlp.fc_out"``), its child name (``"lm_head"``) or as a glob
(``"transformer.h.*.attn.*"``).
"""

from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable

from torch import nn

from . import quant
from .layer import W8A16LinearLayer, hf_conv1d


def footprint_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers, each shared tensor counted once."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


@dataclass
class QuantizationReport:
    """What one pass of the walker did, printable in a notebook."""

    replaced: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)  # layer (or parameter) name -> why it stayed in full precision
    bytes_before: int = 0
    bytes_after: int = 0

    @property
    def saving(self) -> float:
        """Fraction of the footprint saved, e.g. 0.48 for 48 %."""
        return 1 - self.bytes_after / self.bytes_before if self.bytes_before else 0.0

    def __str__(self) -> str:
        lines = [
            f"replaced {len(self.replaced)} Linear layer(s), kept {len(self.kept)}",
            f"footprint {_mb(self.bytes_before)} -> {_mb(self.bytes_after)} ({self.saving:.1%} smaller)",
        ]
        lines += [f"  kept {name}: {why}" for name, why in self.kept.items()]
        return "\n".join(lines)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.2f} MB"


def _matches(name: str, pattern: str) -> bool:
    child = name.rsplit(".", 1)[-1]
    return pattern in (name, child) or fnmatch.fnmatchcase(name, pattern)


def _tied_weights(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> every name under which it appears, for parameters shared by several modules."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return {pid: ns for pid, ns in names.items() if len(ns) > 1}


# Why a Linear-like weight stays in full precision although nobody excluded it (see `_cannot_replace`).
# nn.MultiheadAttention never calls out_proj(x): it passes out_proj.weight and .bias to
# F.multi_head_attention_forward (as torch's fused encoder path does). A W8A16LinearLayer there works, through its
# `weight` property, but as storage only: every attention call dequantizes a dense copy and multiplies in float.
# Measured (d=512, fp32, one CPU thread): that copy took 0.05-0.9 ms, +10-40 % on an MHA call of 128-1024 tokens
# and 2-12× on a one-token call, to save 3·d² bytes per layer; in_proj_weight, 3/4 of MHA's weights, cannot be
# swapped at all. So MHA stays a float block, reported, rather than listed as "replaced" without ever running an
# int8 matmul. Where storage matters more, `mha.out_proj = W8A16LinearLayer.from_linear(mha.out_proj)` works.
_MHA_OUT_PROJ = (
    "out_proj of an nn.MultiheadAttention, which never calls it but reads out_proj.weight: quantized, it would be "
    "dequantized to a dense copy on every call (storage saved, no int8 matmul); swap it by hand if storage matters"
)
_MHA_IN_PROJ = (
    "a Parameter of nn.MultiheadAttention, not a Linear layer: F.multi_head_attention_forward multiplies by it "
    "directly, so there is no layer to replace"
)
_RNN = "a Parameter of nn.{cls}, multiplied by inside its fused recurrent kernel: not a Linear layer to replace"
_UNKNOWN = "a {cls} with a 2-D weight, not a Linear the quantizer knows (nn.Linear, transformers' Conv1D)"


# Called as hook(model, report, exclude, quantize_tied) after every walk: how an integration (transformers' config
# in w8a16.io.hf) learns that a model now holds W8A16 layers, without this module importing it.
after_quantize: list[Callable[[nn.Module, QuantizationReport, list[str], bool], None]] = []


def is_linear_like(module: nn.Module) -> bool:
    """An `nn.Linear` (or subclass) or a transformers `Conv1D`: what `W8A16LinearLayer.from_linear` accepts."""
    conv1d = hf_conv1d()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def _cannot_replace(name: str, module: nn.Module, parent: nn.Module | None) -> str | None:
    """Why swapping this Linear-like module for a `W8A16LinearLayer` would change the model, or None."""
    if not name:
        return "it is the model itself, which cannot be replaced in place: use W8A16LinearLayer.from_linear(model)"
    base = nn.Linear if isinstance(module, nn.Linear) else hf_conv1d()
    if type(module).forward is not base.forward:  # e.g. a router returning (scores, logits), FalconLinear
        return f"{type(module).__name__} overrides {base.__name__}.forward; a W8A16LinearLayer would drop what it adds"
    if isinstance(parent, nn.MultiheadAttention):
        return _MHA_OUT_PROJ
    return None


def _other_matrices(name: str, module: nn.Module) -> dict[str, str]:
    """2-D weights outside Linear-like modules, that stay in full precision: ``{name: why}``.

    nn.MultiheadAttention's in_proj_weight and the recurrent layers' weight_ih/weight_hh are multiplied by
    inside torch's fused kernels; any other module's 2-D ``weight`` (except an embedding table, which is
    looked up, not multiplied by) is listed so that nothing that looks like a Linear goes unmentioned.
    """
    prefix = f"{name}." if name else ""
    if isinstance(module, (nn.MultiheadAttention, nn.RNNBase)):
        why = _MHA_IN_PROJ if isinstance(module, nn.MultiheadAttention) else _RNN.format(cls=type(module).__name__)
        return {prefix + n: why for n, p in module.named_parameters(recurse=False) if p.dim() == 2}
    weight = module._parameters.get("weight")
    if weight is not None and weight.dim() == 2 and not isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return {name: _UNKNOWN.format(cls=type(module).__name__)}
    return {}


def quantize_model(
    model: nn.Module,
    target_class: type[W8A16LinearLayer] = W8A16LinearLayer,
    exclude: Iterable[str] = (),
    *,
    quantize_tied: bool = False,
    method: str = "absmax",
) -> QuantizationReport:
    """Replace every Linear-like layer of ``model`` (not excluded) with ``target_class.from_linear(layer)``.

    Linear-like: `nn.Linear` and its subclasses, and transformers' `Conv1D` (GPT-2's Linear, weight stored
    transposed). Nothing is skipped silently: whatever is not replaced is in ``report.kept`` with the reason —
    excluded, tied, a subclass that overrides ``forward``, nn.MultiheadAttention's projections, or a 2-D
    weight in a module the quantizer does not know — and the last three are also announced in one warning.

    A Linear whose weight is shared with another module (an lm_head tied to the input embeddings) is kept
    unless ``quantize_tied=True``: quantizing it would silently untie the pair and store the matrix twice.
    Running it again on a quantized model changes nothing.

    ``method`` chooses each layer's scales: ``"absmax"`` (default, the seed's) or ``"mse"`` (per-row clipping
    search, see `quant`); it is passed to ``from_linear`` only when it is not the default, so a ``target_class``
    with the seed's one-argument ``from_linear`` keeps working.
    """
    quant._check_method(method)
    if isinstance(exclude, str):
        exclude = [exclude]
    patterns = list(exclude)
    report = QuantizationReport(bytes_before=footprint_bytes(model))
    tied = _tied_weights(model)
    modules = dict(model.named_modules())
    linears = [(name, m) for name, m in modules.items() if is_linear_like(m)]
    quantized = [name for name, m in modules.items() if isinstance(m, W8A16LinearLayer)]

    for pattern in patterns:
        if not any(_matches(name, pattern) for name in [*(n for n, _ in linears), *quantized]):
            warnings.warn(f"Quantizer: exclusion pattern {pattern!r} matches no Linear layer", stacklevel=3)
    if not linears and not quantized:
        warnings.warn("Quantizer: the model has no nn.Linear or transformers Conv1D layer to quantize", stacklevel=3)

    unsupported: list[str] = []  # kept for a reason the user did not choose: announced in one warning
    for name, module in modules.items():
        if isinstance(module, W8A16LinearLayer):
            continue
        if not is_linear_like(module):
            others = _other_matrices(name, module)
            report.kept.update(others)
            unsupported += others
            continue
        hit = next((p for p in patterns if _matches(name, p)), None)
        if hit is not None:
            report.kept[name] = f"excluded by {hit!r}"
            continue
        why = _cannot_replace(name, module, modules.get(name.rpartition(".")[0]))
        if why is not None:
            report.kept[name] = why
            unsupported.append(name)
            continue
        shared = tied.get(id(module.weight))
        if shared and not quantize_tied:
            others = [n for n in shared if n != f"{name}.weight"]
            why = f"weight is tied to {', '.join(others)}; pass quantize_tied=True to quantize it anyway"
            warnings.warn(f"Quantizer: kept {name}: {why}", stacklevel=3)
            report.kept[name] = why
            continue
        try:
            if method == "absmax":
                new = target_class.from_linear(module)
            else:
                new = target_class.from_linear(module, method=method)
        except ValueError as err:
            raise ValueError(f"cannot quantize layer {name!r}: {err}") from err
        _set_submodule(model, name, new)
        report.replaced.append(name)

    if unsupported:
        first = unsupported[0]
        warnings.warn(
            f"Quantizer: kept {len(unsupported)} Linear-like weight(s) in full precision that it cannot replace, "
            f"e.g. {first}: {report.kept[first]}. Each one, with its reason, is in the report's .kept",
            stacklevel=3,
        )
    report.bytes_after = footprint_bytes(model)
    for hook in after_quantize:
        hook(model, report, patterns, quantize_tied)
    return report


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def Quantizer(  # noqa: N802 — the seed's name, kept so its examples run unchanged
    model: nn.Module,
    target_class: type[W8A16LinearLayer] = W8A16LinearLayer,
    module_name_to_exclude: Iterable[str] = (),
    *,
    quantize_tied: bool = False,
    method: str = "absmax",
    report: Callable[[QuantizationReport], None] | None = None,
) -> nn.Module:
    """Quantize ``model`` in place and return it (the seed's call).

    The `QuantizationReport` is kept on the model as ``model.w8a16_report`` and, if ``report`` is given
    (``report=print``), handed to it. ``method`` is `quantize_model`'s.
    """
    result = quantize_model(model, target_class, module_name_to_exclude, quantize_tied=quantize_tied, method=method)
    model.w8a16_report = result
    if report is not None:
        report(result)
    return model
