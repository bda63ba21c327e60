"""ops.dispatch.w8a16_linear: every path against a float64 reference, on every shape that can go wrong."""

import os

import pytest
import torch
import torch.nn.functional as F

from w8a16 import W8A16LinearLayer, ops
from w8a16.ops import PATHS, cpu, dispatch, w8a16_linear

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Relative tolerance vs an fp64 reference on the same int8 weights and scales (scaled by max|ref|).
# fp32: ~1e-6 rounding; fp16/bf16: the activation dtype's own rounding of weights and outputs.
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
SHAPES = [(64, 32), (48, 5), (17, 3), (1000, 24), (4095, 7), (1024, 200)]  # (in, out)
LEADING = [(), (1,), (3,), (2, 5)]


def make_args(n_in, n_out, dtype, device, bias=True):
    w = torch.randint(-127, 128, (n_out, n_in), dtype=torch.int8, device=device)
    s = (torch.rand(n_out, device=device) / 50 + 1e-3).to(dtype)
    b = torch.randn(n_out, device=device).to(dtype) if bias else None
    return w, s, b


def fp64_reference(x, w, s, b):
    y = F.linear(x.double(), w.double() * s.double()[:, None])
    return y if b is None else y + b.double()


def assert_close(out, ref, dtype):
    assert out.dtype == dtype and out.shape == ref.shape and out.is_contiguous()
    assert torch.isfinite(out).all()
    scale = ref.abs().max().item() if ref.numel() else 0.0
    torch.testing.assert_close(out.double(), ref, rtol=TOL[dtype], atol=TOL[dtype] * scale + 1e-6)


def paths_for(x, w, s, b=None):
    return ops.supported_paths(x, w, s, b)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("leading", LEADING)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_path_matches_reference(dtype, shape, leading, bias, device):
    w, s, b = make_args(*shape, dtype, device, bias)
    x = torch.randn(*leading, shape[0], device=device).to(dtype)
    ref = fp64_reference(x, w, s, b)
    for path in paths_for(x, w, s, b):
        assert_close(w8a16_linear(x, w, s, b, path=path), ref, dtype)
    assert_close(w8a16_linear(x, w, s, b), ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 2, 17, 64, 65, 300])
def test_dispatch_across_batch_sizes(dtype, m, device):
    w, s, b = make_args(256, 96, dtype, device)
    x = torch.randn(m, 256, device=device).to(dtype)
    ref = fp64_reference(x, w, s, b)
    assert ops.choose_path(x, w, s) in paths_for(x, w, s)
    for path in paths_for(x, w, s, b):
        assert_close(w8a16_linear(x, w, s, b, path=path), ref, dtype)


def test_int8pack_is_only_offered_where_it_is_correct():
    x = torch.randn(2, 17, dtype=torch.bfloat16)
    w, s, _ = make_args(17, 8, torch.bfloat16, "cpu")
    assert "int8pack" not in paths_for(x, w, s)
    with pytest.raises(ValueError, match="not supported"):
        w8a16_linear(x, w, s, path="int8pack")
    assert ops.choose_path(x, w, s) != "int8pack"


