"""The C GEMV kernel (``csrc/gemv.c``), compiled on first use with the machine's C compiler.

Why compile at run time: the kernel is a short C file with no dependency on PyTorch's headers, so the system
``cc`` builds it in about a second, for the exact CPU it runs on (``-march=native``), with no build step at
install time and no wheel per platform. It is called through `ctypes` on the tensors' data pointers.

Where there is no compiler, no OpenMP or another failure, `library()` returns None once and for all and the
dispatcher in `kernels.py` uses the pure-PyTorch paths. ``W8A16_NATIVE=0`` switches it off. The build goes
to the temp directory, keyed by a hash of source, flags and compiler, so it is built once per machine.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "gemv.c"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]

_lock = threading.Lock()
_state: dict[str, object] = {}  # "lib": the loaded library or None once tried; "error": why not


def library() -> ctypes.CDLL | None:
    """The compiled kernel, building it the first time; None when it cannot be built here."""
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                _state["lib"] = _build_and_load()
    return _state["lib"]  # type: ignore[return-value]


def unavailable_reason() -> str | None:
    """Why `library()` is None (for reports), or None when the kernel is in use."""
    return None if library() is not None else str(_state.get("error"))


def _build_and_load() -> ctypes.CDLL | None:
    if os.environ.get("W8A16_NATIVE", "1") == "0":
        _state["error"] = "switched off by W8A16_NATIVE=0"
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        _state["error"] = "no C compiler on PATH"
        return None
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([compiler, *FLAGS]).encode()).hexdigest()[:16]
    uid = os.getuid() if hasattr(os, "getuid") else None
    target = Path(tempfile.gettempdir()) / f"w8a16-native-{uid if uid is not None else 0}" / f"gemv-{key}.so"
    try:
        target.parent.mkdir(mode=0o700, exist_ok=True)
        if uid is not None and not _private(target.parent, uid):
            _state["error"] = f"{target.parent} is not a private directory of this user; not loading code from it"
            return None
        if not target.exists():
            partial = target.with_suffix(f".{os.getpid()}.tmp")
            subprocess.run([compiler, *FLAGS, "-o", str(partial), str(SOURCE)], check=True, capture_output=True, timeout=120)
            os.replace(partial, target)  # atomic: a concurrent process sees all of it or nothing
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as err:
        stderr = getattr(err, "stderr", b"") or b""
        _state["error"] = f"could not build {SOURCE.name}: {err} {stderr.decode(errors='replace')[:300]}".strip()
        return None
    lib.w8a16_gemv.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3 + [ctypes.c_int] * 4
    lib.w8a16_gemv.restype = ctypes.c_int
    return lib


DTYPES = (torch.float32, torch.bfloat16)  # what the C code reads and writes; fp16 goes through fp32


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype`` and contiguous, copying only when it is not already."""
    return t if t.dtype == dtype and t.is_contiguous() else t.to(dtype).contiguous()


def _private(directory: Path, uid: int) -> bool:
    """A shared temp dir must not let another user plant the library we are about to load."""
    st = directory.stat()
    return st.st_uid == uid and not st.st_mode & 0o022


def gemv(x: torch.Tensor, int8_weights: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ (int8_weights * scales[:, None]).T + bias`` for a CPU ``x`` of shape ``(m, k)``, in ``x.dtype``.

    Accumulates in fp32 and rounds once. Every argument is brought to exactly the layout the C code assumes
    (int8 / fp32 / bf16, contiguous, right shapes, one dtype for scales and bias) before its pointer is taken:
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
    _call(lib, pointers, xc, y, n, k, params_dtype == torch.bfloat16)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def _call(lib: ctypes.CDLL, pointers: tuple[int, int, int], x: torch.Tensor, y: torch.Tensor, n: int, k: int,
          params_bf16: bool) -> None:
    """The C call itself, on tensors already checked to be in its contract (``pointers``: weight, scales, bias;
    0 for no bias)."""
    weights, scales, bias = pointers
    bf16 = x.dtype == torch.bfloat16
    status = lib.w8a16_gemv(weights, x.data_ptr(), scales, bias, y.data_ptr(), x.numel() // k, n, k,
                            torch.get_num_threads(), bf16, params_bf16, bf16)
    if status < 0:
        raise MemoryError("native gemv: could not allocate the widened activations")


class PreparedWeights:
    """One layer's weight side of the native call, checked once, for a decode loop that calls it every step.

    Why: at decode the C call itself is ~8 µs, while `gemv`'s checks and conversions cost several times that
    on every call (80 layers per CodeGen-350M token). A layer whose int8 weight is contiguous and whose scales
    and bias are contiguous fp32 or bf16 of one dtype needs no conversion, so all that is left to check per
    call is the activation (`run`) and that these are still the layer's tensors (`is_for`).

    It holds the tensors themselves, never copies: values changed in place (``load_state_dict``) are seen.
    """

    __slots__ = ("weights", "scales", "bias", "shape", "pointers", "params_bf16")

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
            raise ValueError("PreparedWeights: needs a non-empty contiguous CPU int8 weight and (out,) fp32/bf16 scales/bias")
        self.weights, self.scales, self.bias = int8_weights, scales, bias
        self.shape = int8_weights.shape
        self.pointers = self._pointers(int8_weights, scales, bias)
        self.params_bf16 = scales.dtype == torch.bfloat16

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
        _call(lib, self.pointers, x, y, n, k, self.params_bf16)
        return y
