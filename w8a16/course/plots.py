"""Figures for the notebooks: each one shows a single idea about int8 quantization.

The notebooks keep their cells short by calling these helpers; the helpers only draw what they are given or
what the functional core (`quant.py`) computes, so a figure always shows numbers the notebook measured.

Conventions: matplotlib only. A helper that draws one panel takes an optional ``ax`` and returns the `Axes`
it drew on (``ax.figure`` is the figure); a helper that draws several panels returns the `Figure`. Nothing
here calls ``plt.show()``: the notebook cell does, so the figure appears exactly once.
"""

from __future__ import annotations

import io
import math
from typing import Any, Callable, Mapping, Sequence

import matplotlib.pyplot as plt
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import NullFormatter

from .. import quant

_SCHEME_COLORS = {"per-tensor": "tab:red", "per-channel": "tab:blue", "per-group": "tab:green"}

# Legibility in JupyterLab: an output image is shown at most ~850 px wide (1280 px window, file browser open) and
# the inline backend draws at 100 dpi, so a figure wider than ~8.5 in is shrunk. Figures here stay at most
# `MAX_WIDTH` inches wide and legends use `LEGEND_FONTSIZE` points, so legend text stays ~8 px high on screen.
MAX_WIDTH = 10.5
LEGEND_FONTSIZE = 9


def _np(x: Any):
    """A float64 numpy array from a tensor, list or number (bf16 has no numpy dtype)."""
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float64).cpu().numpy()
    return torch.as_tensor(x, dtype=torch.float64).numpy()


def _axes(ax: Axes | None, figsize: tuple[float, float]) -> Axes:
    if ax is None:
        _, ax = plt.subplots(figsize=figsize, layout="constrained")
    return ax


