"""ops/native.py: building, caching and loading the C kernel where things go wrong, and every SIMD variant's numbers.

The build tests compile into temp dirs of their own (never the real cache). Tests that must start from a fresh
interpreter — a damaged cache is loaded by a new process, not the one that built it — run a short script in a
subprocess; the rest reset `native._state` and point the cache at ``tmp_path``.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from w8a16 import ops
from w8a16.ops import native

PACKAGE_PARENT = str(Path(native.__file__).resolve().parents[1])  # the w8a16 under test, for subprocesses
GCC = shutil.which("gcc") or shutil.which("cc")
needs_compiler = pytest.mark.skipif(GCC is None, reason="no C compiler here")

# Builds the kernel in a fresh interpreter (TMPDIR as given), checks a small product against fp64, prints info().
CHECK_SCRIPT = """
import json, sys, torch
from w8a16.ops import native, w8a16_linear

torch.manual_seed(0)
w = torch.randint(-127, 128, (37, 100), dtype=torch.int8)
s, b = torch.rand(37) / 50, torch.randn(37)
ok = True
for m in (1, 3):
    x = torch.randn(m, 100)
    ref = x.double() @ (w.double() * s.double()[:, None]).T + b.double()
    outs = [w8a16_linear(x, w, s, b)] + ([native.gemv(x, w, s, b)] if native.library() is not None else [])
    ok = ok and all(torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-5) for y in outs)
print(json.dumps({"ok": ok, "info": native.info()}))
"""


def run_python(code: str, tmpdir: Path, **env: str) -> dict:
    """Run ``code`` in a new interpreter with TMPDIR=``tmpdir``; the JSON it prints last."""
    environ = {k: v for k, v in os.environ.items() if k not in ("W8A16_NATIVE", "W8A16_NATIVE_SIMD", "CC")}
    python_path = os.pathsep.join(filter(None, [PACKAGE_PARENT, os.environ.get("PYTHONPATH")]))
    environ.update(TMPDIR=str(tmpdir), PYTHONPATH=python_path)
    environ.update(env)
    done = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"exit {done.returncode} (a negative one is a signal)\n{done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def cache_files(tmpdir: Path) -> tuple[Path, Path]:
    """The one library built under ``tmpdir`` and its sidecar record."""
    (library,) = (tmpdir / f"w8a16-native-{os.getuid()}").glob("gemv-*.so")
    return library, library.with_suffix(".json")


@pytest.fixture
def fresh(monkeypatch, tmp_path) -> Path:
    """`native` as if never loaded in this process, caching under ``tmp_path``; restored afterwards."""
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(native.tempfile, "gettempdir", lambda: str(tmp_path))
    for name in ("W8A16_NATIVE", "W8A16_NATIVE_SIMD", "CC"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def fp64_reference(x, w, s, b):
    y = (x.double() @ w.double().T) * s.double()
    return y if b is None else y + b.double()


def assert_within_fp32_rounding(y: torch.Tensor, x, w, s, b) -> None:
    """|y - exact| within the worst case of k fp32 roundings of the sum (any order), plus y's own rounding."""
    ref = fp64_reference(x, w, s, b)
    magnitude = (x.double().abs() @ w.double().abs().T) * s.double().abs()
    if b is not None:
        magnitude = magnitude + b.double().abs()
    bound = (w.shape[1] + 3) * 2.0**-24 * magnitude
    if y.dtype == torch.bfloat16:
        bound = bound + 2.0**-8 * (ref.abs() + bound)
    elif y.dtype == torch.float16:  # half an ulp, and half the smallest subnormal
        bound = bound + 2.0**-11 * (ref.abs() + bound) + 2.0**-25
    error = (y.double() - ref).abs()
    assert y.dtype == x.dtype and y.shape == ref.shape
    assert bool((error <= bound + 1e-30).all()), f"max excess {(error - bound).max().item():.3g}"


# ---------------------------------------------------------------------------------------------------------------
# 1. No writable temp dir: None once, with the reason; the PyTorch paths answer
# ---------------------------------------------------------------------------------------------------------------

