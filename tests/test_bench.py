"""w8a16.course.bench: rows have the documented columns, and the CLI's --quick mode runs (no timing assertions)."""

import subprocess
import sys

import pytest
import torch

from w8a16 import ops
from w8a16.course import bench


def test_layer_rows_columns_and_paths():
    rows = bench.layer_rows(
        dtypes=("bf16", "fp32"), ms=(1, 3), shapes=((64, 32),), repeats=1, rotate_bytes=1, third_party=False
    )
    assert {r["impl"] for r in rows} == {"dense", "seed-naive", "w8a16"}
    assert len(rows) == 2 * 2 * 3
    for r in rows:
        assert r["ms"] > 0 and r["vs_dense"] > 0 and r["weight_GBps"] > 0
    assert {r["path"] for r in rows if r["impl"] == "w8a16"} <= set(ops.PATHS)


def test_third_party_status_says_installed_or_not():
    assert set(bench.third_party_status().values()) <= {"installed", "not installed"}


def test_gpu_note_is_explicit():
    note = bench.gpu_note("cpu")
    assert "GPU" in note
    if not torch.cuda.is_available():
        assert note.startswith("No GPU was measured")


def test_format_table():
    text = bench.format_table([{"a": 1.23456, "b": "x"}], ["a", "b"])
    assert "1.23" in text and "x" in text


def test_cli_quick_runs():
    out = subprocess.run([sys.executable, "-m", "w8a16.bench", "--quick"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for needle in ("machine:", "GPU", "stream-read", "seed-naive", "w8a16", "tokens_per_s", "random weights",
                   "linear+conv2d", "vs_float"):
        assert needle in out.stdout


def test_decode_rows_compare_compiled_models_too():
    config = dict(bench.CODEGEN_TINY, n_layer=1)
    rows = bench.decode_rows(config, new_tokens=3, prompt_len=4, repeats=1, naive=False, compiled=True)
    by_impl = {r["impl"]: r for r in rows}
    assert set(by_impl) == {"dense", "w8a16", "dense (compiled)", "w8a16 (compiled)"}
    assert by_impl["dense (compiled)"]["vs_dense"] == 1.0 and by_impl["w8a16 (compiled)"]["tokens_per_s"] > 0
    assert by_impl["w8a16 (compiled)"]["MB"] == by_impl["w8a16"]["MB"] < by_impl["dense"]["MB"]


def test_detr_rows_compare_float_linear_only_and_linear_plus_conv2d():
    rows = bench.detr_rows(bench.DETR_TINY, image_hw=(64, 80), repeats=1)
    by_impl = {r["impl"]: r for r in rows}
    assert list(by_impl) == ["float", "linear-only", "linear+conv2d"]
    assert by_impl["float"]["vs_float"] == 1.0 and all(r["ms"] > 0 and r["dtype"] == "fp32" for r in rows)
    assert by_impl["linear+conv2d"]["MB"] < by_impl["linear-only"]["MB"] < by_impl["float"]["MB"]


def _row(dtype, m, impl, vs_dense, pct=float("nan"), path=""):
    return {"device": "cpu", "dtype": dtype, "in": 64, "out": 32, "M": m, "impl": impl, "path": path,
            "ms": 1.0 / vs_dense, "vs_dense": vs_dense, "weight_GBps": 1.0, "pct_stream": pct}


def test_summary_has_one_line_per_dtype_and_m_with_every_implementation():
    rows = [_row("bf16", 1, "dense", 1.0), _row("bf16", 1, "seed-naive", 0.2), _row("bf16", 1, "w8a16", 2.0, 81.0, "native"),
            _row("bf16", 1, "optimum-quanto", 1.5), _row("bf16", 16, "dense", 1.0), _row("bf16", 16, "w8a16", 0.8, 5.0, "native")]
    lines = bench.summary_rows(rows)
    assert [(line["dtype"], line["M"]) for line in lines] == [("bf16", 1), ("bf16", 16)]
    assert lines[0] == {"dtype": "bf16", "shape": "64x32", "M": 1, "dense_ms": 1.0, "seed-naive": 0.2, "w8a16": 2.0,
                        "path": "native", "pct_stream": 81.0, "optimum-quanto": 1.5}


def test_targets_are_checked_against_the_run():
    rows = [_row("bf16", 1, "dense", 1.0), _row("bf16", 1, "w8a16", 2.0, 79.0, "native"), _row("bf16", 1, "torchao", 2.5),
            _row("fp32", 64, "dense", 1.0), _row("fp32", 64, "w8a16", 0.95, 3.0, "tiled")]
    decode = [{"dtype": "bfloat16", "impl": "w8a16", "vs_dense": 1.9}, {"dtype": "bfloat16", "impl": "w8a16 (compiled)", "vs_dense": 1.4}]
    met = {c["target"]: c["met"] for c in bench.target_rows(rows, decode)}
    assert met == {
        "bf16 64x32 M=1: % of stream bandwidth": "NO", "bf16 64x32 M=1: vs dense": "yes",
        "bf16 64x32 M=1: ours / torchao": "NO", "fp32 64x32 M=64: vs dense": "yes",
        "decode w8a16 vs dense": "yes", "decode w8a16 (compiled) vs dense (compiled)": "NO",
    }


def test_stream_read_is_measured_alongside_the_layers():
    rows = bench.layer_rows(dtypes=("fp32",), ms=(1,), shapes=((64, 32),), repeats=1, rotate_bytes=1,
                            third_party=False, measure_stream=True)
    assert {r["impl"] for r in rows} == {"dense", "seed-naive", "w8a16"}  # the stream read is not a row
    for r in rows:
        assert r["stream_GBps"] > 0 and abs(r["pct_stream"] - 100 * r["weight_GBps"] / r["stream_GBps"]) < 1e-9


@pytest.mark.parametrize("scrub", [False, True])
def test_scrub_clears_the_caches_then_primes_each_candidate(monkeypatch, scrub):
    """With ``scrub``, every timed call follows the 64 MiB read and one untimed call of the same candidate."""
    seen = {}
    real_compare = bench.compare

    def spy(cands, **kwargs):
        seen.update(kwargs)
        return real_compare(cands, **kwargs)

    monkeypatch.setattr(bench, "compare", spy)
    bench.layer_rows(dtypes=("fp32",), ms=(1,), shapes=((64, 32),), repeats=1, rotate_bytes=1, third_party=False,
                     scrub=scrub)
    assert seen["prime"] is scrub and (seen["between"] is not None) is scrub