def test_unknown_path_raises():
    w, s, _ = make_args(32, 4, torch.float32, "cpu")
    with pytest.raises(ValueError):
        w8a16_linear(torch.randn(2, 32), w, s, path="fastest")


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs(dtype, device):
    w, s, b = make_args(64, 48, dtype, device)
    base = torch.randn(5, 128, device=device).to(dtype)
    for x in (base[:, ::2], base.t().contiguous().t()[:, :64], torch.randn(64, 3, device=device).to(dtype).t()):
        ref = fp64_reference(x, w, s, b)
        for path in paths_for(x, w, s, b):
            assert_close(w8a16_linear(x, w, s, b, path=path), ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_weight_and_scales(dtype, device):
    w, s, b = make_args(64, 96, dtype, device)
    w_view, s_view, b_view = w[::2], s[::2], b[::2]  # every other output row: strided views
    x = torch.randn(3, 64, device=device).to(dtype)
    ref = fp64_reference(x, w_view, s_view, b_view)
    for path in paths_for(x, w_view, s_view, b_view):
        assert_close(w8a16_linear(x, w_view, s_view, b_view, path=path), ref, dtype)


@pytest.mark.parametrize("offset", [1, 8, 16, 32])
@pytest.mark.parametrize("dtype", DTYPES)
def test_misaligned_weight_and_activations(offset, dtype):
    """_weight_int8pack_mm segfaults on misaligned data: int8pack must copy, never crash."""
    n_out, n_in = 40, 64
    storage = torch.randint(-127, 128, (n_out * n_in + 64,), dtype=torch.int8)
    w = storage[offset : offset + n_out * n_in].view(n_out, n_in)
    assert w.data_ptr() % 64 != 0
    x_storage = torch.randn(3 * n_in + 64).to(dtype)
    x = x_storage[offset : offset + 3 * n_in].view(3, n_in)  # 2-4 byte offsets: the segfault case
    s = (torch.rand(n_out) / 50).to(dtype)
    ref = fp64_reference(x, w, s, None)
    assert ("int8pack" in paths_for(x, w, s)) == (dtype == torch.bfloat16)
    for path in paths_for(x, w, s):
        assert_close(w8a16_linear(x, w, s, path=path), ref, dtype)


def test_weight_loaded_from_safetensors(tmp_path):
    """Tensors read from a safetensors file are often only 8-byte aligned."""
    from safetensors.torch import load_file, save_file

    w, s, b = make_args(4096, 8, torch.bfloat16, "cpu")
    save_file({"a": torch.ones(3, dtype=torch.int8), "w": w}, tmp_path / "w.safetensors")
    loaded = load_file(tmp_path / "w.safetensors")["w"]
    x = torch.randn(2, 4096, dtype=torch.bfloat16)
    ref = fp64_reference(x, w, s, b)
    for path in paths_for(x, loaded, s, b):
        assert_close(w8a16_linear(x, loaded, s, b, path=path), ref, torch.bfloat16)


def test_layer_realigns_a_misaligned_weight_once_and_keeps_its_state():
    layer = W8A16LinearLayer(64, 40, bias=True, dtype=torch.bfloat16)
    storage = torch.randint(-127, 128, (40 * 64 + 8,), dtype=torch.int8)
    layer.int8_weights = storage[8:].view(40, 64)
    before = layer.int8_weights.clone()
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    ref = fp64_reference(x, before, layer.scales, layer.bias)
    assert_close(layer(x), ref, torch.bfloat16)
    assert cpu.is_aligned(layer.int8_weights)
    assert torch.equal(layer.state_dict()["int8_weights"], before)
    ptr = layer.int8_weights.data_ptr()
    layer(x)
    assert layer.int8_weights.data_ptr() == ptr  # realigned once, not on every call


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_rows(path, dtype):
    w, s, b = make_args(64, 8, dtype, "cpu")
    x = torch.randn(0, 64).to(dtype)
    if path not in ops.supported_paths(x, w, s, b):
        pytest.skip(f"{path} does not run on this machine")
    out = w8a16_linear(x, w, s, b, path=path)
    assert out.shape == (0, 8) and out.dtype == dtype
    x3 = torch.randn(2, 0, 64).to(dtype)
    assert w8a16_linear(x3, w, s, b).shape == (2, 0, 8)


def test_all_zero_weight_rows_give_bias():
    w, s, b = make_args(64, 8, torch.float32, "cpu")
    w[3] = 0
    s[3] = 0
    x = torch.randn(4, 64)
    for path in paths_for(x, w, s, b):
        assert torch.equal(w8a16_linear(x, w, s, b, path=path)[:, 3], b[3].expand(4))


@pytest.mark.parametrize("m", [1, 8, 300])
def test_fp16_outliers_stay_finite_and_accurate(m, device):
    """A few of 4096 channels at a few hundred: Σ x·q overflows fp16, Σ x·(q·s) does not."""
    w, s, b = make_args(4096, 64, torch.float16, device)
    s = (torch.rand(64, device=device) / 127 * 0.05 + 1e-4).half()  # |W| ≤ 0.05, as in a trained layer
    x = torch.randn(m, 4096, device=device)
    x[:, :6] = 400.0
    x16 = x.half()
    assert not torch.isfinite(F.linear(x16, w.half())).all() or device.type != "cpu"  # the un-scaled sum overflows
    ref = fp64_reference(x16, w, s, b)
    for path in paths_for(x16, w, s, b):
        out = w8a16_linear(x16, w, s, b, path=path)
        assert torch.isfinite(out).all(), path
        torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


def test_fp32_is_as_accurate_as_fp32():
    """The fp32 paths keep fp32 precision (no silent bf16 anywhere)."""
    w, s, b = make_args(4096, 64, torch.float32, "cpu")
    x = torch.randn(1, 4096)
    ref = fp64_reference(x, w, s, b)
    for path in paths_for(x, w, s, b):
        err = (w8a16_linear(x, w, s, b, path=path).double() - ref).abs().max() / ref.abs().max()
        assert err < 1e-5, (path, err.item())


def test_scales_and_bias_of_another_dtype_are_used_exactly():
    """fp32 scales with bf16 activations: dequantized in fp32, never rounded to bf16 first."""
    w, s, b = make_args(64, 16, torch.float32, "cpu")
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    ref = fp64_reference(x, w, s, b)
    for path in paths_for(x, w, s, b):
        assert_close(w8a16_linear(x, w, s, b, path=path), ref, torch.bfloat16)


@pytest.mark.parametrize("weight_size", [1e-5, 1e-6])
def test_fp16_activations_with_tiny_fp32_scales_keep_fp16_accuracy(weight_size, device):
    """Scales rounded to fp16 first lose 6–8 % at 1e-5 and 97 % at 1e-6 (subnormal); the rule keeps them exact."""
    w = torch.randint(-127, 128, (64, 256), dtype=torch.int8, device=device)
    s = torch.full((64,), weight_size / 127, device=device) * (1 + torch.rand(64, device=device))
    x = torch.randn(4, 256, device=device).half() * 100
    ref = fp64_reference(x, w, s, None)
    for path in paths_for(x, w, s):
        out = w8a16_linear(x, w, s, path=path)
        rel = ((out.double() - ref).abs().max() / ref.abs().max()).item()
        assert rel < 2e-3, (path, rel)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_overflow_gives_inf_like_nn_linear_never_nan(dtype, device):
    big = 1e38 if dtype == torch.bfloat16 else 6e4
    x = torch.full((2, 64), big, device=device).to(dtype)
    x[1] = -x[1]
    w = torch.full((8, 64), 127, dtype=torch.int8, device=device)
    s = torch.full((8,), 0.5 / 127, device=device).to(dtype)
    dense = F.linear(x, (w.float() * s.float()[:, None]).to(dtype))  # nn.Linear with the same weights
    assert torch.isinf(dense).all() and (dense[0] > 0).all() and (dense[1] < 0).all()
    for path in paths_for(x, w, s):
        out = w8a16_linear(x, w, s, path=path)
        assert not torch.isnan(out).any(), path
        assert torch.equal(out, dense), path


def test_tiny_tiles_cover_every_row():
    w, s, b = make_args(64, 37, torch.float32, "cpu")
    x = torch.randn(5, 64)
    out = cpu.tiled_linear(x, w, s, b, tile_bytes=64 * 4 * 5)  # 5 rows per tile, 37 = 7·5 + 2
    assert_close(out, fp64_reference(x, w, s, b), torch.float32)


def test_aligned_copy():
    t = torch.arange(100, dtype=torch.int8)[3:].view(97)
    c = cpu.aligned_copy(t)
    assert cpu.is_aligned(c) and torch.equal(c, t)
    assert not cpu.is_aligned(t)


def test_cuda_dispatch_uses_dequantize_then_gemm(device):
    w, s, b = make_args(64, 8, torch.float16, device)
    x = torch.randn(2, 64, device=device).half()
    expected = "reference" if device.type == "cuda" else ops.choose_path(x, w, s)
    assert ops.choose_path(x, w, s) == expected
    assert_close(w8a16_linear(x, w, s, b), fp64_reference(x, w, s, b), torch.float16)


def test_the_dispatch_ignores_autograd_the_op_handles_it():
    """Every path serves inputs that need grad: the registered op (ops.linear) owns the backward."""
    w, s, b = make_args(64, 8, torch.bfloat16, "cpu")
    x = torch.randn(2, 64, dtype=torch.bfloat16, requires_grad=True)
    assert ops.choose_path(x, w, s, b) != "reference"
    ops.linear(x, w, s, b).float().sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_realigned_layer_round_trips_state_dict_and_to():
    layer = W8A16LinearLayer(64, 40, bias=False, dtype=torch.bfloat16)
    storage = torch.randint(-127, 128, (40 * 64 + 8,), dtype=torch.int8)
    layer.int8_weights = storage[8:].view(40, 64)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    out = layer(x)  # realigns
    other = W8A16LinearLayer(64, 40, bias=False, dtype=torch.bfloat16)
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other(x), out)
    half = layer.to(torch.float16)
    assert half.int8_weights.dtype == torch.int8 and half(x.half()).dtype == torch.float16


