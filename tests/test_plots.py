"""Each plot helper runs on small inputs (Agg backend) and draws what it says; no image comparisons."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402

from w8a16 import quant
from w8a16.course import plots  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _w(rows=4, cols=8):
    return torch.randn(rows, cols)


def test_plot_matrix_annotates_every_cell():
    ax = plots.plot_matrix(_w(3, 5), title="W")
    assert len(ax.images) == 1
    assert len(ax.texts) == 15
    assert ax.get_title() == "W"


def test_plot_matrix_large_matrix_is_not_annotated():
    ax = plots.plot_matrix(torch.randn(20, 40))
    assert len(ax.texts) == 0


def test_plot_matrix_accepts_bf16_and_vectors():
    ax = plots.plot_matrix(torch.randn(6).to(torch.bfloat16))
    assert ax.images[0].get_array().shape == (1, 6)


def test_plot_quantization_steps_has_five_panels_in_order():
    w = _w()
    fig = plots.plot_quantization_steps(w, quant.per_tensor_scale(w))
    titles = [ax.get_title() for ax in fig.axes]
    assert len(titles) == 5
    assert titles[0] == "W" and titles[1] == "W / scale" and titles[2].startswith("q = round")
    assert titles[4].startswith("error")


def test_plot_quantization_steps_is_legible_at_notebook_width():
    # JupyterLab shows an output image at most ~850 px wide (1280 px window): a figure about 10 in wide (100 dpi
    # inline) is barely shrunk, so the numbers in the cells must be written at ≥ 10 pt to be ≥ 8 px on screen.
    w = torch.randn(4, 6)
    fig = plots.plot_quantization_steps(w, quant.per_tensor_scale(w))
    assert fig.get_figwidth() <= 10.5
    texts = [t for ax in fig.axes for t in ax.texts]
    assert len(texts) == 5 * 24 and min(t.get_fontsize() for t in texts) >= 10


def test_plot_quantization_steps_writes_the_error_in_a_named_power_of_ten():
    w = torch.tensor([[0.5, -0.25, 0.1], [1.0, 0.3, -0.7]])
    s = quant.per_tensor_scale(w)
    fig = plots.plot_quantization_steps(w, s)
    err = w - quant.dequantize(quant.quantize(w, s), s)
    exponent = int(torch.floor(torch.log10(err.abs().max())))
    assert fig.axes[4].get_title().endswith(f"(×$10^{{{exponent}}}$)")
    shown = [float(t.get_text()) for t in fig.axes[4].texts]
    assert shown == pytest.approx((err / 10.0**exponent).ravel().tolist(), abs=0.051)


def test_plot_quantization_steps_per_channel_and_zero_row():
    w = _w()
    w[1] = 0
    fig = plots.plot_quantization_steps(w, quant.per_channel_scales(w))
    assert all(torch.isfinite(torch.as_tensor(ax.images[0].get_array())).all() for ax in fig.axes)


def test_plot_scale_comparison_counts_scales():
    fig = plots.plot_scale_comparison(_w(4, 8), group_size=4)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert "per-tensor: 1 scale(s)" in titles
    assert "per-channel: 4 scale(s)" in titles
    assert "per-group (g=4): 8 scale(s)" in titles
    assert sum(t.startswith("|error|") for t in titles) == 3
    assert len(fig.axes) == 8  # 6 panels + 2 colour bars


def test_plot_row_errors_one_bar_per_row_and_scheme():
    ax = plots.plot_row_errors({"per-tensor": torch.rand(5) + 0.1, "per-channel": torch.rand(5) + 0.1})
    assert len(ax.patches) == 10
    assert ax.get_yscale() == "log"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["per-tensor", "per-channel"]


def test_plot_int8_grid_counts_codes_and_ticks():
    row = torch.tensor([0.5, -0.25, 0.1, 0.1, 1.27])
    scale = 0.01
    ax = plots.plot_int8_grid(row, scale, xlim=(-0.3, 0.6))
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    used = quant.quantize(row[None], torch.tensor(scale)).unique().numel()
    assert f"codes used: {used} of 255" in legend
    grid = [c for c in ax.collections if isinstance(c, LineCollection)][0]
    assert len(grid.get_segments()) == 30 + 60 + 1  # grid points from -0.30 to 0.60 in steps of 0.01


def test_plot_int8_grid_full_range_has_255_ticks():
    ax = plots.plot_int8_grid(torch.randn(16), 0.02)
    grid = [c for c in ax.collections if isinstance(c, LineCollection)][0]
    assert len(grid.get_segments()) == 255


def test_plot_int8_grid_zero_row():
    ax = plots.plot_int8_grid(torch.zeros(4), 0.0)
    assert "codes used: 1 of 255" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_plot_row_quantization_marks_an_outlier():
    row = 0.02 * torch.randn(8)
    row[3] = 1.0
    dq = {"per-channel": row.round(decimals=2), "per-group (g=4)": row.round(decimals=3)}
    fig = plots.plot_row_quantization(row, dq, title="row")
    top, bottom = fig.axes
    assert len(bottom.patches) == 16  # one error bar per weight and scheme
    assert any("outlier" in t.get_text() for t in top.texts)
    assert top.get_ylim()[1] < 1.0  # zoomed on the ordinary weights


def test_plot_row_schemes_three_schemes():
    fig = plots.plot_row_schemes(_w(3, 8), row=1, group_size=4)
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend[0] == "original"
    assert [label.split(":")[0] for label in legend[1:]] == ["per-tensor", "per-channel", "per-group (g=4)"]


def test_plot_error_histogram_bins_bounds_and_uniform_line():
    err = torch.rand(1000) - 0.5
    ax = plots.plot_error_histogram(err, bins=20, bound=0.5, uniform=True)
    assert len(ax.patches) == 20
    vertical = [line for line in ax.lines if line.get_xdata()[0] == line.get_xdata()[-1]]
    assert sorted(float(line.get_xdata()[0]) for line in vertical) == [-0.5, 0.5]
    assert "uniform on [−0.5, 0.5]" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_plot_error_histogram_overlays_series():
    ax = plots.plot_error_histogram({"per-tensor": torch.randn(100), "per-channel": torch.randn(100)}, bins=10, log=True)
    assert len(ax.patches) == 20
    assert ax.get_yscale() == "log"


def test_plot_row_error_vs_size_log_log_one_series_per_scheme():
    ax = plots.plot_row_error_vs_size(torch.rand(10) + 0.1, {"per-tensor": torch.rand(10) + 0.1, "per-channel": torch.rand(10) + 0.1})
    assert len(ax.lines) == 2
    assert ax.get_xscale() == ax.get_yscale() == "log"


def test_plot_measured_vs_predicted_has_diagonal():
    ax = plots.plot_measured_vs_predicted(torch.rand(10), torch.rand(10))
    assert [line.get_label() for line in ax.lines] == ["one row", "y = x"]


def test_plot_outlier_sweep_one_line_per_curve():
    ax = plots.plot_outlier_sweep([1, 10, 100], {"measured": [1, 10, 50], "theory": [1, 10, 100], "limit": [50] * 3})
    assert [line.get_label() for line in ax.lines] == ["measured", "theory", "limit"]
    assert ax.get_xscale() == "log"


def test_plot_layer_errors_one_bar_per_layer_coloured_by_kind():
    rows = [{"name": f"h.{i}.{kind}", "rel_fro": 0.01 + i * 1e-3} for i in range(3) for kind in ("qkv_proj", "fc_out")]
    rows.append({"name": "lm_head", "rel_fro": 0.02})
    ax = plots.plot_layer_errors(rows, title="layers")
    assert len(ax.patches) == 7
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["qkv_proj", "fc_out", "lm_head"]
    assert ax.get_title() == "layers"


def test_plot_layer_errors_other_columns():
    rows = [{"name": "a.fc", "sqnr_db": 42.0}, {"name": "b.fc", "sqnr_db": 41.0}]
    ax = plots.plot_layer_errors(rows, key="sqnr_db")
    assert ax.get_ylabel() == "SQNR (dB)"


def test_figure_to_png_closes_the_figure():
    fig, _ = plt.subplots()
    png = plots.figure_to_png(fig)
    assert png.startswith(b"\x89PNG")
    assert not plt.fignum_exists(fig.number)


def test_figure_widget_redraws_on_change():
    widgets = pytest.importorskip("ipywidgets")
    w = _w(3, 8)
    slider = widgets.IntSlider(value=0, min=0, max=2)
    panel = plots.figure_widget(lambda row: plots.plot_row_schemes(w, row, 4), row=slider)
    image = panel.children[1]
    first = bytes(image.value)
    assert first.startswith(b"\x89PNG")
    slider.value = 2
    assert bytes(image.value) != first
    assert plt.get_fignums() == []  # every drawn figure was closed


def test_figures_fit_the_notebook_width_with_legible_legends():
    # A figure wider than MAX_WIDTH inches is shrunk by JupyterLab, and its legend text with it.
    w = 0.02 * torch.randn(8, 16)
    rows = [{"name": f"h.{i // 4}.{['q', 'o', 'fc_in', 'fc_out'][i % 4]}", "rel_fro": 0.008} for i in range(81)]
    figures = [
        plots.plot_scale_comparison(w, group_size=4),
        plots.plot_layer_errors(rows).figure,
        plots.plot_int8_grid(w[0], quant.per_channel_scales(w)[0]).figure,
        plots.plot_row_schemes(w, row=1, group_size=4),
        plots.plot_error_histogram({"a": torch.randn(100), "b": torch.randn(100)}).figure,
    ]
    for fig in figures:
        assert fig.get_figwidth() <= plots.MAX_WIDTH
        for ax in fig.axes:
            legend = ax.get_legend()
            if legend is not None:
                assert min(t.get_fontsize() for t in legend.get_texts()) >= plots.LEGEND_FONTSIZE >= 9