def _finish(ax: Axes, xlabel: str, ylabel: str, title: str | None) -> Axes:
    """Axis labels, a small legend and the optional title that every scatter/line plot here ends with."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=LEGEND_FONTSIZE)
    if title:
        ax.set_title(title)
    return ax

def _color(label: str, i: int) -> str:
    return _SCHEME_COLORS.get(label, f"C{i}")


# --------------------------------------------------------------------------------------------- matrices


def plot_matrix(
    m: torch.Tensor,
    ax: Axes | None = None,
    title: str | None = None,
    fmt: str = "{:.2f}",
    cmap: str = "RdBu_r",
    symmetric: bool = True,
    annotate: bool | None = None,
    colorbar: bool = False,
    fontsize: float = 11,
) -> Axes:
    """A heatmap of a small matrix with each value written in its cell.

    Why: quantization is easiest to follow on a matrix small enough to read every number, so the same
    cells can be compared across W, W/scale, round(W/scale) and the error. ``symmetric`` centres the colour
    map on zero (weights and errors have both signs). Values are annotated when the matrix has at most 16×16
    entries, unless ``annotate`` says otherwise, in ``fontsize`` points: 11 pt is about 11 px high in the inline
    PNG (100 dpi), so it stays legible in JupyterLab as long as the figure is drawn at most ~10 inches wide.
    """
    a = _np(m)
    if a.ndim == 1:
        a = a[None, :]
    ax = _axes(ax, (0.6 * a.shape[1] + 1, 0.5 * a.shape[0] + 1))
    vmax = float(abs(a).max()) or 1.0
    kwargs = {"vmin": -vmax, "vmax": vmax} if symmetric else {}
    image = ax.imshow(a, cmap=cmap, aspect="auto", **kwargs)
    if annotate is None:
        annotate = a.shape[0] <= 16 and a.shape[1] <= 16
    if annotate:
        for (i, j), v in _ndenumerate(a):
            dark = symmetric and abs(v) > 0.6 * vmax
            ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=fontsize,
                    color="white" if dark else "black")
    if a.shape[1] <= 16:
        ax.set_xticks(range(a.shape[1]))
    if a.shape[0] <= 16:
        ax.set_yticks(range(a.shape[0]))
    ax.set_xlabel("input (column)")
    ax.set_ylabel("output (row)")
    if title:
        ax.set_title(title)
    if colorbar:
        ax.figure.colorbar(image, ax=ax)
    return ax


def _ndenumerate(a):
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            yield (i, j), float(a[i, j])


def plot_quantization_steps(weights: torch.Tensor, scales: torch.Tensor) -> Figure:
    """Five heatmaps in reading order: W, W/scale, q = round(W/scale) (int8), then q·scale and the error W − q·scale.

    Why: absmax quantization is three one-line steps (divide, round, multiply back); seeing them side by side
    shows where the error comes from — only the rounding step loses information. ``scales`` may be per-tensor,
    per-channel or per-group (anything `quant.expand_scales` accepts).

    Layout: the three steps on top, the result and what it lost centred below, in a figure about 10 inches wide
    — JupyterLab shows it at nearly its own size, so the numbers written in the cells stay legible (one row of
    five panels had to be 16 inches wide and was shrunk to half size on screen). The error is written in units
    of a power of ten (named in the panel's title) so that every cell needs only a few characters.
    """
    w = weights.detach().float()
    s = quant.expand_scales(scales.detach().float(), w.shape)
    q = quant.quantize(w, scales)
    w_hat = quant.dequantize(q, scales)
    err = w - w_hat
    exponent = math.floor(math.log10(float(err.abs().max()))) if bool((err != 0).any()) else 0
    err_title = "error  W − q · scale" + (f"  (×$10^{{{exponent}}}$)" if exponent else "")
    panels = [
        (w, "W", "{:.2f}"),
        (w / torch.where(s == 0, torch.ones_like(s), s), "W / scale", "{:.1f}"),
        (q, "q = round(W / scale)  (int8)", "{:.0f}"),
        (w_hat, "dequantized  q · scale", "{:.2f}"),
        (err / 10.0**exponent, err_title, "{:.1f}"),
    ]
    rows, cols = (w.shape[0], w.shape[1]) if w.dim() == 2 else (1, w.numel())
    fontsize = 10.5 if cols <= 6 else 8.5  # wider matrices have narrower cells
    panel_height = 0.42 * rows + 0.9
    fig = plt.figure(figsize=(MAX_WIDTH, 2 * panel_height + 0.3), layout="constrained")
    grid = fig.add_gridspec(2, 6)
    slots = [grid[0, 0:2], grid[0, 2:4], grid[0, 4:6], grid[1, 1:3], grid[1, 3:5]]  # 3 on top, 2 centred below
    axes = [fig.add_subplot(slot) for slot in slots]
    for ax, (m, title, fmt) in zip(axes, panels):
        plot_matrix(m, ax=ax, title=title, fmt=fmt, fontsize=fontsize)
        ax.set_ylabel("")
        ax.set_xlabel("")
    for ax in (axes[0], axes[3]):
        ax.set_ylabel("output (row)")
    return fig


def plot_scale_comparison(weights: torch.Tensor, group_size: int) -> Figure:
    """Per-tensor vs per-channel vs per-group: the scale each weight gets (top) and its |error| (bottom).

    Why: the three schemes differ only in which block of weights shares a scale. The top row makes the
    blocks visible (one colour, one stripe per row, one tile per group); the bottom row shows that a smaller
    block — a scale that fits its weights more tightly — gives a smaller rounding error. Colours are shared
    across each row of panels so the panels can be compared directly.
    """
    w = weights.detach().float()
    schemes = {
        "per-tensor": quant.per_tensor_scale(w),
        "per-channel": quant.per_channel_scales(w),
        f"per-group (g={group_size})": quant.per_group_scales(w, group_size),
    }
    expanded = {k: quant.expand_scales(s, w.shape) for k, s in schemes.items()}
    errors = {k: (w - quant.dequantize(quant.quantize(w, s), s)).abs() for k, s in schemes.items()}
    smax = max(float(e.max()) for e in expanded.values()) or 1.0
    emax = max(float(e.max()) for e in errors.values()) or 1.0
    rows, cols = w.shape
    fig, axes = plt.subplots(2, 3, figsize=(MAX_WIDTH, min(0.3 * rows, 4) * 2 + 2.2), layout="constrained",
                             sharex=True)
    for col, name in enumerate(schemes):
        top, bottom = axes[0, col], axes[1, col]
        im_s = top.imshow(_np(expanded[name]), cmap="viridis", vmin=0, vmax=smax, aspect="auto")
        top.set_title(f"{name}: {schemes[name].numel()} scale(s)")
        im_e = bottom.imshow(_np(errors[name]), cmap="magma", vmin=0, vmax=emax, aspect="auto")
        rms = errors[name].pow(2).mean().sqrt().item()
        bottom.set_title(f"|error|, RMS {rms:.2g}")
        bottom.set_xlabel("input (column)")
        for ax in (top, bottom):
            if cols <= 16:
                ax.set_xticks(range(cols))
            if rows <= 16:
                ax.set_yticks(range(rows))
    axes[0, 0].set_ylabel("scale\noutput (row)")
    axes[1, 0].set_ylabel("|W − Ŵ|\noutput (row)")
    fig.colorbar(im_s, ax=axes[0, :].tolist(), label="scale")
    fig.colorbar(im_e, ax=axes[1, :].tolist(), label="|error|")
    return fig


# ------------------------------------------------------------------------------------------- rows, grid


def plot_row_errors(
    errors: Mapping[str, Sequence[float] | torch.Tensor],
    ax: Axes | None = None,
    log: bool = True,
    ylabel: str = "relative error  ‖w − ŵ‖ / ‖w‖",
) -> Axes:
    """Grouped bars: one group per row of a matrix, one bar per scheme (e.g. per-tensor, per-channel).

    Why: the case for per-channel scales is a per-row story — one row with an outlier inflates a shared scale
    and every *other* row pays for it. A log axis keeps rows whose errors differ by orders of magnitude
    readable.
    """
    names = list(errors)
    values = [_np(errors[n]).ravel() for n in names]
    n_rows = len(values[0])
    ax = _axes(ax, (max(6.0, 0.5 * n_rows + 2), 3.2))
    width = 0.8 / len(names)
    for i, (name, v) in enumerate(zip(names, values)):
        xs = [r + (i - (len(names) - 1) / 2) * width for r in range(n_rows)]
        ax.bar(xs, v, width=width, label=name, color=_color(name, i))
    ax.set_xticks(range(n_rows))
    ax.set_xlabel("row")
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.legend(loc="best")
    return ax


def plot_int8_grid(
    row: torch.Tensor,
    scale: float | torch.Tensor,
    ax: Axes | None = None,
    title: str | None = None,
    xlim: tuple[float, float] | None = None,
) -> Axes:
    """The values a row can take after quantization, and where its weights land on them.

    Why: an int8 row can only represent the 255 values ``q · scale`` for q in −127…127 — a ruler whose tick
    spacing is the scale. Thin grey ticks are that ruler, dots above are the original weights and each line
    drops to the grid point it rounds to. A large scale (e.g. a per-tensor scale set by another row's outlier)
    means coarse ticks, and many different weights collapse onto the same few codes. The legend counts how
    many of the 255 codes the row actually uses.
    """
    w = row.detach().float().ravel()
    s = float(scale)
    ax = _axes(ax, (10, 2.4))
    q = quant.quantize(w[None, :], torch.tensor(s)).ravel()
    w_hat = q.float() * s
    lo, hi = xlim if xlim is not None else (-1.05 * 127 * s, 1.05 * 127 * s) if s > 0 else (-1, 1)
    if s > 0:
        k_lo, k_hi = max(-127, math.ceil(lo / s)), min(127, math.floor(hi / s))
        ticks = [k * s for k in range(k_lo, k_hi + 1)]
        ax.vlines(ticks, 0, 0.25, color="0.6", linewidth=0.6, label=f"int8 grid (step = scale = {s:.3g})")
    for x, y in zip(_np(w), _np(w_hat)):
        ax.plot([x, y], [1, 0.25], color="tab:blue", linewidth=0.6, alpha=0.6)
    ax.plot(_np(w), [1] * len(w), "o", color="tab:blue", markersize=4, label="weights")
    used = int(torch.unique(q).numel())
    ax.plot(_np(w_hat), [0.25] * len(w), "|", color="tab:orange", markersize=14, markeredgewidth=2,
            label=f"codes used: {used} of 255")
    ax.set_xlim(lo, hi)
    ax.set_ylim(-0.1, 1.3)
    ax.set_yticks([])
    ax.set_xlabel("value")
    ax.legend(loc="upper right", fontsize=LEGEND_FONTSIZE, ncols=3)
    if title:
        ax.set_title(title)
    return ax


def plot_row_quantization(
    row: torch.Tensor, dequantized: Mapping[str, torch.Tensor], title: str | None = None
) -> Figure:
    """One row of weights and its dequantized values under several schemes (top), and each weight's error (bottom).

    Why: it puts the schemes on the same row so the learner sees *which* weights each scheme gets wrong: with
    an outlier in the row, a per-channel scale flattens the small weights towards the grid points near zero,
    while per-group scales only coarsen the group that holds the outlier. An outlier much larger than the
    other weights would squash the top panel, so the panel is zoomed on the other weights and the outlier is
    marked at the edge with its value. The legend gives each scheme's RMS error on this row.
    """
    w = row.detach().float().ravel()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 5), sharex=True, layout="constrained")
    xs = list(range(len(w)))
    magnitudes = w.abs().sort(descending=True).values
    clip = None
    if len(w) > 1 and magnitudes[1] > 0 and magnitudes[0] > 4 * magnitudes[1]:
        clip = 1.6 * magnitudes[1].item()
    shown = w.clamp(-clip, clip) if clip else w
    top.plot(xs, _np(shown), "o", color="black", markersize=6, label="original", zorder=3)
    n = len(dequantized)
    for i, (name, w_hat) in enumerate(dequantized.items()):
        w_hat = w_hat.detach().float().ravel()
        color = _color(name.split(" ")[0], i)
        offset = (i - (n - 1) / 2) * 0.15
        err = w - w_hat
        rms = err.pow(2).mean().sqrt().item()
        top.plot([x + offset for x in xs], _np(w_hat.clamp(-clip, clip) if clip else w_hat), "s", markersize=4,
                 color=color, label=f"{name}: RMS error {rms:.2g}")
        bottom.bar([x + offset for x in xs], _np(err), width=0.8 / n, color=color, label=name)
    if clip:
        for x in (w.abs() > clip).nonzero().ravel().tolist():
            top.annotate(f"outlier {w[x].item():.3g}\n(off the chart)", (x, float(shown[x])), fontsize=9,
                         xytext=(8, -22 if w[x] > 0 else 8), textcoords="offset points")
        top.set_ylim(-1.15 * clip, 1.15 * clip)
    top.axhline(0, color="0.8", linewidth=0.8, zorder=0)
    bottom.axhline(0, color="0.5", linewidth=0.8)
    top.set_ylabel("weight")
    bottom.set_ylabel("error  w − ŵ")
    bottom.set_xlabel("input (column)")
    if len(w) <= 32:
        bottom.set_xticks(xs)
    top.legend(fontsize=LEGEND_FONTSIZE, loc="best")
    if title:
        top.set_title(title)
    return fig


def plot_row_schemes(weights: torch.Tensor, row: int, group_size: int) -> Figure:
    """`plot_row_quantization` of one row of ``weights`` under per-tensor, per-channel and per-group scales.

    Why: the three schemes compared on the weights of one row, with every scale computed from the whole
    matrix exactly as `quant.py` does — the figure the notebook's row/group-size widget redraws.
    """
    w = weights.detach().float()
    schemes = {
        "per-tensor": quant.per_tensor_scale(w),
        "per-channel": quant.per_channel_scales(w),
        f"per-group (g={group_size})": quant.per_group_scales(w, group_size),
    }
    dequantized = {name: quant.dequantize(quant.quantize(w, s), s)[row] for name, s in schemes.items()}
    return plot_row_quantization(w[row], dequantized, title=f"row {row}: original vs dequantized")


# ---------------------------------------------------------------------------------------------- errors


def plot_error_histogram(
    errors: torch.Tensor | Mapping[str, torch.Tensor],
    ax: Axes | None = None,
    bins: int = 60,
    bound: float | None = None,
    uniform: bool = False,
    xlabel: str = "error  W − Ŵ",
    title: str | None = None,
    log: bool = False,
) -> Axes:
    """Histogram(s) of quantization errors; several labelled tensors are overlaid.

    Why: rounding moves each weight by at most half a grid step, and for weights spread over many steps the
    error is equally likely anywhere in between. Plotting ``error / scale`` with ``bound=0.5`` draws the
    ±½-step limits, and ``uniform=True`` adds the flat line a uniform distribution on [−bound, bound] would
    give, so the learner can see the histogram fill the box.
    """
    series = dict(errors) if isinstance(errors, Mapping) else {"": errors}
    ax = _axes(ax, (7, 3.2))
    arrays = {k: _np(v).ravel() for k, v in series.items()}
    lo = min(float(a.min()) for a in arrays.values())
    hi = max(float(a.max()) for a in arrays.values())
    if bound is not None:
        lo, hi = min(lo, -bound), max(hi, bound)
    edges = torch.linspace(lo, hi, bins + 1).tolist()
    for i, (label, a) in enumerate(arrays.items()):
        kwargs = {"label": label} if label else {}
        ax.hist(a, bins=edges, color=_color(label, i), alpha=0.6 if len(arrays) > 1 else 0.85, **kwargs)
    if bound is not None:
        for x in (-bound, bound):
            ax.axvline(x, color="black", linestyle="--", linewidth=1)
        if uniform:
            width = edges[1] - edges[0]
            n = max(len(a) for a in arrays.values())
            ax.hlines(n * width / (2 * bound), -bound, bound, color="black", linewidth=1.5,
                      label=f"uniform on [−{bound:g}, {bound:g}]")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 3))
    if log:
        ax.set_yscale("log")
    if len(arrays) > 1 or (bound is not None and uniform):
        ax.legend(fontsize=LEGEND_FONTSIZE)
    if title:
        ax.set_title(title)
    return ax


def plot_row_error_vs_size(
    row_sizes: Sequence[float] | torch.Tensor,
    errors: Mapping[str, Sequence[float] | torch.Tensor],
    ax: Axes | None = None,
    xlabel: str = "row size  (RMS of the row's weights)",
    ylabel: str = "relative error of the row",
    title: str | None = None,
) -> Axes:
    """Log–log scatter of each row's relative error against the row's size, one colour per scheme.

    Why: with one scale for the whole tensor every row gets the same step, so the *absolute* error is about the
    same everywhere and the *relative* error of a row falls as the row gets larger (slope −1). A per-channel
    scale grows with its row, so every row keeps about the same relative error — a flat cloud.
    """
    x = _np(row_sizes).ravel()
    ax = _axes(ax, (5, 3.8))
    for i, (name, e) in enumerate(errors.items()):
        ax.plot(x, _np(e).ravel(), "o", markersize=3, alpha=0.6, color=_color(name, i), label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # log minor labels overlap on short axes
    ax.yaxis.set_minor_formatter(NullFormatter())
    return _finish(ax, xlabel, ylabel, title)


def plot_measured_vs_predicted(
    predicted: Sequence[float] | torch.Tensor,
    measured: Sequence[float] | torch.Tensor,
    ax: Axes | None = None,
    xlabel: str = "predicted RMS error  (scale / √12)",
    ylabel: str = "measured RMS error",
    title: str | None = None,
) -> Axes:
    """A scatter of measured against predicted values, with the line y = x.

    Why: a theory earns trust when its predictions land on the diagonal. Used for the rounding-noise rule
    RMS error ≈ step/√12, one dot per row.
    """
    p, m = _np(predicted).ravel(), _np(measured).ravel()
    ax = _axes(ax, (4.5, 4))
    ax.plot(p, m, "o", markersize=3, alpha=0.6, label="one row")
    lo, hi = float(min(p.min(), m.min())), float(max(p.max(), m.max()))
    ax.plot([lo, hi], [lo, hi], color="black", linewidth=1, label="y = x")
    return _finish(ax, xlabel, ylabel, title)


def plot_outlier_sweep(
    factors: Sequence[float],
    curves: Mapping[str, Sequence[float]],
    ax: Axes | None = None,
    xlabel: str = "outlier size  (× the row's largest normal weight)",
    ylabel: str = "RMS error of the other weights",
    title: str | None = None,
) -> Axes:
    """Log–log lines of an error against the size of an injected outlier; one line per labelled curve.

    Why: the absmax scale is set by the largest weight, so an outlier k times larger makes the grid k times
    coarser and the error of *every other weight in the row* grows with it — a straight line of slope 1 on a
    log–log plot, until the step is so coarse that the weights all round to zero and the error stops growing
    at the size of the weights themselves. The first curve (the measurement) is drawn with markers, the others
    (theory, limits) dashed.
    """
    ax = _axes(ax, (6, 3.8))
    for i, (label, ys) in enumerate(curves.items()):
        ax.plot(list(factors), _np(ys).ravel(), "o-" if i == 0 else "--", color=f"C{i}", label=label, markersize=4)
    ax.set_xscale("log")
    ax.set_yscale("log")
    return _finish(ax, xlabel, ylabel, title)


def plot_layer_errors(
    rows: Sequence[Mapping[str, Any]],
    key: str = "rel_fro",
    ax: Axes | None = None,
    log: bool = False,
    title: str | None = None,
) -> Axes:
    """One bar per Linear layer, in model order, coloured by the kind of layer (the last part of its name).

    Why: a whole model has dozens of Linear layers; a bar chart in model order shows at a glance whether
    quantization error is even across the network or concentrated in some kinds of layer (attention
    projections vs MLP, the first/last blocks, the LM head). ``rows`` are the dicts of
    `w8a16.analysis.layer_errors`; ``key`` picks the column (``rel_fro``, ``sqnr_db``, ``max_err_over_scale``…).
    """
    ax = _axes(ax, (min(MAX_WIDTH, max(7.0, 0.12 * len(rows) + 3)), 3.5))
    kinds: dict[str, str] = {}
    for row in rows:
        kinds.setdefault(str(row["name"]).rsplit(".", 1)[-1], f"C{len(kinds)}")
    colors = [kinds[str(r["name"]).rsplit(".", 1)[-1]] for r in rows]
    ax.bar(range(len(rows)), [float(r[key]) for r in rows], color=colors, width=0.85)
    ax.set_xlim(-1, len(rows))
    ax.set_xlabel("Linear layer, in model order")
    labels = {"rel_fro": "relative error ‖W − Ŵ‖ / ‖W‖", "sqnr_db": "SQNR (dB)",
              "max_err_over_scale": "max |error| / scale"}
    ax.set_ylabel(labels.get(key, key))
    if log:
        ax.set_yscale("log")
    else:
        ax.set_ylim(0, 1.2 * max([float(r[key]) for r in rows] + [0.0]) or 1.0)  # room for the legend
    handles = [Patch(color=color, label=kind) for kind, color in kinds.items()]
    ax.legend(handles=handles, fontsize=LEGEND_FONTSIZE, ncols=min(len(kinds), 5), loc="upper left")
    if title:
        ax.set_title(title)
    return ax


# --------------------------------------------------------------------------------------------- widgets


def figure_to_png(fig: Figure, dpi: int = 80) -> bytes:
    """Render a figure to PNG bytes and close it (so it is not also shown inline)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return buffer.getvalue()


def figure_widget(draw: Callable[..., Figure], **controls: Any):
    """An ipywidgets panel: the given controls above an image that ``draw(**values)`` redraws on every change.

    Why an image rather than ``interact``: ``interact`` prints its figure through an Output widget, which
    headless runners (nbconvert, nbval) record in different places, so a notebook using it cannot be checked
    by nbval. Here the cell's only output is the widget itself; the figure lives in the widget's state. Widgets
    need a live kernel (Colab, Binder, Jupyter) — on GitHub nothing is drawn, so notebooks show a static
    figure next to it.
    """
    import ipywidgets as widgets  # optional: only notebooks need it

    def values() -> dict[str, Any]:
        return {name: control.value for name, control in controls.items()}

    image = widgets.Image(value=figure_to_png(draw(**values())), format="png")

    def redraw(_change: Any) -> None:
        image.value = figure_to_png(draw(**values()))

    for control in controls.values():
        control.observe(redraw, names="value")
    return widgets.VBox([widgets.HBox(list(controls.values())), image])