@pytest.mark.parametrize(
    "bad",
    [
        dict(scales=torch.rand(8, 1)),  # would broadcast to (8, 8, 64) in a naive dequantize
        dict(scales=torch.rand(7)),
        dict(bias=torch.rand(9)),
        dict(w=torch.randint(-127, 128, (8, 64), dtype=torch.int16)),
        dict(x=torch.randn(2, 63)),
        dict(x=torch.randint(0, 3, (2, 64))),
    ],
)
def test_bad_arguments_raise(bad):
    w = torch.randint(-127, 128, (8, 64), dtype=torch.int8)
    args = dict(x=torch.randn(2, 64), w=w, scales=torch.rand(8), bias=None)
    args.update(bad)
    with pytest.raises(ValueError):
        w8a16_linear(args["x"], args["w"], args["scales"], args["bias"])


def test_native_kernel_builds_here_and_is_chosen_for_decode(monkeypatch):
    """This machine has a C compiler, so decode-sized calls must take the native path (or say why not)."""
    from w8a16.ops import native

    monkeypatch.delenv("W8A16_NATIVE", raising=False)  # CI also runs the suite with it switched off
    monkeypatch.setattr(native, "_state", {})
    assert native.library() is not None, native.unavailable_reason()
    w, s, b = make_args(4095, 33, torch.float32, "cpu")  # odd in_features: the C tail loop
    x = torch.randn(1, 4095)
    if native.simd() is None:  # built, but only as a scalar loop (arm64 for now, or W8A16_NATIVE_SIMD=scalar)
        assert ops.choose_path(x, w, s) != "native" and "scalar" in ops.backend_info()["native"]["reason"]
        return
    assert ops.choose_path(x, w, s) == "native"
    assert ops.choose_path(torch.randn(dispatch.NATIVE_MAX_M + 1, 4095), w, s) != "native"
    assert_close(w8a16_linear(x, w, s, b), fp64_reference(x, w, s, b), torch.float32)


