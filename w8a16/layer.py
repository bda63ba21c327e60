"""`W8A16LinearLayer` and `W8A16Conv2d`: drop-ins for `nn.Linear` and `nn.Conv2d` that store int8 weights and one
scale per output row (Linear) or output channel (Conv2d).

    y = x @ (int8_weights · scales[:, None]).T + bias        # ops.reference_linear: fp32 inside, one rounding

The module owns three buffers and calls one registered op (`ops.linear`, i.e. ``torch.ops.w8a16.linear``), so
``torch.compile``, ``torch.export``, autocast and autograd all see an ordinary PyTorch op. Buffers, not
parameters, because the weights are not trained; ``Module.to(dtype)`` only casts floating-point tensors, so
``model.half()`` casts the scales and the bias but never the int8 weights. A bias may be made a trainable
``nn.Parameter`` (BitFit): gradients flow to it, and to the input (LoRA on a frozen quantized base).

One cache, for speed only: at decode every layer is called once per token for a single row of x, and the op's
generic checks and dispatch cost about as much as reading a 1024×1024 int8 weight. So in eager mode, once the
dispatcher has chosen the C kernel for this layer, the layer keeps its weights' prepared pointers
(`native.PreparedWeights`) and later decode calls go straight to the kernel. The cache is dropped whenever a
buffer is replaced, moved or cast (``.to()``, ``load_state_dict(assign=True)``, ``layer.bias = ...``), and it
is never consulted while tracing.

`W8A16Conv2d` is simpler (see its docstring): it dequantizes its weight and calls ``F.conv2d``.

Both classes say which float modules they stand in for, so the model walker (`quantizer.py`) can take a list of
them: ``replaces(module)`` (is this the kind of float module I replace?), ``cannot_replace(module)`` (why this
particular one would change the model if swapped, or None) and ``from_float(module)``.
"""

from __future__ import annotations

import sys
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from . import ops, quant
from .ops import native
from .ops.cpu import aligned_copy, is_aligned, return_freed_heap
from .ops.reference import accumulate_dtype

_BUFFERS = ("int8_weights", "scales", "bias")


def hf_conv1d() -> type[nn.Module] | None:
    """transformers' `Conv1D` class, or None while transformers is not loaded (a model holding one has loaded it,
    so there is no need to import transformers, about a second, just to look)."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` weight of an `nn.Linear`, or of a transformers `Conv1D` (stored ``(in, out)``: a view)."""
    if isinstance(module, nn.Linear):
        return module.weight
    conv1d = hf_conv1d()
    if conv1d is not None and isinstance(module, conv1d):
        return module.weight.t()
    raise TypeError(f"expected an nn.Linear or a transformers Conv1D, got {type(module).__name__}")


def is_linear_like(module: nn.Module) -> bool:
    """An `nn.Linear` (or subclass) or a transformers `Conv1D`: what `W8A16LinearLayer.from_linear` accepts."""
    conv1d = hf_conv1d()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


