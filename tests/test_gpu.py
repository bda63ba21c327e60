"""gpu.py: the Triton kernel's guards everywhere, and its maths in Triton's CPU interpreter where Triton is installed.

On a machine with a GPU, test_dispatch.py runs the kernel on CUDA through the device fixture (it is one of the
supported paths there). Without one, Triton's interpreter (``TRITON_INTERPRET=1``, in a subprocess, since Triton
reads it on first use) runs the very same kernel on CPU tensors. CI installs no Triton: there only the guards run.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from w8a16 import ops
from w8a16.ops import dispatch, gpu

ROOT = Path(__file__).resolve().parents[1]
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def test_not_offered_on_a_cpu_outside_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(1, 64)
    assert not gpu.available(x)
    w = torch.randint(-127, 128, (8, 64), dtype=torch.int8)
    assert "triton" not in ops.supported_paths(x, w, torch.rand(8))


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("W8A16_TRITON", "0")
    assert not gpu.available(torch.randn(1, 64))


def test_never_chosen_on_a_cpu_even_when_interpreted(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    w = torch.randint(-127, 128, (8, 64), dtype=torch.int8)
    with torch.no_grad():
        assert ops.choose_path(torch.randn(1, 64), w, torch.rand(8)) != "triton"


@pytest.mark.parametrize(
    "broken",
    [
        lambda x, w, s, b=None: (_ for _ in ()).throw(RuntimeError("PTX compilation failed")),
        lambda x, w, s, b=None: torch.zeros(*x.shape[:-1], w.shape[0], dtype=x.dtype),
        lambda x, w, s, b=None: torch.full((*x.shape[:-1], w.shape[0]), float("nan"), dtype=x.dtype),
    ],
    ids=["raises", "wrong", "nan"],
)
def test_a_failing_kernel_is_switched_off_with_a_warning(monkeypatch, broken):
    monkeypatch.setattr(gpu, "triton_linear", broken)
    with pytest.warns(RuntimeWarning, match="switched off"):
        assert gpu._self_check(torch.device("cpu"), torch.float32) is False


def test_first_use_check_runs_once_per_device_and_dtype(monkeypatch):
    calls = []
    monkeypatch.setattr(gpu, "_checked", {})
    monkeypatch.setattr(gpu, "_self_check", lambda device, dtype: calls.append((device, dtype)) or True)
    x = torch.randn(1, 8)
    assert gpu.passes_first_use_check(x) and gpu.passes_first_use_check(x)
    assert gpu.passes_first_use_check(x.bfloat16())
    assert calls == [(x.device, torch.float32), (x.device, torch.bfloat16)]


INTERPRETER_CASES = """
import torch
from w8a16.ops import w8a16_linear

TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
g = torch.Generator().manual_seed(0)
for dtype in TOL:
    for n_in, n_out in ((48, 5), (17, 3), (300, 37)):          # odd, tails in K and N
        for leading in ((), (1,), (2, 2), (40,), (130,)):       # 1-D, decode, 3-D, row buckets 64 and 128 (2 tiles)
            for bias in (True, False):
                w = torch.randint(-127, 128, (n_out, n_in), generator=g, dtype=torch.int8)
                s = (torch.rand(n_out, generator=g) / 50 + 1e-3).to(dtype)
                b = torch.randn(n_out, generator=g).to(dtype) if bias else None
                x = torch.randn(*leading, n_in, generator=g).to(dtype)
                cases = {"plain": x}
                if x.dim() == 2:
                    cases["non-contiguous"] = torch.randn(n_in, x.shape[0], generator=g).to(dtype).t()
                    cases["misaligned"] = torch.randn(x.numel() + 1, generator=g).to(dtype)[1:].view(x.shape)
                for name, xx in cases.items():
                    ref = torch.nn.functional.linear(xx.double(), w.double() * s.double()[:, None])
                    ref = ref if b is None else ref + b.double()
                    out = w8a16_linear(xx, w, s, b, path="triton")
                    assert out.dtype == dtype and out.shape == ref.shape, (name, out.shape)
                    err = (out.double() - ref).abs().max().item()
                    assert err <= TOL[dtype] * ref.abs().max().item() + 1e-6, (dtype, n_in, n_out, leading, bias, name, err)
