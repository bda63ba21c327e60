"""The C GEMV kernel (``csrc/gemv.c``), compiled on first use with the machine's C compiler.

Why compile at run time: the kernel is a short C file with no dependency on PyTorch's headers, so the system
``cc`` builds it in about a second, with no build step at install time and no wheel per platform. It is called
through `ctypes` on the tensors' data pointers.

Why it is built the way it is (each point was a bug):

* Portable build, run-time dispatch. It is compiled for the compiler's baseline ISA, never ``-march=native``:
  the cache may be shared by machines with other CPUs, and a native build there dies of SIGILL. The SIMD
  variants (AVX2, AVX-512, AVX-512 with bf16 dot products) are compiled with per-function target attributes and
  the library picks the widest this CPU runs (`simd`); ``W8A16_NATIVE_SIMD=scalar|avx2|avx512|avx512bf16``
  caps it. Elsewhere (arm64 for now) it is a scalar loop, slower than PyTorch's kernels: `simd` is then None and
  the dispatcher does not prefer it.
* The cache key is everything the binary depends on: source, flags, the compiler's command and ``--version``,
  and the machine architecture.
* A cached library is verified before it is loaded: a sidecar ``.json`` records its sha256 at build time, and
  a file that does not match (truncated by a full disk, a crash mid-copy) is rebuilt. Loading a damaged
  shared object kills the process (SIGBUS) rather than raising. Builds are written under a temporary name and
  renamed into place, so a concurrent process sees a whole file or none.
* OpenMP when the compiler has it (Apple clang rejects ``-fopenmp``): otherwise built without, one thread.
* ``CC`` is split like a shell would (``CC="ccache gcc"``).
* Any failure — no compiler, no writable temp directory, a build error — makes `library()` return None once
  and for all, with the reason in `unavailable_reason()` / `info()`, and the dispatcher uses the pure-PyTorch
  paths. ``W8A16_NATIVE=0`` switches it off.

The build goes to ``$TMPDIR/w8a16-native-<uid>/`` (a directory only this user may write), so it is built once
per machine and compiler.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import uuid
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "gemv.c"
# Rows of bf16 x from which the GEMM beats the GEMV's own bf16 dot-product tiles. 4096×4096, 2-core EPYC, medians
# of alternated runs: M=16 GEMV 2.17 ms / GEMM 2.45 ms, M=24 3.55 / 3.79, M=32 4.75 / 3.84, M=64 7.12 / 5.90,
# M=256 31.2 / 20.6 (dense bf16: 2.88, 3.69, 4.23, 6.19, 20.2 ms).
BF16_DOT_MIN_M = 32
FLAGS = ["-O3", "-shared", "-fPIC"]  # baseline ISA on purpose: the SIMD variants are chosen at run time
OPENMP_FLAGS = ["-fopenmp"]  # tried first; the library is built without them where the compiler refuses
SIMD_LEVELS = ("scalar", "avx2", "avx512", "avx512bf16")  # index = the C library's SIMD_* value
BUILD_TIMEOUT_S = 120

_lock = threading.Lock()
# "lib": the loaded library or None once tried; "error": why not; "simd": SIMD_LEVELS name in use; "details":
# what `info` reports about the build.
_state: dict[str, object] = {}


class _Unavailable(Exception):
    """The kernel cannot be used here, for the reason given (not a bug: the PyTorch paths take over)."""


# ---------------------------------------------------------------------------------------------------------------
# What callers ask
# ---------------------------------------------------------------------------------------------------------------


def library() -> ctypes.CDLL | None:
    """The compiled kernel, building it the first time; None when it cannot be built or loaded here."""
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                _state["lib"] = _build_and_load()
    return _state["lib"]  # type: ignore[return-value]


def unavailable_reason() -> str | None:
    """Why `library()` is None (for reports), or None when the kernel is in use."""
    return None if library() is not None else str(_state.get("error"))


def simd() -> str | None:
    """The instruction set the kernel runs on this CPU (``"avx512bf16"``, ``"avx512"``, ``"avx2"``), or None where
    it is a scalar loop or not available: then PyTorch's kernels are faster."""
    if library() is None:
        return None
    level = _state.get("simd")
    return None if level == "scalar" else level  # type: ignore[return-value]


