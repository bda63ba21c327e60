"""The model walker: swap every `nn.Linear` (and transformers' `Conv1D`) of a model for a quantized layer, in place.

`Quantizer(model, W8A16LinearLayer, ["lm_head"])` is the seed's call; `quantize_model` does the same and
returns a `QuantizationReport` instead of the model. Exclusions are matched against each layer's
fully-qualified name (``"transformer.h.0.mlp.fc_out"``), its child name (``"lm_head"``) or as a glob
(``"transformer.h.*.attn.*"``).

Several quantized classes can be given at once: ``Quantizer(model, [W8A16LinearLayer, W8A16Conv2d])`` also
swaps every `nn.Conv2d`. Each class says which float modules it replaces (``replaces``), why a particular one
cannot be swapped (``cannot_replace``) and how to build itself from it (``from_float``), so the walker needs no
list of module types of its own.
"""

from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol, Sequence, Union

from torch import nn

from . import quant
from .layer import W8A16Conv2d, W8A16LinearLayer, is_linear_like  # noqa: F401 (w8a16.io imports it from here)


class QuantizedClass(Protocol):
    """What the walker needs from a quantized layer class (`W8A16LinearLayer`, `W8A16Conv2d`)."""

    float_kind: str  # "Linear", "Conv2d": how the report counts the layers it replaced
    float_modules: str  # "nn.Conv2d": the float modules it replaces, for messages

    @classmethod
    def replaces(cls, module: nn.Module) -> bool: ...
    @classmethod
    def cannot_replace(cls, module: nn.Module) -> str | None: ...
    @classmethod
    def from_float(cls, module: nn.Module) -> nn.Module: ...


Targets = Union[type[W8A16LinearLayer], type[W8A16Conv2d], Sequence[type]]


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
    replaced_by_kind: dict[str, int] = field(default_factory=dict)  # {"Linear": 100, "Conv2d": 54}, one per target

    @property
    def saving(self) -> float:
        """Fraction of the footprint saved, e.g. 0.48 for 48 %."""
        return 1 - self.bytes_after / self.bytes_before if self.bytes_before else 0.0

    def __str__(self) -> str:
        lines = [
            f"replaced {self._replaced_counts()} layer(s), kept {len(self.kept)}",
            f"footprint {_mb(self.bytes_before)} -> {_mb(self.bytes_after)} ({self.saving:.1%} smaller)",
        ]
        lines += [f"  kept {name}: {why}" for name, why in self.kept.items()]
        return "\n".join(lines)

    def _replaced_counts(self) -> str:
        """"100 Linear" (the seed's wording) or "100 Linear + 54 Conv2d"."""
        if not self.replaced_by_kind:  # a report built by hand
            return f"{len(self.replaced)} Linear"
        return " + ".join(f"{n} {kind}" for kind, n in self.replaced_by_kind.items())


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


def _cannot_replace(name: str, module: nn.Module, parent: nn.Module | None, target: QuantizedClass) -> str | None:
    """Why swapping this module for a ``target`` layer would change the model, or None."""
    if not name:
        # (from_float's qualified name is the public class's, also for a subclass such as the CLI's)
        return f"it is the model itself, which cannot be replaced in place: use {target.from_float.__qualname__}(model)"
    why = target.cannot_replace(module)
    if why is None and isinstance(parent, nn.MultiheadAttention):
        return _MHA_OUT_PROJ
    return why


_CONV_NOT_2D = "a {cls}, not an nn.Conv2d: W8A16Conv2d quantizes 2-D convolutions only"
_QUANTIZED = (W8A16LinearLayer, W8A16Conv2d)


def _already_quantized(module: nn.Module, targets: list[QuantizedClass]) -> bool:
    """One of our quantized layers, of a kind the targets produce (what a second pass finds)."""
    return any(isinstance(module, base) and issubclass(t, base) for base in _QUANTIZED for t in targets)