x = torch.zeros(0, 64)
assert w8a16_linear(x, torch.zeros(8, 64, dtype=torch.int8), torch.ones(8), path="triton").shape == (0, 8)
x = torch.randn(1, 4096, dtype=torch.float16)
x[0, :8] = 400.0                                                # fp16 activation outliers stay finite
w = torch.full((4, 4096), 127, dtype=torch.int8)
out = w8a16_linear(x, w, torch.full((4,), 1e-4, dtype=torch.float16), path="triton")
assert torch.isfinite(out).all(), out
print("ok")
"""


@needs_triton
def test_kernel_in_the_interpreter_on_every_shape_that_can_go_wrong():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", INTERPRETER_CASES], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


@needs_triton
def test_kernel_in_the_interpreter_matches_the_reference_and_passes_its_own_check():
    code = (
        "import torch\n"
        "from w8a16 import ops\n"
        "from w8a16.ops import gpu\n"
        "x = torch.randn(3, 300, dtype=torch.bfloat16)\n"
        "w = torch.randint(-127, 128, (37, 300), dtype=torch.int8)\n"
        "s = torch.rand(37, dtype=torch.bfloat16) / 50\n"
        "assert 'triton' in ops.supported_paths(x, w, s)\n"
        "assert gpu.passes_first_use_check(x)\n"
        "out = ops.w8a16_linear(x, w, s, path='triton')\n"
        "ref = ops.reference_linear(x.double(), w, s.double())\n"
        "assert out.dtype == torch.bfloat16 and (out.double() - ref).abs().max() <= 2e-2 * ref.abs().max()\n"
        "print('ok')\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


def test_tensors_on_another_device_are_refused_before_any_pointer_is_taken():
    x = torch.randn(1, 64)
    with pytest.raises(ValueError, match="must be on"):
        gpu.triton_linear(x, torch.zeros(8, 64, dtype=torch.int8, device="meta"), torch.ones(8))


def test_a_failure_on_a_later_shape_falls_back_to_the_reference_and_switches_off(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("out of resources on this shape")

    monkeypatch.setattr(gpu, "_checked", {})
    monkeypatch.setattr(gpu, "triton_linear", broken)
    monkeypatch.setattr(dispatch, "choose_path", lambda *args: "triton")  # as on CUDA at decode
    x = torch.randn(1, 64)
    w = torch.randint(-127, 128, (8, 64), dtype=torch.int8)
    s = torch.rand(8) / 50
    with pytest.warns(RuntimeWarning, match="switched off.*out of resources"):
        out = ops.w8a16_linear(x, w, s)
    assert torch.allclose(out, ops.reference_linear(x, w, s))
    assert gpu._checked[(str(x.device), x.dtype)] is False


BEYOND_INT32 = """
import torch
from w8a16.ops import gpu

# N·K > 2³¹: rows past byte 2³¹ of the weight are only reachable with 64-bit offsets (int32 would wrap around
# to the start of the weight). One weight tile per program, so the interpreter has few steps to run.
k, n = 1 << 16, (1 << 15) + 64
gpu.INTERPRETER_BLOCKS.update(BLOCK_N=16, BLOCK_K=k)  # 2²⁰ weight elements: the interpreter's largest tile
w = torch.zeros(n, k, dtype=torch.int8)
w[-64:] = torch.randint(-127, 128, (64, k), dtype=torch.int8)
w[:64] = 1  # what a wrapped-around offset would read instead
s = torch.rand(n) / 50 + 1e-3
x = torch.randn(1, k)
out = gpu.triton_linear(x, w, s)
ref = (x.double() @ w[-64:].double().T) * s[-64:].double()
assert out.shape == (1, n)
assert torch.allclose(out[:, -64:].double(), ref, rtol=1e-4, atol=1e-3), (out[:, -64:] - ref).abs().max()
print("ok")
"""


@needs_triton
def test_offsets_past_two_to_the_31_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", BEYOND_INT32], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900, check=False)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]