NO_TEMP_SCRIPT = """
import os, sys, tempfile
if sys.argv[1] == "none-usable":  # what tempfile raises when no candidate directory is writable
    def gettempdir():
        raise FileNotFoundError(2, "No usable temporary directory found in ['/tmp', '/var/tmp']")
    tempfile.gettempdir = gettempdir
else:  # a directory that cannot exist: it is under a regular file
    tempfile.tempdir = os.environ["TMPDIR"]
from w8a16 import ops
from w8a16.ops import native
attempts = []
build = native._build_and_load
native._build_and_load = lambda: attempts.append(1) or build()
""" + CHECK_SCRIPT.replace('print(json.dumps({"ok": ok, ', 'print(json.dumps({"attempts": len(attempts), "ok": ok, ')


@pytest.mark.parametrize("how", ["none-usable", "under-a-file"])
def test_no_writable_temp_dir_gives_no_library_once_and_correct_answers(tmp_path, how):
    (tmp_path / "afile").write_text("not a directory")
    out = run_python(NO_TEMP_SCRIPT.replace("sys.argv[1]", repr(how)), tmp_path / "afile" / "sub")
    assert out["ok"] and out["attempts"] == 1
    assert out["info"]["available"] is False and out["info"]["simd"] is None
    assert "No usable temporary directory" in out["info"]["reason"] or "no writable directory" in out["info"]["reason"]


def test_no_writable_temp_dir_in_process(fresh, monkeypatch):
    (fresh / "afile").write_text("")
    monkeypatch.setattr(native.tempfile, "gettempdir", lambda: str(fresh / "afile" / "sub"))
    assert native.library() is None and native.library() is None
    assert "no writable directory" in native.unavailable_reason()
    assert native.info()["available"] is False


# ---------------------------------------------------------------------------------------------------------------
# 2. A damaged cached library is verified and rebuilt, never loaded
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory) -> Path:
    """A temp dir whose cache holds one good build (made by a subprocess, as a user's first run would)."""
    tmpdir = tmp_path_factory.mktemp("cache")
    first = run_python(CHECK_SCRIPT, tmpdir)
    assert first["ok"] and first["info"]["available"] and first["info"]["built"], first
    return tmpdir


