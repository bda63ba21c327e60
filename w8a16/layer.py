"""`W8A16LinearLayer`: a drop-in for `nn.Linear` that stores int8 weights and one scale per output row.

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
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from . import ops, quant
from .ops import native
from .ops.cpu import aligned_copy, is_aligned

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


class W8A16LinearLayer(nn.Module):
    """int8 weights ``(out, in)``, ``scales`` ``(out,)`` and an optional ``bias`` ``(out,)``.

    ``forward`` accepts fp32, fp16 or bf16 inputs of any leading shape ``(..., in)`` and returns the input's
    dtype. ``dtype`` is the dtype of the scales and the bias, as in the seed.
    """

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
        if method != "absmax" and weights.is_meta:
            quant.per_channel_scales(weights[:0], method=method)  # still reject an unknown method on meta
            method = "absmax"  # no values to search: the scales' shape and dtype are all a meta layer has
        scales = quant.per_channel_scales(weights, method=method)
        if not weights.is_meta and not torch.isfinite(scales).all():  # NaN/Inf somewhere: say where
            quant.check_weights(weights)
        scales = scales.to(self.scales.dtype)
        if not weights.is_meta and not torch.isfinite(scales).all():
            raise ValueError(f"weights up to {weights.abs().max().item():.3g} need scales that overflow {scales.dtype}")
        device = weights.device if self.int8_weights.is_meta else self.int8_weights.device
        # contiguous: the kernels read rows, and a transposed view (Conv1D's weight) would give column-major int8
        self.int8_weights = quant.quantize(weights, scales).to(device).contiguous()
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
            except ValueError:  # e.g. fp16 scales or a bias of another dtype: the op converts them on every call
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
        weights, scales, bias = (state_dict.get(prefix + name) for name in _BUFFERS)
        errors = []
        if weights is not None and weights.dtype != torch.int8:
            errors.append(f"{where}: int8_weights must be int8, got {weights.dtype} (quantize float weights "
                          "with layer.quantize(w) instead)")
        for name, t in (("scales", scales), ("bias", bias)):
            if t is not None and not t.is_floating_point():
                errors.append(f"{where}: {name} must be floating point, got {t.dtype}")
        if errors:
            error_msgs.extend(errors)  # load_state_dict raises with them, naming this layer
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
