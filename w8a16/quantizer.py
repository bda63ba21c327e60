"""The model walker: swap every `nn.Linear` of a model for a quantized layer, in place.

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

from .layer import W8A16LinearLayer


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
    kept: dict[str, str] = field(default_factory=dict)  # name -> why it stayed in full precision
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


def quantize_model(
    model: nn.Module,
    target_class: type[W8A16LinearLayer] = W8A16LinearLayer,
    exclude: Iterable[str] = (),
    *,
    quantize_tied: bool = False,
) -> QuantizationReport:
    """Replace every `nn.Linear` of ``model`` (not excluded) with ``target_class.from_linear(linear)``.

    A Linear whose weight is shared with another module (an lm_head tied to the input embeddings) is kept
    unless ``quantize_tied=True``: quantizing it would silently untie the pair and store the matrix twice.
    Running it again on a quantized model changes nothing.
    """
    if isinstance(exclude, str):
        exclude = [exclude]
    patterns = list(exclude)
    report = QuantizationReport(bytes_before=footprint_bytes(model))
    tied = _tied_weights(model)
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    quantized = [name for name, m in model.named_modules() if isinstance(m, target_class)]

    for pattern in patterns:
        if not any(_matches(name, pattern) for name, _ in [*linears, *((q, None) for q in quantized)]):
            warnings.warn(f"Quantizer: exclusion pattern {pattern!r} matches no Linear layer", stacklevel=3)

    for name, linear in linears:
        hit = next((p for p in patterns if _matches(name, p)), None)
        if hit is not None:
            report.kept[name] = f"excluded by {hit!r}"
            continue
        shared = tied.get(id(linear.weight))
        if shared and not quantize_tied:
            others = [n for n in shared if n != f"{name}.weight"]
            why = f"weight is tied to {', '.join(others)}; pass quantize_tied=True to quantize it anyway"
            warnings.warn(f"Quantizer: kept {name}: {why}", stacklevel=3)
            report.kept[name] = why
            continue
        try:
            new = target_class.from_linear(linear)
        except ValueError as err:
            raise ValueError(f"cannot quantize layer {name!r}: {err}") from err
        _set_submodule(model, name, new)
        report.replaced.append(name)

    report.bytes_after = footprint_bytes(model)
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
    report: Callable[[QuantizationReport], None] | None = None,
) -> nn.Module:
    """Quantize ``model`` in place and return it (the seed's call).

    The `QuantizationReport` is kept on the model as ``model.w8a16_report`` and, if ``report`` is given
    (``report=print``), handed to it.
    """
    result = quantize_model(model, target_class, module_name_to_exclude, quantize_tied=quantize_tied)
    model.w8a16_report = result
    if report is not None:
        report(result)
    return model