def damage(library: Path, record: Path, how: str) -> None:
    data = library.read_bytes()
    if how == "truncated":  # a full disk or a killed copy: loading this was SIGBUS
        library.write_bytes(data[: len(data) // 2])
    elif how == "zeroed":  # same size, a block of zeros in the middle
        middle = len(data) // 2
        library.write_bytes(data[:middle] + bytes(4096) + data[middle + 4096 :])
    elif how == "empty":
        library.write_bytes(b"")
    elif how == "no-record":
        record.unlink()
    elif how == "bad-record":
        record.write_text("{not json")


@needs_compiler
@pytest.mark.parametrize("how", ["truncated", "zeroed", "empty", "no-record", "bad-record"])
def test_a_damaged_cache_is_rebuilt(built_cache, tmp_path, how):
    shutil.copytree(built_cache, tmp_path, dirs_exist_ok=True)
    library, record = cache_files(tmp_path)
    damage(library, record, how)
    out = run_python(CHECK_SCRIPT, tmp_path)
    assert out["ok"] and out["info"]["available"] and out["info"]["built"], out
    assert json.loads(record.read_text())["sha256"] == native._sha256(library)
    if how == "truncated":
        again = run_python(CHECK_SCRIPT, tmp_path)  # and the rebuilt one is used from then on
        assert again["ok"] and again["info"]["available"] and not again["info"]["built"]


@needs_compiler
def test_a_good_cache_is_loaded_without_building(built_cache, tmp_path):
    shutil.copytree(built_cache, tmp_path, dirs_exist_ok=True)
    library, _ = cache_files(tmp_path)
    before = library.stat().st_mtime_ns
    out = run_python(CHECK_SCRIPT, tmp_path)
    assert out["ok"] and out["info"]["available"] and not out["info"]["built"]
    assert out["info"]["library"] == str(library) and library.stat().st_mtime_ns == before


@needs_compiler
def test_concurrent_first_builds_all_succeed(tmp_path):
    environ = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": PACKAGE_PARENT}
    procs = [subprocess.Popen([sys.executable, "-c", CHECK_SCRIPT], env=environ, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (stdout, stderr) in zip(procs, results):
        assert p.returncode == 0, stderr[-2000:]
        out = json.loads(stdout.strip().splitlines()[-1])
        assert out["ok"] and out["info"]["available"], out
    library, record = cache_files(tmp_path)  # one library, matching its record, no temporary files left
    assert json.loads(record.read_text())["sha256"] == native._sha256(library)
    assert not list(library.parent.glob("*.tmp"))


# ---------------------------------------------------------------------------------------------------------------
# 3. Portable build: no -march=native, and a cache key with everything the binary depends on
# ---------------------------------------------------------------------------------------------------------------


def test_build_flags_are_portable():
    assert not any(flag.startswith(("-march", "-mcpu", "-mtune", "-mavx", "-mfma")) for flag in native.FLAGS)
    assert not any(flag.startswith("-m") for flag in native.OPENMP_FLAGS)


def test_cache_key_covers_machine_compiler_flags_and_source(monkeypatch, tmp_path):
    key = native._cache_key(["gcc"], "gcc 12.2.0")
    assert key == native._cache_key(["gcc"], "gcc 12.2.0")
    assert key != native._cache_key(["gcc"], "gcc 13.1.0")
    assert key != native._cache_key(["ccache", "gcc"], "gcc 12.2.0")
    monkeypatch.setattr(native.platform, "machine", lambda: "some-other-arch")
    other_machine = native._cache_key(["gcc"], "gcc 12.2.0")
    monkeypatch.undo()
    monkeypatch.setattr(native, "FLAGS", [*native.FLAGS, "-DX"])
    other_flags = native._cache_key(["gcc"], "gcc 12.2.0")
    monkeypatch.undo()
    source = tmp_path / "gemv.c"
    source.write_bytes(native.SOURCE.read_bytes() + b"\n")
    monkeypatch.setattr(native, "SOURCE", source)
    other_source = native._cache_key(["gcc"], "gcc 12.2.0")
    assert len({key, other_machine, other_flags, other_source}) == 4


@needs_compiler
def test_recorded_build_command_has_no_march_native(fresh):
    assert native.library() is not None, native.unavailable_reason()
    library, record = cache_files(fresh)
    command = json.loads(record.read_text())["command"]
    assert not any(part.startswith("-march") for part in command) and str(native.SOURCE) in command


# ---------------------------------------------------------------------------------------------------------------
# 4. A compiler without OpenMP (Apple clang) still builds it, single-threaded, and says so
# 5. CC is split like a shell would
# ---------------------------------------------------------------------------------------------------------------


def write_script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def check_gemv_correct() -> None:
    w = torch.randint(-127, 128, (13, 70), dtype=torch.int8)
    s, b = torch.rand(13) / 50, torch.randn(13)
    for m in (1, 2, 5):
        x = torch.randn(m, 70)
        assert_within_fp32_rounding(native.gemv(x, w, s, b), x, w, s, b)


@needs_compiler
def test_compiler_that_rejects_openmp_builds_without_it(fresh, monkeypatch):
    cc = write_script(fresh / "cc-without-openmp", f"""
for arg in "$@"; do
  if [ "$arg" = "-fopenmp" ]; then echo "clang: error: unsupported option '-fopenmp'" >&2; exit 1; fi
done
exec {GCC} "$@"
""")
    monkeypatch.setenv("CC", str(cc))
    assert native.library() is not None, native.unavailable_reason()
    info = native.info()
    assert info["available"] and info["openmp"] is False and info["built"] and info["compiler"] == str(cc)
    check_gemv_correct()


@needs_compiler
def test_default_build_uses_openmp_where_the_compiler_has_it(fresh):
    assert native.library() is not None, native.unavailable_reason()
    assert native.info()["openmp"] is True


@needs_compiler
@pytest.mark.parametrize("wrapper", ["script", "env"])
def test_cc_with_a_wrapper_is_split_like_a_shell(fresh, monkeypatch, wrapper):
    marker = fresh / "wrapper-ran"
    if wrapper == "env":
        command = f"env {GCC}"
    else:
        script = write_script(fresh / "my wrapper", f'touch "{marker}"\nexec "$@"\n')  # a space in its path
        command = f"'{script}' {GCC}"
    monkeypatch.setenv("CC", command)
    assert native.library() is not None, native.unavailable_reason()
    assert native.info()["compiler"] == shlex.join(shlex.split(command))
    assert wrapper == "env" or marker.exists()
    check_gemv_correct()


def test_a_compiler_that_is_not_there_is_reported(fresh, monkeypatch):
    monkeypatch.setenv("CC", str(fresh / "no-such-cc"))
    assert native.library() is None
    assert "could not build" in native.unavailable_reason() and native.info()["simd"] is None


# ---------------------------------------------------------------------------------------------------------------
# 6. simd() says what the library runs on this CPU; the scalar variant can be forced and is reported as None
# ---------------------------------------------------------------------------------------------------------------


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return {flag for line in f if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
    except OSError:
        return set()


@needs_compiler
def test_simd_is_the_widest_this_cpu_has():
    if native.library() is None:
        pytest.skip(native.unavailable_reason())
    flags = cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo to compare with")
    if {"avx512f", "avx512bw", "avx512vl", "avx2", "fma", "avx512_bf16"} <= flags:
        expected = "avx512bf16"  # (a compiler older than GCC/clang 11 builds without it: "avx512")
    elif {"avx512f", "avx512bw", "avx512vl", "avx2", "fma"} <= flags:
        expected = "avx512"
    elif {"avx2", "fma"} <= flags:
        expected = "avx2"
    else:
        expected = None
    assert native.library().w8a16_simd_best() == native.SIMD_LEVELS.index(expected or "scalar")
    if not os.environ.get("W8A16_NATIVE_SIMD"):
        assert native.simd() == expected and native.info()["simd"] == expected


@needs_compiler
@pytest.mark.parametrize("level", ["scalar", "avx2", "avx512"])
def test_w8a16_native_simd_caps_the_variant(built_cache, tmp_path, level):
    shutil.copytree(built_cache, tmp_path, dirs_exist_ok=True)
    out = run_python(CHECK_SCRIPT, tmp_path, W8A16_NATIVE_SIMD=level)
    assert out["ok"] and out["info"]["available"], out
    if level == "scalar":
        assert out["info"]["simd"] is None  # built and loaded, but reported as not vectorised
    else:  # capped there, or lower on a CPU without it
        allowed = native.SIMD_LEVELS[1 : native.SIMD_LEVELS.index(level) + 1]
        assert out["info"]["simd"] in (*allowed, None)


@needs_compiler
def test_unknown_w8a16_native_simd_warns_and_uses_the_best(fresh, monkeypatch, built_cache):
    shutil.copytree(built_cache, fresh, dirs_exist_ok=True)
    monkeypatch.setenv("W8A16_NATIVE_SIMD", "sse9")
    with pytest.warns(RuntimeWarning, match="sse9"):
        lib = native.library()
    best = native.SIMD_LEVELS[lib.w8a16_simd_best()]
    assert native.simd() == (None if best == "scalar" else best)


# ---------------------------------------------------------------------------------------------------------------
# 7. Every variant within fp32 rounding of an fp64 reference, on odd shapes and every dtype combination
# ---------------------------------------------------------------------------------------------------------------


def available_variants() -> list[str]:
    lib = native.library()
    return [] if lib is None else list(native.SIMD_LEVELS[: lib.w8a16_simd_best() + 1])


@pytest.fixture(params=native.SIMD_LEVELS)
def variant(request) -> str:
    """The kernel switched to one SIMD variant for the test, then back to what it was."""
    if request.param not in available_variants():
        pytest.skip(f"{request.param} does not run on this CPU (or no native kernel here)")
    before = native._state["simd"]
    assert native.select_simd(request.param) == request.param
    yield request.param
    native.select_simd(before)


# (n, k): n not a multiple of 4 or 2, k not a multiple of 8/16/32, rows shorter than one vector, n ≥ 8 for the
# prefetching blocks.
SHAPES = [(1, 1), (3, 7), (5, 17), (9, 33), (13, 100), (6, 257), (37, 47), (8, 1000), (2, 16), (4, 64)]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("params_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_variant_is_within_fp32_rounding(variant, x_dtype, params_dtype, bias):
    torch.manual_seed(1)
    for i, m in enumerate(range(1, 34)):
        for n, k in (SHAPES[i % len(SHAPES)], SHAPES[(i + 3) % len(SHAPES)]):
            w = torch.randint(-128, 128, (n, k), dtype=torch.int8)
            s = (torch.rand(n) / 50 + 1e-3).to(params_dtype)
            b = torch.randn(n).to(params_dtype) if bias else None
            x = (torch.randn(m, k) * 3).to(x_dtype)
            y = native.gemv(x, w, s, b)
            assert_within_fp32_rounding(y, x, w, s, b)
            assert torch.equal(native.PreparedWeights(w, s, b).run(x), y)  # same variant and order: bit for bit


def test_every_variant_on_a_wide_layer(variant):
    """4096-wide rows at M=1, 5 and 11: the main loops, prefetching and the odd last rows, in every dtype (bf16
    from 2 rows: the bf16 dot product where the CPU has it)."""
    torch.manual_seed(2)
    w = torch.randint(-128, 128, (75, 4099), dtype=torch.int8)
    s, b = torch.rand(75) / 50, torch.randn(75)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for m in (1, 5, 11):
            x = torch.randn(m, 4099).to(dtype)
            assert_within_fp32_rounding(native.gemv(x, w, s.to(dtype), b.to(dtype)), x, w, s.to(dtype), b.to(dtype))


def test_variants_agree_with_each_other_closely():
    variants = available_variants()
    if len(variants) < 2:
        pytest.skip("one variant here")
    before = native._state["simd"]
    torch.manual_seed(3)
    w = torch.randint(-128, 128, (64, 999), dtype=torch.int8)
    s = torch.rand(64) / 50
    for x in (torch.randn(7, 999), torch.randn(9, 999).bfloat16()):  # bf16 from 2 rows: the bf16 dot product
        try:
            outs = {}
            for name in variants:
                native.select_simd(name)
                outs[name] = native.gemv(x, w, s, None).float()
        finally:
            native.select_simd(before)
        scale = outs["scalar"].abs().max().item()
        rtol = 1e-5 if x.dtype == torch.float32 else 2**-8  # bf16 y: one rounding apart at most
        for name, y in outs.items():
            torch.testing.assert_close(y, outs["scalar"], rtol=rtol, atol=rtol * scale, msg=name)


def test_fp16_widening_and_rounding_are_exact(variant):
    """fp16 in and out, bit for bit against PyTorch: every fp16 value through x (widened, times 1, rounded back:
    itself, subnormals and inf included) and fp32 values through the scales onto fp16 y (round to nearest even,
    ties and overflow to inf as ``.half()``)."""
    every = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    finite_or_inf = every[~every.isnan()]
    one_w, one_s = torch.ones(1, 1, dtype=torch.int8), torch.ones(1)
    y = native.gemv(finite_or_inf[:, None], one_w, one_s, None)
    assert y.dtype == torch.float16 and torch.equal(y[:, 0], finite_or_inf)  # (-0 comes back as 0: 0 + -0 * 1)
    assert native.gemv(every[every.isnan()][:4, None], one_w, one_s, None).isnan().all()

    torch.manual_seed(4)
    halves = finite_or_inf[finite_or_inf.isfinite()].float()
    ties = (halves[:-1] + halves[1:]) / 2  # exactly between two fp16 neighbours (or their overflow)
    values = torch.cat([
        ties, ties.nextafter(torch.tensor(float("inf"))), ties.nextafter(torch.tensor(-float("inf"))),
        torch.randn(20000) * 2.0 ** torch.randint(-30, 20, (20000,)).float(),
        torch.tensor([65504.0, 65519.99, 65520.0, -65520.0, 1e30, 2.0**-25, 3 * 2.0**-26, 2.0**-26, 0.0, -0.0,
                      float("inf"), -float("inf")]),
    ])
    x = torch.ones(1, 1, dtype=torch.float16)
    y = native.gemv(x, torch.ones(values.numel(), 1, dtype=torch.int8), values, None)  # y = fp16(1 * 1 * value)
    assert torch.equal(y[0].view(torch.int16), values.half().view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_variant_overflows_to_inf_and_keeps_subnormal_inputs_within_rounding(variant, dtype):
    """Rows of x at the top of the dtype's range give ±inf, never NaN, as nn.Linear; rows of subnormals (which the
    bf16 dot product counts as zero) stay within fp32 rounding of the exact answer. At M=1, 2 and 9: every path."""
    torch.manual_seed(5)
    info = torch.finfo(dtype)
    w = torch.randint(1, 128, (6, 70), dtype=torch.int8)
    s = torch.rand(6) / 50 + 0.01
    for m in (1, 2, 9):
        x = torch.full((m, 70), info.max / 4).to(dtype)  # sums far beyond the output dtype
        x[1::2] = -x[1::2]
        y = native.gemv(x, w, s, None)
        assert not y.isnan().any() and y.isinf().all() and (y[0] > 0).all() and (y[1:2] < 0).all()
        tiny = (torch.rand(m, 70) * info.tiny * 0.9).to(dtype)  # subnormals (and some zeros)
        tiny[:, :3] = 1.0  # a normal part next to them
        assert_within_fp32_rounding(native.gemv(tiny, w, s, None), tiny, w, s, None)


# ---------------------------------------------------------------------------------------------------------------
# M = 1 without converting the weights (gemv.c's dot4_packed, AVX2 and AVX-512): the weights' bits are made into
# the floats q * 2^-133, and x is permuted to their order and scaled by a power of two once per call (pack_x)
# ---------------------------------------------------------------------------------------------------------------

needs_native = pytest.mark.skipif(native.library() is None, reason="no native kernel here")


def pack(x: torch.Tensor, block: int) -> tuple[torch.Tensor, float]:
    x = x.float().contiguous()
    xp = torch.full_like(x, float("nan"))
    return xp, native.library().w8a16_pack_x(x.data_ptr(), x.numel(), block, xp.data_ptr())


def interleave_order(block: int) -> list[int]:
    """Which of a block's bytes each float lane gets, from the instructions' definitions: vpunpcklbw/hbw take
    bytes 0-7/8-15 of every 128-bit lane, vpunpcklwd/hwd words 0-3/4-7 of those; the kernel multiplies the four
    results (lo-lo, lo-hi, hi-lo, hi-hi) by four consecutive vectors of x."""
    return [lane * 16 + bytes_half + words_half + e
            for bytes_half in (0, 8) for words_half in (0, 4) for lane in range(block // 16) for e in range(4)]


@needs_native
@pytest.mark.parametrize("block", [32, 64])
def test_packing_x_permutes_each_block_as_the_interleaves_and_scales_by_a_power_of_two(block):
    k = 3 * block + 5
    x = torch.arange(1, k + 1, dtype=torch.float32) * (-1) ** torch.arange(k)  # distinct: positions read back
    xp, unscale = pack(x, block)
    scale = 2.0**133 / unscale
    assert scale == 2.0 ** round(math.log2(scale)) and 2.0**125 <= k * scale < 2.0**127  # largest |x| near 2^126
    full = k - k % block
    order = [b + i for b in range(0, full, block) for i in interleave_order(block)]
    assert torch.equal(xp[:full], x[order] * scale)
    assert torch.equal(xp[full:], x[full:])  # the tail as it is: the kernels convert those weights


@needs_native
@pytest.mark.parametrize("largest, packed", [
    (0.0, True), (2.0**-90, True), (2.0**-91, False), (3.0, True), (2.0**119, True),
    (2.0**119 * (1 + 2.0**-23), False), (math.inf, False), (math.nan, False),  # the next fp32 past 2^119
])
def test_packing_x_refuses_ranges_where_products_would_leave_the_normal_range(largest, packed):
    x = torch.zeros(100)
    x[17], x[3] = largest, -largest / 3
    _, unscale = pack(x, 64)
    assert (unscale != 0.0) == packed


@pytest.mark.parametrize("dtype, exponent", [
    (torch.float32, -100), (torch.float32, -89), (torch.float32, -30), (torch.float32, 0), (torch.float32, 100),
    (torch.bfloat16, -95), (torch.bfloat16, 0), (torch.bfloat16, 110), (torch.float16, -20), (torch.float16, 1),
])
def test_m1_is_within_fp32_rounding_at_every_magnitude_of_x(variant, dtype, exponent):
    """Both sides of each range limit of the packed kernel (and the converting loop it falls back to)."""
    torch.manual_seed(6)
    k = 4096 + 37
    w = torch.randint(-128, 128, (13, k), dtype=torch.int8)
    s, b = torch.rand(13) / 50, torch.randn(13)
    x = (torch.randn(1, k) * 2.0**exponent).to(dtype)
    assert_within_fp32_rounding(native.gemv(x, w, s.to(dtype), b.to(dtype)), x, w, s.to(dtype), b.to(dtype))
    x[0, 5], w[:, 5] = 2.0**121 if dtype != torch.float16 else 1.0, 0  # past 2^119: the converting loop
    assert_within_fp32_rounding(native.gemv(x, w, s.to(dtype), None), x, w, s.to(dtype), None)


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_m1_inf_and_nan_in_x_come_out_as_in_the_reference(variant, bad):
    torch.manual_seed(7)
    w = torch.randint(-128, 128, (40, 300), dtype=torch.int8)
    w[:5, 10] = 0  # 0 * inf: NaN in those rows
    x = torch.randn(1, 300)
    x[0, 10] = bad
    y, ref = native.gemv(x, w, torch.rand(40) / 50, None), fp64_reference(x, w, torch.rand(40), None)
    assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y[~y.isnan()], ref[~ref.isnan()].float())


@pytest.mark.parametrize("threads", [1, 2])
def test_m1_is_right_with_flush_denormal_on(variant, threads):
    """torch.set_flush_denormal(True) sets denormals-are-zero, under which the packed weights (subnormal floats
    for |q| < 128) would read as zeros: a thread that finds it set converts its weights instead."""
    torch.manual_seed(8)
    w = torch.randint(-128, 128, (64, 4096), dtype=torch.int8)
    s, x = torch.rand(64) / 50, torch.randn(1, 4096)
    threads_before = torch.get_num_threads()
    if not torch.set_flush_denormal(True):
        pytest.skip("no denormals-are-zero on this CPU")
    try:
        torch.set_num_threads(threads)
        y = native.gemv(x, w, s, None)
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads_before)
    assert_within_fp32_rounding(y, x, w, s, None)


# ---------------------------------------------------------------------------------------------------------------
# The bf16 GEMM on VDPBF16PS (the end of csrc/gemv.c): bf16 x from BF16_DOT_MIN_M rows on, on AVX512-BF16 CPUs
# ---------------------------------------------------------------------------------------------------------------

needs_bf16_dot = pytest.mark.skipif(not native.bf16_dot(), reason="this CPU has no AVX512-BF16 (or no native kernel)")


@needs_bf16_dot
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("params_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bf16_gemm_is_within_fp32_rounding(params_dtype, bias):
    """Row counts around its 16- and 32-row blocks, k odd and shorter than a vector, n not a multiple of 8."""
    torch.manual_seed(4)
    for m in (native.BF16_DOT_MIN_M, 33, 48, 64, 100, 257):
        for n, k in ((1, 1), (3, 7), (9, 33), (37, 47), (8, 1000), (13, 4099)):
            w = torch.randint(-128, 128, (n, k), dtype=torch.int8)
            s = (torch.rand(n) / 50 + 1e-3).to(params_dtype)
            b = torch.randn(n).to(params_dtype) if bias else None
            x = (torch.randn(m, k) * 3).bfloat16()
            y = native.gemv(x, w, s, b)
            assert_within_fp32_rounding(y, x, w, s, b)
            assert torch.equal(native.PreparedWeights(w, s, b).run(x), y)


@needs_bf16_dot
def test_bf16_gemm_serves_bf16_at_every_batch_and_overflows_to_inf():
    w = torch.full((4, 64), 127, dtype=torch.int8)
    w[1] = -127
    x = torch.full((40, 64), 3e37).bfloat16()
    assert ops.choose_path(x, w, torch.ones(4)) == "native"  # 40 rows: past NATIVE_MAX_M, still the C kernel
    y = native.gemv(x, w, torch.ones(4), None)
    assert torch.isinf(y[:, 0]).all() and (y[:, 0] > 0).all() and (y[:, 1] < 0).all() and not y.isnan().any()


@needs_bf16_dot
def test_bf16_gemm_is_off_below_the_avx512bf16_level_and_the_gemv_answers():
    before = native._state["simd"]
    torch.manual_seed(5)
    w, s = torch.randint(-127, 128, (24, 300), dtype=torch.int8), torch.rand(24) / 50
    x = torch.randn(20, 300).bfloat16()
    try:
        with_dot = native.gemv(x, w, s, None)
        native.select_simd("avx512")
        assert not native.bf16_dot() and native.info()["bf16_dot"] is False
        without = native.gemv(x, w, s, None)
        assert ops.choose_path(torch.randn(64, 300).bfloat16(), w, s) != "native"  # the tiles again past 32 rows
    finally:
        native.select_simd(before)
    assert_within_fp32_rounding(without, x, w, s, None)
    torch.testing.assert_close(with_dot, without, rtol=2**-7, atol=0)