def _other_matrices(name: str, module: nn.Module, kinds: list[str]) -> dict[str, str]:
    """Weights outside the modules the targets replace, that stay in full precision: ``{name: why}``.

    When Linear layers are quantized: nn.MultiheadAttention's in_proj_weight and the recurrent layers'
    weight_ih/weight_hh, multiplied by inside torch's fused kernels, and any other module's 2-D ``weight``
    (except an embedding table, which is looked up, not multiplied by), so that nothing that looks like a Linear
    goes unmentioned. When Conv2d layers are quantized: the other convolutions (Conv1d, ConvTranspose2d...).
    """
    if "Conv2d" in kinds and isinstance(module, nn.modules.conv._ConvNd):
        return {name: _CONV_NOT_2D.format(cls=type(module).__name__)}
    if "Linear" not in kinds:
        return {}
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
    target_class: Targets = W8A16LinearLayer,
    exclude: Iterable[str] = (),
    *,
    quantize_tied: bool = False,
    method: str = "absmax",
) -> QuantizationReport:
    """Replace every layer of ``model`` that ``target_class`` replaces (not excluded) with its quantized version.

    ``target_class`` is one quantized class or a list of them: `W8A16LinearLayer` replaces `nn.Linear` and its
    subclasses, and transformers' `Conv1D` (GPT-2's Linear, weight stored transposed); `W8A16Conv2d` replaces
    `nn.Conv2d`. Each module goes to the first class that ``replaces`` it. Nothing is skipped silently:
    whatever is not replaced is in ``report.kept`` with the reason — excluded, tied, a subclass that overrides
    ``forward``, nn.MultiheadAttention's projections, a 2-D weight in a module the quantizer does not know, or
    (when convolutions are quantized) a convolution that is not 2-D — and all but the first two are also
    announced in one warning.

    A layer whose weight is shared with another module (an lm_head tied to the input embeddings) is kept
    unless ``quantize_tied=True``: quantizing it would silently untie the pair and store the matrix twice.
    Running it again on a quantized model changes nothing.

    ``method`` chooses each layer's scales: ``"absmax"`` (default, the seed's) or ``"mse"`` (per-row clipping
    search, see `quant`); it is passed to ``from_float`` only when it is not the default, so a ``target_class``
    with the seed's one-argument ``from_linear`` keeps working.
    """
    quant._check_method(method)
    targets: list[QuantizedClass] = list(target_class) if isinstance(target_class, Sequence) else [target_class]
    if not targets:
        raise ValueError("quantize_model needs at least one quantized class, e.g. W8A16LinearLayer")
    if isinstance(exclude, str):
        exclude = [exclude]
    patterns = list(exclude)
    kinds = list(dict.fromkeys(t.float_kind for t in targets))
    report = QuantizationReport(bytes_before=footprint_bytes(model), replaced_by_kind=dict.fromkeys(kinds, 0))
    tied = _tied_weights(model)
    modules = dict(model.named_modules())

    def target_for(module: nn.Module) -> QuantizedClass | None:
        return next((t for t in targets if t.replaces(module)), None)

    candidates = [name for name, m in modules.items() if target_for(m) or _already_quantized(m, targets)]
    for pattern in patterns:
        if not any(_matches(name, pattern) for name in candidates):
            warnings.warn(f"Quantizer: exclusion pattern {pattern!r} matches no {' or '.join(kinds)} layer",
                          stacklevel=3)
    if not candidates:
        what = " or ".join(t.float_modules for t in targets)
        warnings.warn(f"Quantizer: the model has no {what} layer to quantize", stacklevel=3)

    unsupported: list[str] = []  # kept for a reason the user did not choose: announced in one warning
    for name, module in modules.items():
        if isinstance(module, _QUANTIZED):
            continue
        target = target_for(module)
        if target is None:
            others = _other_matrices(name, module, kinds)
            report.kept.update(others)
            unsupported += others
            continue
        hit = next((p for p in patterns if _matches(name, p)), None)
        if hit is not None:
            report.kept[name] = f"excluded by {hit!r}"
            continue
        why = _cannot_replace(name, module, modules.get(name.rpartition(".")[0]), target)
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
            new = target.from_float(module) if method == "absmax" else target.from_float(module, method=method)
        except ValueError as err:
            raise ValueError(f"cannot quantize layer {name!r}: {err}") from err
        _set_submodule(model, name, new)
        report.replaced.append(name)
        report.replaced_by_kind[target.float_kind] += 1

    if unsupported:
        first = unsupported[0]
        what = "Linear-like weight(s)" if kinds == ["Linear"] else "weight(s)"
        warnings.warn(
            f"Quantizer: kept {len(unsupported)} {what} in full precision that it cannot replace, "
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
    target_class: Targets = W8A16LinearLayer,
    module_name_to_exclude: Iterable[str] = (),
    *,
    quantize_tied: bool = False,
    method: str = "absmax",
    report: Callable[[QuantizationReport], None] | None = None,
) -> nn.Module:
    """Quantize ``model`` in place and return it (the seed's call; ``target_class`` may be a list, as in
    `quantize_model`).

    The `QuantizationReport` is kept on the model as ``model.w8a16_report`` and, if ``report`` is given
    (``report=print``), handed to it. ``method`` is `quantize_model`'s.
    """
    result = quantize_model(model, target_class, module_name_to_exclude, quantize_tied=quantize_tied, method=method)
    model.w8a16_report = result
    if report is not None:
        report(result)
    return model