@torch.no_grad()
def quantize_rows(weights: torch.Tensor, dtype: torch.dtype, *, method: str = "absmax"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scales (absmax, or ``method="mse"``'s clipping search) of a 2-D ``weights``:
    ``(int8 (out, in), scales (out,) in dtype)``.

    The scale is first rounded to ``dtype`` (the layer's) and the int8 values are computed against that stored
    scale, so ``int8 * scales`` is the best dequantization the stored numbers allow. For fp32 this is
    bit-identical to ``round(W / (|W|.max(-1) / 127))``.
    """
    # What quantizing the layers before this one freed (their float weights, fp32 temporaries): glibc may keep
    # it all resident otherwise. Here, so the walker, loading and a user's own loop over layers all get it.
    return_freed_heap()
    quant.check_weights(weights, finite=False)
    if method != "absmax" and weights.is_meta:
        quant.per_channel_scales(weights[:0], method=method)  # still reject an unknown method on meta
        method = "absmax"  # no values to search: the scales' shape and dtype are all a meta layer has
    scales = quant.per_channel_scales(weights, method=method)
    if not weights.is_meta and not torch.isfinite(scales).all():  # NaN/Inf somewhere: say where
        quant.check_weights(weights)
    scales = scales.to(dtype)
    if not weights.is_meta and not torch.isfinite(scales).all():
        raise ValueError(f"weights up to {weights.abs().max().item():.3g} need scales that overflow {scales.dtype}")
    return quant.quantize(weights, scales), scales


def _refuse_bad_dtypes(state_dict: dict, prefix: str, where: str, error_msgs: list[str]) -> bool:
    """Append to ``error_msgs`` what ``load_state_dict`` would silently convert (float weights truncated to int8,
    integer scales); True if anything was refused."""
    weights, scales, bias = (state_dict.get(prefix + name) for name in _BUFFERS)
    errors = []
    if weights is not None and weights.dtype != torch.int8:
        errors.append(f"{where}: int8_weights must be int8, got {weights.dtype} (quantize float weights "
                      "with layer.quantize(w) instead)")
    for name, t in (("scales", scales), ("bias", bias)):
        if t is not None and not t.is_floating_point():
            errors.append(f"{where}: {name} must be floating point, got {t.dtype}")
    error_msgs.extend(errors)  # load_state_dict raises with them, naming the layer
    return bool(errors)


class W8A16LinearLayer(nn.Module):
    """int8 weights ``(out, in)``, ``scales`` ``(out,)`` and an optional ``bias`` ``(out,)``.

    ``forward`` accepts fp32, fp16 or bf16 inputs of any leading shape ``(..., in)`` and returns the input's
    dtype. ``dtype`` is the dtype of the scales and the bias, as in the seed.
    """

    float_kind: ClassVar[str] = "Linear"  # what the quantizer's report calls the layers it replaces
    float_modules: ClassVar[str] = "nn.Linear or transformers Conv1D"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be floating point (the dtype of scales and bias), got {dtype}")
        if in_features < 1 or out_features < 0:
            raise ValueError(
                f"W8A16LinearLayer({in_features}→{out_features}): in_features must be ≥ 1 (a row of no weights has "
                "no absmax to take a scale from) and out_features ≥ 0"
            )
        self.in_features = in_features
        self.out_features = out_features
        # Random int8 weights until quantize() or load_state_dict() fills them, as in the seed.
        self.register_buffer(
            "int8_weights",
            torch.randint(-128, 127, (out_features, in_features), dtype=torch.int8, device=device),
        )
        self.register_buffer("scales", torch.randn(out_features, dtype=dtype, device=device))
        self.register_buffer("bias", torch.randn(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def replaces(cls, module: nn.Module) -> bool:
        """The float modules this class stands in for: `nn.Linear` (and subclasses) and transformers' `Conv1D`."""
        return is_linear_like(module)

    @classmethod
    def cannot_replace(cls, module: nn.Module) -> str | None:
        """Why swapping this Linear-like module would change the model (its class has its own forward), or None."""
        base = nn.Linear if isinstance(module, nn.Linear) else hf_conv1d()
        if type(module).forward is not base.forward:  # e.g. a router returning (scores, logits), FalconLinear
            return (f"{type(module).__name__} overrides {base.__name__}.forward; a W8A16LinearLayer would drop what "
                    "it adds")
        return None

    @classmethod
    def from_float(cls, module: nn.Module, *, method: str = "absmax") -> "W8A16LinearLayer":
        """What the quantizer calls: `from_linear` (kept as the seed's name, and for subclasses that override it;
        ``method`` is passed on only when it is not the default, so a one-argument override keeps working)."""
        return cls.from_linear(module) if method == "absmax" else cls.from_linear(module, method=method)

    @classmethod
    def from_linear(cls, linear: nn.Module, *, method: str = "absmax") -> "W8A16LinearLayer":
        """Quantize an `nn.Linear` or a transformers `Conv1D`, keeping its dtype (for scales and bias) and device.

        ``method`` chooses the scales: ``"absmax"`` (the seed's) or ``"mse"`` (clipping searched per row, see
        `quant`).

        `Conv1D` (GPT-2, GPT, ImageGPT...) is a Linear whose weight is stored transposed, ``(in, out)``, and
        computes ``x @ W + b``; it is transposed on the way in, so the layer computes the same function.
        """
        weight = linear_weight(linear)
        out_features, in_features = weight.shape
        # Built on meta: quantize() replaces every buffer, so random placeholders would be wasted work.
        layer = cls(in_features, out_features, bias=linear.bias is not None, dtype=weight.dtype, device="meta")
        layer.quantize(weight, method=method)
        if linear.bias is not None:
            layer.bias = linear.bias.detach().clone()
        return layer

    @torch.no_grad()
    def quantize(self, weights: torch.Tensor, *, method: str = "absmax") -> None:
        """Per-channel absmax: ``scales = |W|.max(dim=-1) / 127``, ``int8 = round(W / scales)``.

        ``method="mse"`` instead picks each row's scale among clipped ones (``r · max|W| / 127``, r from 1 down
        to 0.5) to minimise that row's squared error; values beyond the clip saturate at ±127. At 8 bits the
        gain is small (notebook 08 measures it); it is here to compare, and for weights with outliers.

        The scale is first rounded to the layer's dtype and the int8 values are computed against that stored
        scale, so ``int8 * scales`` is the best dequantization the stored numbers allow. For fp32 weights this
        is bit-identical to the formula above.
        """
        quant.check_weights(weights, (self.out_features, self.in_features), finite=False)
        int8_weights, scales = quantize_rows(weights, self.scales.dtype, method=method)
        device = weights.device if self.int8_weights.is_meta else self.int8_weights.device
        # contiguous: the kernels read rows, and a transposed view (Conv1D's weight) would give column-major int8
        self.int8_weights = int8_weights.to(device).contiguous()
        self.scales = scales.to(device)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``int8 * scales`` as a dense ``(out, in)`` matrix, for error analysis."""
        return quant.dequantize(self.int8_weights, self.scales, dtype or self.scales.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """Read-only: the dequantized weight ``int8_weights * scales``, ``(out, in)``, in the scales' dtype.

        For code that reads a Linear's ``.weight`` itself instead of calling it (``nn.MultiheadAttention``,
        torch's fused encoder path, transformers' ``if layer.weight.dtype != ...``), as quanto and bitsandbytes
        keep a ``.weight``. Each access builds a new dense tensor as large as the float weight the quantization
        saved: fine for a dtype check, costly in a hot loop. A property, not a parameter or buffer, so it is in
        no ``state_dict``, and ``.to()``, copying and pickling never see it.
        """
        return self.dequantized_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._decode_step(x)
        if y is not None:
            return y
        self._check_input(x)
        self._prepare(x)
        return ops.linear(x, self.int8_weights, self.scales, self.bias)

    # ---- the eager decode cache (see the module docstring) -------------------------------------------------

    def _decode_step(self, x: torch.Tensor) -> torch.Tensor | None:
        """The C kernel straight on the prepared weights, or None where anything is not as it was prepared."""
        prepared = self.__dict__.get("_prepared")
        if prepared is None or torch.compiler.is_compiling() or type(x) is not torch.Tensor:
            return None  # nothing prepared, or tracing (compile, export): the op, never pointers
        buffers = self._buffers
        w, s, b = buffers.get("int8_weights"), buffers.get("scales"), buffers.get("bias")
        if not (w is not None and s is not None and w.is_contiguous() and prepared.is_for(w, s, b)):
            self._forget_prepared()  # a buffer was replaced, re-strided or its storage swapped
            return None
        if x.ndim == 0 or not 0 < x.numel() // self.in_features <= ops.dispatch.NATIVE_MAX_M:
            return None  # (the width of x is checked by `run`)
        if torch.is_grad_enabled() and x.requires_grad or torch.is_autocast_enabled("cpu"):
            return None  # the op knows autograd and autocast
        return prepared.run(x)

    def _prepare(self, x: torch.Tensor) -> None:
        """In eager mode on a CPU: align the weight once, and keep `native.PreparedWeights` where the C kernel serves
        this layer's decode calls."""
        if self.__dict__.get("_prepared") is not None or torch.compiler.is_compiling() or type(x) is not torch.Tensor:
            return
        w, s = self._buffers.get("int8_weights"), self._buffers.get("scales")
        if w is None or s is None or w.device.type != "cpu" or w.is_meta:
            return
        if not is_aligned(w) and not self.__dict__.get("_aligned_once"):
            # Once, not per call: the fast kernels read a 64-byte aligned weight fastest, and tensors loaded from a
            # safetensors file are often only 8-byte aligned. Same values, so state_dict agrees. Only once: a layer
            # whose weights are put in again before every call (accelerate's offload under a device_map) would
            # copy its weight per call, twice the bytes the kernel itself reads; it reads any alignment.
            self.int8_weights = w = aligned_copy(w)
            self.__dict__["_aligned_once"] = True
        if "bias" in self._buffers and x.dtype in native.DTYPES and ops.dispatch.native_supported(x, w, s):
            try:
                self.__dict__["_prepared"] = native.PreparedWeights(w, s, self._buffers["bias"])
            except ValueError:  # e.g. a bias of another dtype than the scales: the op converts them on every call
                pass

    def _forget_prepared(self) -> None:
        self.__dict__["_prepared"] = None

    def __setattr__(self, name: str, value) -> None:
        if name in _BUFFERS:
            self._forget_prepared()
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        if name in _BUFFERS:
            self._forget_prepared()
        super().__delattr__(name)

    def _apply(self, fn, recurse: bool = True):
        self._forget_prepared()  # .to(), .cuda(), .half(), to_empty(): the prepared pointers would be stale
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_prepared"] = None  # pointers into this process's memory: rebuilt on the first call after loading
        return state

    # ---- checks ---------------------------------------------------------------------------------------------

    def _check_input(self, x: torch.Tensor) -> None:
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(
                f"W8A16LinearLayer({self.in_features}→{self.out_features}) got input of shape "
                f"{tuple(x.shape)}; the last dimension must be {self.in_features}"
            )
        if not x.is_floating_point():
            raise ValueError(f"W8A16LinearLayer expects a floating-point input, got {x.dtype}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        """Refuse what ``load_state_dict`` would silently convert: float weights truncated to int8, integer scales."""
        where = f"W8A16LinearLayer {prefix.rstrip('.') or '(top level)'}"
        if _refuse_bad_dtypes(state_dict, prefix, where, error_msgs):
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._forget_prepared()

    def decode_path(self) -> str:
        """The path a one-row call in the layer's dtype takes here (``native``, ``triton``, ``int8pack``, ...)."""
        w, s = self.int8_weights, self.scales
        if w.is_meta:
            return "none yet (on meta)"
        probe = torch.zeros(1, self.in_features, dtype=s.dtype, device=w.device)
        return ops.choose_path(probe, w, s, self.bias)

    def extra_repr(self) -> str:
        decode = self.decode_path() if "bias" in self._parameters | self._buffers else "?"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, dtype={self.scales.dtype}, decode={decode}"
        )


# ------------------------------------------------------------------------------------------------------------------
# Conv2d
# ------------------------------------------------------------------------------------------------------------------

_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")  # all of nn.Conv2d's


def _pair(value: int | tuple[int, ...], what: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
        raise ValueError(f"{what} must be an int or a pair of ints, got {value!r}")
    return pair  # type: ignore[return-value]


class W8A16Conv2d(nn.Module):
    """int8 weights ``(out, in/groups, kh, kw)``, ``scales`` ``(out,)`` and an optional ``bias`` ``(out,)``.

    One scale per output channel: the absmax of that channel's whole filter (every input channel and kernel
    position) over 127, exactly the Linear layer's per-row scale applied to the filter flattened to a row.

    ``forward`` dequantizes the weight to the input's dtype — ``int8 · scale`` computed in fp32, as
    `ops.reference` does, then rounded once — and calls ``F.conv2d`` with the layer's stride, padding, dilation,
    groups and padding mode, exactly as ``nn.Conv2d`` does. Why not a kernel that reads int8 directly, as the
    Linear layer has: a convolution does far more arithmetic per weight than a matmul with a few rows (each
    weight meets every output pixel), so the time to dequantize a filter bank is small next to the convolution
    itself, and torch's convolution kernels are hard to beat. The dense weight is a temporary that lives during
    the call only, so the memory saving stays. Plain torch ops, so ``torch.compile`` and ``torch.export`` trace
    it (no registered op needed).

    The constructor mirrors ``nn.Conv2d``'s; ``dtype`` is the dtype of the scales and the bias.
    """

    float_kind: ClassVar[str] = "Conv2d"  # what the quantizer's report calls the layers it replaces
    float_modules: ClassVar[str] = "nn.Conv2d"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        name = f"W8A16Conv2d({in_channels}→{out_channels})"
        if not dtype.is_floating_point:
            raise ValueError(f"{name}: dtype must be floating point (the dtype of scales and bias), got {dtype}")
        if groups < 1 or in_channels < 1 or out_channels < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(f"{name}: channels must be ≥ 1 and divisible by groups={groups}")
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"{name}: padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.dilation = _pair(dilation, "dilation")
        if min(self.kernel_size + self.stride + self.dilation) < 1:
            raise ValueError(f"{name}: kernel_size, stride and dilation must be ≥ 1")
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"{name}: padding must be 'same', 'valid' or ints, got {padding!r}")
            if padding == "same" and self.stride != (1, 1):
                raise ValueError(f"{name}: padding='same' needs stride 1 (as in nn.Conv2d)")
            self.padding: tuple[int, int] | str = padding
        else:
            self.padding = _pair(padding, "padding")
            if min(self.padding) < 0:
                raise ValueError(f"{name}: padding must be ≥ 0")
        self.padding_mode = padding_mode
        kh, kw = self.kernel_size
        # Random int8 weights until quantize() or load_state_dict() fills them, as W8A16LinearLayer does.
        shape = (out_channels, in_channels // groups, kh, kw)
        self.register_buffer("int8_weights", torch.randint(-127, 128, shape, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.rand(out_channels, dtype=dtype, device=device) / 127)
        self.register_buffer("bias", torch.randn(out_channels, dtype=dtype, device=device) if bias else None)

    # ---- what the quantizer asks -----------------------------------------------------------------------------

    @classmethod
    def replaces(cls, module: nn.Module) -> bool:
        """The float modules this class stands in for: `nn.Conv2d` and its subclasses."""
        return isinstance(module, nn.Conv2d)

    @classmethod
    def cannot_replace(cls, module: nn.Module) -> str | None:
        """Why swapping this Conv2d would change the model, or None.

        A subclass that overrides ``forward`` or ``_conv_forward`` (weight standardisation, a fused activation)
        computes something else than ``F.conv2d`` with its weight.
        """
        for method in ("forward", "_conv_forward"):
            if getattr(type(module), method) is not getattr(nn.Conv2d, method):
                return (f"{type(module).__name__} overrides Conv2d.{method}; a W8A16Conv2d would drop what it "
                        "adds")
        return None

    @classmethod
    def from_float(cls, module: nn.Module, *, method: str = "absmax") -> "W8A16Conv2d":
        """What the quantizer calls: `from_conv2d`."""
        return cls.from_conv2d(module) if method == "absmax" else cls.from_conv2d(module, method=method)

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d, *, method: str = "absmax") -> "W8A16Conv2d":
        """Quantize an `nn.Conv2d`, keeping its hyperparameters, its dtype (for scales and bias) and device."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"expected an nn.Conv2d, got {type(conv).__name__}")
        layer = cls.empty_like(conv)  # on meta: quantize() replaces every buffer
        layer.quantize(conv.weight, method=method)
        if conv.bias is not None:
            layer.bias = conv.bias.detach().clone()
        return layer

    @classmethod
    def empty_like(cls, conv: nn.Conv2d, dtype: torch.dtype | None = None) -> "W8A16Conv2d":
        """An empty layer on ``meta`` with the convolution's hyperparameters and bias, its scales in ``dtype``
        (default: the convolution's): what a loader fills from a file, or `quantize` from the float weight."""
        return cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                   conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,
                   dtype=dtype or conv.weight.dtype, device="meta")

    @torch.no_grad()
    def quantize(self, weights: torch.Tensor, *, method: str = "absmax") -> None:
        """Per-output-channel absmax: ``scales = |W|.amax(dim=(1, 2, 3)) / 127``, ``int8 = round(W / scales)``.

        Each filter is flattened to a row and quantized as `W8A16LinearLayer.quantize` quantizes a row (scale
        rounded to the layer's dtype first; bit-identical to the formula for fp32 weights; ``method`` as there).
        """
        shape = tuple(self.int8_weights.shape)
        if tuple(weights.shape) != shape:
            raise ValueError(f"{self._name()}: weight has shape {tuple(weights.shape)}, expected {shape} "
                             "(out_channels, in_channels / groups, kh, kw)")
        try:
            int8_weights, scales = quantize_rows(weights.reshape(shape[0], -1), self.scales.dtype, method=method)
        except ValueError as err:  # the row/column of a NaN is that of the flattened filter: say so
            raise ValueError(f"{self._name()}: {err} (rows are output channels, columns flattened filters)") from err
        device = weights.device if self.int8_weights.is_meta else self.int8_weights.device
        self.int8_weights = int8_weights.reshape(shape).to(device).contiguous()
        self.scales = scales.to(device)

    # ---- the maths -------------------------------------------------------------------------------------------

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``int8 * scales`` as a dense ``(out, in/groups, kh, kw)`` tensor: the product in fp32 (fp64 for an fp64
        ``dtype``), rounded once to ``dtype`` (default: the scales' dtype)."""
        dtype = dtype or self.scales.dtype
        acc = accumulate_dtype(dtype)
        # Every int8 is exact in fp32, so this is one rounding per product. Convert, then multiply in place: about
        # 1.7× faster on a CPU than the mixed-dtype ``int8 * scales``, which gives the same bits.
        return self.int8_weights.to(acc).mul_(self.scales.to(acc)[:, None, None, None]).to(dtype)

    @property
    def weight(self) -> torch.Tensor:
        """Read-only: the dequantized weight, in the scales' dtype (a new dense tensor on every access; see
        `W8A16LinearLayer.weight` for why a quantized layer keeps a ``weight``)."""
        return self.dequantized_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        weight = self.dequantized_weight(x.dtype)  # (out, in/groups, kh, kw), a temporary
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.padding_mode != "zeros":  # as nn.Conv2d: pad explicitly, then convolve without padding
            x = F.pad(x, self._explicit_padding(), mode=self.padding_mode)
            return F.conv2d(x, weight, bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def _explicit_padding(self) -> tuple[int, int, int, int]:
        """``F.pad``'s (left, right, top, bottom) for the layer's padding; 'same' puts the odd pixel right/bottom."""
        if self.padding == "valid":
            return (0, 0, 0, 0)
        if self.padding == "same":
            pads = []
            for d, k in zip(reversed(self.dilation), reversed(self.kernel_size)):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            return tuple(pads)  # type: ignore[return-value]
        ph, pw = self.padding
        return (pw, pw, ph, ph)

    # ---- checks ------------------------------------------------------------------------------------------------

    def _name(self) -> str:
        kh, kw = self.kernel_size
        return f"W8A16Conv2d({self.in_channels}→{self.out_channels}, {kh}×{kw})"

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() not in (3, 4) or x.shape[-3] != self.in_channels:
            raise ValueError(
                f"{self._name()} got input of shape {tuple(x.shape)}; expected (N, {self.in_channels}, H, W) or "
                f"({self.in_channels}, H, W)"
            )
        if not x.is_floating_point():
            raise ValueError(f"{self._name()} expects a floating-point input, got {x.dtype}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        """Refuse what ``load_state_dict`` would silently convert: float weights truncated to int8, integer scales.
        (A wrong shape is refused by ``nn.Module`` itself, with the key's name.)"""
        if _refuse_bad_dtypes(state_dict, prefix, f"W8A16Conv2d {prefix.rstrip('.') or '(top level)'}", error_msgs):
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        text = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding!r}")
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        if self.padding_mode != "zeros":
            text += f", padding_mode={self.padding_mode!r}"
        bias = self._buffers.get("bias")
        return text + f", bias={bias is not None}, dtype={self.scales.dtype}"