def test_native_kernel_off_falls_back(monkeypatch):
    from w8a16.ops import native

    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("W8A16_NATIVE", "0")
    w, s, b = make_args(64, 8, torch.bfloat16, "cpu")
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    assert "native" not in ops.supported_paths(x, w, s)
    assert native.unavailable_reason() == "switched off by W8A16_NATIVE=0"
    assert_close(w8a16_linear(x, w, s, b), fp64_reference(x, w, s, b), torch.bfloat16)
    with pytest.raises(RuntimeError, match="W8A16_NATIVE=0"):
        native.gemv(x, w, s, b)


def test_native_build_failure_falls_back(monkeypatch, tmp_path):
    from w8a16.ops import native

    monkeypatch.delenv("W8A16_NATIVE", raising=False)
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(native.tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    w, s, b = make_args(64, 8, torch.float32, "cpu")
    x = torch.randn(1, 64)
    assert "native" not in ops.supported_paths(x, w, s)
    assert "could not build" in native.unavailable_reason()
    assert_close(w8a16_linear(x, w, s, b), fp64_reference(x, w, s, b), torch.float32)


def test_native_refuses_a_directory_others_can_write(monkeypatch, tmp_path):
    from w8a16.ops import native

    monkeypatch.delenv("W8A16_NATIVE", raising=False)
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(native.tempfile, "gettempdir", lambda: str(tmp_path))
    shared = tmp_path / f"w8a16-native-{os.getuid()}"
    shared.mkdir()
    shared.chmod(0o777)
    assert native.library() is None
    assert "not a private directory" in native.unavailable_reason()


def test_fp64_inputs_keep_fp64_precision():
    """The fast paths compute in fp32; an fp64 input goes to the reference, which stays in fp64."""
    w, s, b = make_args(1000, 24, torch.float64, "cpu")
    x = torch.randn(1, 1000, dtype=torch.float64)
    assert ops.supported_paths(x, w, s) == ["reference"] and ops.choose_path(x, w, s) == "reference"
    out = w8a16_linear(x, w, s, b)
    torch.testing.assert_close(out, fp64_reference(x, w, s, b), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("one_gemm", [True, False], ids=["one-gemm", "tiles"])
def test_tiled_one_gemm_and_tiles_agree_with_the_reference(monkeypatch, dtype, bias, one_gemm):
    """A small weight times many rows takes one addmm writing (M, out); otherwise tiles writing (out, M)."""
    monkeypatch.setattr(cpu, "ONE_GEMM_BYTES", 1 << 30 if one_gemm else 0)
    w, s, b = make_args(64, 37, dtype, "cpu")
    x = torch.randn(2, cpu.ONE_GEMM_MIN_M // 2 + 3, 64, dtype=dtype)  # M = ONE_GEMM_MIN_M + 6
    out = cpu.tiled_linear(x, w, s, b if bias else None)
    assert out.shape == (2, x.shape[1], 37) and out.dtype == dtype
    assert_close(out, fp64_reference(x, w, s, b if bias else None), dtype)


def test_an_explicit_tile_size_is_kept_for_a_small_weight_and_many_rows():
    w, s, b = make_args(64, 37, torch.float32, "cpu")
    x = torch.randn(cpu.ONE_GEMM_MIN_M, 64)
    out = cpu.tiled_linear(x, w, s, b, tile_bytes=64 * 4 * 5)  # 5 rows per tile: never the one-GEMM form
    assert_close(out, fp64_reference(x, w, s, b), torch.float32)
