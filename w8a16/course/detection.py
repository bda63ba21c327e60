"""DETR helpers for notebook 04: turn raw outputs into boxes, draw them, compare two runs, count parameters by type.

DETR predicts a fixed set of ``num_queries`` boxes. For each query it gives ``logits`` over ``num_labels + 1``
classes (the last one is "no object") and ``pred_boxes`` as (centre x, centre y, width, height), normalised to
the image size. `postprocess` keeps the queries whose best real class is confident enough.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn


@dataclass(frozen=True)
class Detection:
    """One detected object: class id, its name, the probability, and a box in pixels (x0, y0, x1, y1)."""

    label: int
    name: str
    score: float
    box: tuple[float, float, float, float]

    def __str__(self) -> str:
        x0, y0, x1, y1 = self.box
        return f"{self.name:<14} p={self.score:.3f}  box=({x0:.0f}, {y0:.0f}, {x1:.0f}, {y1:.0f})"


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(centre x, centre y, w, h) -> (x0, y0, x1, y1), same units."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def postprocess(
    outputs: Any,
    image_size: tuple[int, int],
    id2label: Mapping[int, str],
    threshold: float = 0.7,
    top_k: int | None = None,
) -> list[Detection]:
    """Detections of one image from DETR ``outputs`` (``.logits`` ``(1, Q, C+1)``, ``.pred_boxes`` ``(1, Q, 4)``).

    ``image_size`` is ``(width, height)`` in pixels (PIL's ``image.size``). Queries whose best real class has
    probability ≥ ``threshold`` are kept; with ``top_k``, the ``top_k`` most confident queries are kept instead,
    whatever their probability (useful to draw *something* for a random-weight model). Sorted by score.
    """
    probs = outputs.logits[0].float().softmax(-1)[:, :-1]  # drop "no object"
    scores, labels = probs.max(-1)
    if top_k is not None:
        keep = scores.argsort(descending=True)[:top_k]
    else:
        keep = (scores >= threshold).nonzero().flatten()
        keep = keep[scores[keep].argsort(descending=True)]
    width, height = image_size
    boxes = cxcywh_to_xyxy(outputs.pred_boxes[0].float()) * torch.tensor([width, height, width, height])
    return [
        Detection(int(labels[i]), id2label.get(int(labels[i]), str(int(labels[i]))), float(scores[i]), tuple(boxes[i].tolist()))
        for i in keep.tolist()
    ]


def draw_detections(ax: Any, image: Any, detections: list[Detection], title: str = "", color: str = "lime") -> None:
    """Show ``image`` on the matplotlib axes ``ax`` with a labelled rectangle per detection."""
    from matplotlib.patches import Rectangle

    ax.imshow(image)
    for det in detections:
        x0, y0, x1, y1 = det.box
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=color, linewidth=2))
        ax.text(x0, y0, f"{det.name} {det.score:.2f}", color="black", fontsize=9, va="bottom",
                bbox={"facecolor": color, "alpha": 0.7, "pad": 1, "edgecolor": "none"})
    ax.set_title(title, fontsize=10)
    ax.axis("off")


@dataclass(frozen=True)
class OutputDifference:
    """How far a second DETR run (e.g. quantized) is from a first (the float model), on the same image."""

    logits_max_abs: float  # largest |Δ logit|
    logits_rel: float  # ||Δ logits||_F / ||logits||_F
    boxes_max_abs: float  # largest |Δ| of a box coordinate, as a fraction of the image size
    boxes_max_pixels: float  # the same in pixels of the longer image side
    same_top_class: float  # fraction of queries whose most likely class (incl. "no object") is unchanged
    distinct_top_classes: int = 0  # how many different top classes the first run's queries pick

    def __str__(self) -> str:
        text = (
            f"logits: max|Δ|={self.logits_max_abs:.3g}, relative={self.logits_rel:.3%}; "
            f"boxes: max|Δ|={self.boxes_max_abs:.3g} of the image (≈{self.boxes_max_pixels:.2f} px); "
            f"same top class on {self.same_top_class:.0%} of queries"
        )
        if self.distinct_top_classes == 1:  # e.g. random weights: the queries are copies of one another
            text += " (but every query picks the same class, so that is one decision counted many times)"
        return text


def output_difference(a: Any, b: Any, image_size: tuple[int, int]) -> OutputDifference:
    """Compare two DETR outputs for the same image (``image_size`` = (width, height))."""
    la, lb = a.logits.float(), b.logits.float()
    ba, bb = a.pred_boxes.float(), b.pred_boxes.float()
    box_err = (bb - ba).abs().max().item()
    return OutputDifference(
        logits_max_abs=(lb - la).abs().max().item(),
        logits_rel=((lb - la).norm() / la.norm()).item(),
        boxes_max_abs=box_err,
        boxes_max_pixels=box_err * max(image_size),
        same_top_class=(la.argmax(-1) == lb.argmax(-1)).float().mean().item(),
        distinct_top_classes=la.argmax(-1).unique().numel(),
    )


def logits_change(a: Any, b: Any) -> float:
    """``||b.logits - a.logits|| / ||a.logits||``: how far a second run's logits are from the first's."""
    la, lb = a.logits.float(), b.logits.float()
    return ((lb - la).norm() / la.norm()).item()


def query_spread(outputs: Any) -> float:
    """How different the queries' logits are from one another, relative to their size:
    ``||logits - mean over queries|| / ||logits||``. Near 0 means the queries are copies (random weights)."""
    logits = outputs.logits[0].float()
    return ((logits - logits.mean(0)).norm() / logits.norm()).item()


def response_change(a: Any, a_moved: Any, b: Any, b_moved: Any) -> float:
    """How much a second model's response to an input change differs from the first model's, relative to it.

    ``a``/``a_moved``: the first model (e.g. fp32) on an image and on a changed image (e.g. mirrored); ``b``/
    ``b_moved``: the second (quantized) model on the same two. 0 means the quantized model reacts to the change
    exactly as the float one; 1 means its reaction is as wrong as not reacting at all. Unlike `logits_change`,
    this measures the part of the output that depends on the image, which is what a detector is for.
    """
    response_a = a_moved.logits.float() - a.logits.float()
    response_b = b_moved.logits.float() - b.logits.float()
    return ((response_b - response_a).norm() / response_a.norm()).item()


def params_by_module_type(model: nn.Module, buffers: bool = False) -> dict[str, int]:
    """Number of parameters held directly by each module type (``Conv2d``, ``Linear``, ...), largest first.

    Each module counts only its own tensors (``recurse=False``), so nothing is counted twice. With
    ``buffers=True`` buffers are counted as well (DETR's frozen batch norms keep their statistics in buffers).
    """
    counts: dict[str, int] = defaultdict(int)
    seen: set[int] = set()
    for module in model.modules():
        tensors = list(module.parameters(recurse=False))
        if buffers:
            tensors += [b for b in module.buffers(recurse=False) if b is not None]
        for t in tensors:
            if id(t) not in seen:
                seen.add(id(t))
                counts[type(module).__name__] += t.numel()
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def plot_params_by_type(ax: Any, counts: Mapping[str, int], highlight: str = "Linear", top: int = 6) -> None:
    """Horizontal bars of parameter counts (millions) per module type; the first ``top`` types, the rest summed."""
    items = list(counts.items())
    if len(items) > top:
        items = items[:top] + [("other", sum(n for _, n in items[top:]))]
    total = sum(n for _, n in items)
    names = [name for name, _ in items][::-1]
    values = [n / 1e6 for _, n in items][::-1]
    colors = ["tab:orange" if name == highlight else "tab:blue" for name in names]
    bars = ax.barh(names, values, color=colors)
    for bar, value in zip(bars, values):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {value:.1f} M ({value * 1e6 / total:.0%})",
                va="center", fontsize=9)
    ax.set_xlabel("parameters (millions)")
    ax.set_xlim(0, max(values) * 1.35)


def bytes_by_module_type(model: nn.Module) -> dict[str, int]:
    """Bytes of parameters *and* buffers held directly by each module type, largest first (each tensor once)."""
    counts: dict[str, int] = defaultdict(int)
    seen: set[int] = set()
    for module in model.modules():
        for t in [*module.parameters(recurse=False), *(b for b in module.buffers(recurse=False) if b is not None)]:
            if id(t) not in seen:
                seen.add(id(t))
                counts[type(module).__name__] += t.numel() * t.element_size()
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))