def bf16_dot() -> bool:
    """Whether the bf16 GEMM (``w8a16_gemm_bf16`` in ``csrc/gemv.c``) runs here: the ``avx512bf16`` level is in
    use, which the library chooses only on a CPU with AVX512-BF16 (``W8A16_NATIVE_SIMD=avx512`` or lower caps it)."""
    return library() is not None and _state.get("simd") == "avx512bf16"


def select_simd(name: str | None) -> str:
    """Run the variant ``name`` (one of `SIMD_LEVELS`, capped at what this CPU has), or the best one for None.
    Returns the variant now in use. Process-wide: for tests and benchmarks."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"the native kernel is not available: {unavailable_reason()}")
    if name is not None and name not in SIMD_LEVELS:
        raise ValueError(f"unknown SIMD variant {name!r}; choose from {SIMD_LEVELS}")
    level = lib.w8a16_simd_use(-1 if name is None else SIMD_LEVELS.index(name))
    _state["simd"] = SIMD_LEVELS[level]
    return SIMD_LEVELS[level]


def info() -> dict[str, object]:
    """How the kernel was built and runs here: ``available``, ``reason``, ``simd``, ``openmp``, ``compiler``,
    ``library`` (the path loaded), and ``built`` (compiled by this process rather than found in the cache)."""
    lib = library()
    details = dict(_state.get("details") or {})  # type: ignore[arg-type]
    return {
        "available": lib is not None,
        "reason": unavailable_reason(),
        "simd": simd(),
        "openmp": bool(lib.w8a16_openmp()) if lib is not None else False,
        "bf16_dot": bf16_dot(),
        "compiler": details.get("compiler"),
        "compiler_version": details.get("compiler_version"),
        "library": details.get("library"),
        "built": details.get("built", False),
    }


# ---------------------------------------------------------------------------------------------------------------
# Building, caching, loading
# ---------------------------------------------------------------------------------------------------------------


def _build_and_load() -> ctypes.CDLL | None:
    if os.environ.get("W8A16_NATIVE", "1") == "0":
        _state["error"] = "switched off by W8A16_NATIVE=0"
        return None
    try:
        return _load_or_build()
    except _Unavailable as err:
        _state["error"] = str(err)
    except Exception as err:  # noqa: BLE001 — anything else (an odd temp dir, …): once, and said why
        _state["error"] = f"native kernel unavailable: {type(err).__name__}: {err}"
    return None


def _load_or_build() -> ctypes.CDLL:
    compiler = _compiler()
    version = _compiler_version(compiler)
    details = _state["details"] = {"compiler": shlex.join(compiler), "compiler_version": version.splitlines()[0]}
    stem = _cache_dir() / f"gemv-{_cache_key(compiler, version)}"
    target, record = stem.with_suffix(".so"), stem.with_suffix(".json")
    built = not _verified(target, record)
    if built:
        _build(compiler, target, record)
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as err:
        raise _Unavailable(f"could not load {target}: {err}") from err
    _declare(lib)
    details.update(library=str(target), built=built)
    _state["simd"] = SIMD_LEVELS[lib.w8a16_simd_use(_requested_simd())]
    return lib


def _compiler() -> list[str]:
    """``$CC`` split like a shell would (``ccache gcc``), else ``cc`` or ``gcc`` from PATH."""
    cc = os.environ.get("CC", "").strip()
    if cc:
        return shlex.split(cc)
    found = shutil.which("cc") or shutil.which("gcc")
    if found is None:
        raise _Unavailable("no C compiler on PATH (set CC to use one)")
    return [found]


def _compiler_version(compiler: list[str]) -> str:
    """``--version``'s output (for the cache key and `info`); a compiler without it still gets to try the build."""
    try:
        done = subprocess.run([*compiler, "--version"], capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as err:
        return f"unknown ({err})"
    return (done.stdout or done.stderr).decode(errors="replace").strip() or f"unknown (exit {done.returncode})"


def _cache_key(compiler: list[str], version: str) -> str:
    """Everything the binary depends on. The CPU model is not in it: the library runs on any CPU of the
    architecture and picks its SIMD variant when loaded."""
    parts = [platform.machine(), shlex.join(compiler), version, shlex.join(FLAGS), shlex.join(OPENMP_FLAGS)]
    digest = hashlib.sha256("\0".join(parts).encode())
    digest.update(SOURCE.read_bytes())
    return digest.hexdigest()[:16]


def _cache_dir() -> Path:
    uid = os.getuid() if hasattr(os, "getuid") else None
    directory = Path(tempfile.gettempdir()) / f"w8a16-native-{uid if uid is not None else 0}"
    try:
        directory.mkdir(mode=0o700, exist_ok=True)
    except OSError as err:
        raise _Unavailable(f"no writable directory for the compiled kernel ({directory}): {err}") from err
    if uid is not None and not _private(directory, uid):
        raise _Unavailable(f"{directory} is not a private directory of this user; not loading code from it")
    return directory


def _private(directory: Path, uid: int) -> bool:
    """A shared temp dir must not let another user plant the library we are about to load."""
    st = directory.stat()
    return st.st_uid == uid and not st.st_mode & 0o022


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _verified(target: Path, record: Path) -> bool:
    """Whether ``target`` is exactly the file its build recorded (a damaged one would crash the process)."""
    try:
        return json.loads(record.read_text())["sha256"] == _sha256(target)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _build(compiler: list[str], target: Path, record: Path) -> None:
    """Compile into ``target`` with OpenMP, or without it where the compiler refuses; then record its hash.
    Written under temporary names and renamed into place: never a half-written file at ``target``."""
    partial = target.with_name(f"{target.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    errors = []
    try:
        for extra in (OPENMP_FLAGS, []):
            command = [*compiler, *FLAGS, *extra, "-o", str(partial), str(SOURCE)]
            error = _compile(command)
            if error is None and partial.is_file():
                break
            errors.append(f"{shlex.join(command)}: {error}")
        else:
            raise _Unavailable(f"could not build {SOURCE.name}: " + " | ".join(errors))
        digest = _sha256(partial)
        os.replace(partial, target)  # atomic: a concurrent process sees all of it or nothing
        _write_atomically(record, json.dumps({"sha256": digest, "command": command}))
    finally:
        partial.unlink(missing_ok=True)


def _compile(command: list[str]) -> str | None:
    """Run the compiler: None on success, else what went wrong (the end of its stderr)."""
    try:
        done = subprocess.run(command, capture_output=True, timeout=BUILD_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as err:
        return str(err)
    if done.returncode != 0:
        return done.stderr.decode(errors="replace").strip()[-300:] or f"exit status {done.returncode}"
    return None


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        partial.write_text(text)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _declare(lib: ctypes.CDLL) -> None:
    lib.w8a16_gemv.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3 + [ctypes.c_int] * 4
    lib.w8a16_gemv.restype = ctypes.c_int
    for name in ("w8a16_simd_best", "w8a16_simd_active", "w8a16_openmp"):
        getattr(lib, name).argtypes = []
        getattr(lib, name).restype = ctypes.c_int
    lib.w8a16_simd_use.argtypes = [ctypes.c_int]
    lib.w8a16_simd_use.restype = ctypes.c_int
    lib.w8a16_gemm_bf16.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3 + [ctypes.c_int] * 2
    lib.w8a16_gemm_bf16.restype = ctypes.c_int
    lib.w8a16_pack_x.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p]
    lib.w8a16_pack_x.restype = ctypes.c_float


def _requested_simd() -> int:
    """``W8A16_NATIVE_SIMD`` as a C SIMD_* level (a cap), or -1 for the best this CPU has."""
    name = os.environ.get("W8A16_NATIVE_SIMD", "").strip().lower()
    if name in SIMD_LEVELS:
        return SIMD_LEVELS.index(name)
    if name:
        warnings.warn(f"W8A16_NATIVE_SIMD={name!r} is not one of {SIMD_LEVELS}; ignored", RuntimeWarning, stacklevel=2)
    return -1


# ---------------------------------------------------------------------------------------------------------------
# Calling it
# ---------------------------------------------------------------------------------------------------------------

DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the C code reads and writes (fp32 inside)
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # gemv.c's DT_*


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype`` and contiguous, copying only when it is not already."""
    return t if t.dtype == dtype and t.is_contiguous() else t.to(dtype).contiguous()


def gemv(x: torch.Tensor, int8_weights: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ (int8_weights * scales[:, None]).T + bias`` for a CPU ``x`` of shape ``(m, k)``, in ``x.dtype``.

    Accumulates in fp32 and rounds once. Every argument is brought to exactly the layout the C code assumes
    (int8 / fp32 / bf16 / fp16, contiguous, right shapes, one dtype for scales and bias) before its pointer is taken:
    the kernel itself checks nothing.
    """
    lib = library()
    if lib is None:
        raise RuntimeError(f"the native kernel is not available: {unavailable_reason()}")
    n, k = int8_weights.shape
    if x.dim() != 2 or x.shape[1] != k or scales.shape != (n,) or (bias is not None and bias.shape != (n,)):
        raise ValueError(f"native gemv: shapes x{tuple(x.shape)} w{tuple(int8_weights.shape)} do not fit")
    tensors = (x, int8_weights, scales) if bias is None else (x, int8_weights, scales, bias)
    if any(t.device.type != "cpu" for t in tensors) or int8_weights.dtype != torch.int8:
        raise ValueError("native gemv: needs CPU tensors and an int8 weight")
    if not (x.is_floating_point() and scales.is_floating_point() and (bias is None or bias.is_floating_point())):
        raise ValueError("native gemv: x, scales and bias must be floating point")
    io_dtype = x.dtype if x.dtype in DTYPES else torch.float32
    params_dtype = scales.dtype if scales.dtype in DTYPES and (bias is None or bias.dtype == scales.dtype) else torch.float32
    # At decode a call is ~1 ms of memory traffic, so the ~2 µs of each no-op .to()/.contiguous() matters:
    # convert only what needs it.
    xc, w, s, b = _as(x, io_dtype), _as(int8_weights, torch.int8), _as(scales, params_dtype), bias
    if b is not None:
        b = _as(b, params_dtype)
    y = torch.empty(xc.shape[0], n, dtype=io_dtype)
    pointers = w.data_ptr(), s.data_ptr(), 0 if b is None else b.data_ptr()
    _call(lib, pointers, xc, y, n, k, DTYPE_CODES[params_dtype])
    return y if y.dtype == x.dtype else y.to(x.dtype)


# Multiply-adds below which one thread does the whole call: ~10 µs of work, less than waking the other threads
# costs — and on a busy machine (other processes on the cores) a parallel region can wait milliseconds for a
# descheduled thread (a 384×128 layer: 0.2 ms → 9 ms per call under a load of 3 on 2 cores).
SERIAL_BELOW = 1 << 18


def _call(lib: ctypes.CDLL, pointers: tuple[int, int, int], x: torch.Tensor, y: torch.Tensor, n: int, k: int,
          params_code: int) -> None:
    """The C call itself, on tensors already checked to be in its contract (``pointers``: weight, scales, bias;
    0 for no bias; ``params_code``: their `DTYPE_CODES`; y has x's dtype)."""
    weights, scales, bias = pointers
    code = DTYPE_CODES[x.dtype]
    m = x.numel() // k
    threads = 1 if m * n * k < SERIAL_BELOW else torch.get_num_threads()
    if code == DTYPE_CODES[torch.bfloat16] and m >= BF16_DOT_MIN_M and bf16_dot():
        # Enough rows to fill VDPBF16PS's 16 lanes with rows of x: the bf16 GEMM (the end of gemv.c).
        status = lib.w8a16_gemm_bf16(weights, x.data_ptr(), scales, bias, y.data_ptr(), m, n, k, threads,
                                     params_code)
        if status == -2:
            raise MemoryError("native gemm_bf16: could not allocate the packed activations")
        if status == 0:
            return
    status = lib.w8a16_gemv(weights, x.data_ptr(), scales, bias, y.data_ptr(), m, n, k, threads, code, params_code,
                            code)
    if status < 0:
        raise MemoryError("native gemv: could not allocate the widened activations")


class PreparedWeights:
    """One layer's weight side of the native call, checked once, for a decode loop that calls it every step.

    Why: at decode the C call itself is ~8 µs, while `gemv`'s checks and conversions cost several times that
    on every call (80 layers per CodeGen-350M token). A layer whose int8 weight is contiguous and whose scales
    and bias are contiguous fp32, bf16 or fp16 of one dtype needs no conversion, so all that is left to check per
    call is the activation (`run`) and that these are still the layer's tensors (`is_for`).

    It holds the tensors themselves, never copies: values changed in place (``load_state_dict``) are seen.
    """

    __slots__ = ("weights", "scales", "bias", "shape", "pointers", "params_code")

    def __init__(self, int8_weights: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
        n, k = int8_weights.shape
        params = (scales,) if bias is None else (scales, bias)
        if not (
            n > 0 and k > 0
            and int8_weights.dtype == torch.int8
            and int8_weights.is_contiguous()
            and all(t.shape == (n,) and t.is_contiguous() and t.dtype == scales.dtype for t in params)
            and scales.dtype in DTYPES
            and all(t.device.type == "cpu" for t in (int8_weights, *params))
        ):
            raise ValueError("PreparedWeights: needs a non-empty contiguous CPU int8 weight and (out,) fp32/bf16/fp16 scales/bias")
        self.weights, self.scales, self.bias = int8_weights, scales, bias
        self.shape = int8_weights.shape
        self.pointers = self._pointers(int8_weights, scales, bias)
        self.params_code = DTYPE_CODES[scales.dtype]

    @staticmethod
    def _pointers(w: torch.Tensor, s: torch.Tensor, b: torch.Tensor | None) -> tuple[int, int, int]:
        return w.data_ptr(), s.data_ptr(), 0 if b is None else b.data_ptr()

    def is_for(self, int8_weights: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> bool:
        """Still exactly these tensors, with the same storage and shape (``.data =`` swaps are caught)."""
        return (
            int8_weights is self.weights
            and scales is self.scales
            and bias is self.bias
            and int8_weights.shape == self.shape
            and self._pointers(int8_weights, scales, bias) == self.pointers
        )

    def run(self, x: torch.Tensor) -> torch.Tensor | None:
        """The layer's output for ``x`` of shape ``(..., k)``, or None where ``x`` is not in the C contract
        (another dtype or device, not contiguous); the caller then takes the general path."""
        if not (x.dtype in DTYPES and x.is_cpu and x.is_contiguous()):
            return None
        n, k = self.shape
        if x.shape[-1] != k:
            return None
        y = torch.empty(*x.shape[:-1], n, dtype=x.dtype)
        lib = library()
        if lib is None:
            return None
        _call(lib, self.pointers, x, y, n, k, self.params_code)
        return y
