"""`W8A16LinearLayer`: a drop-in for `nn.Linear` that stores int8 weights and one scale per output row.

The module is a thin shell around the functional core (`quant.py`) and the matmul (`kernels.py`): it owns
three buffers and checks its input. Buffers, not parameters, because nothing here is trained; and since
`Module.to(dtype)` only casts floating-point tensors, `model.half()` or `model.to(torch.bfloat16)` casts the
scales and the bias but can never touch the int8 weights.
"""

from __future__ import annotations

import torch
from torch import nn

from . import kernels, native, quant
from .kernels import aligned_copy, is_aligned, w8a16_linear


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
        self.in_features = in_features
        self.out_features = out_features
        # Random int8 weights until quantize() or load_state_dict() fills them, as in the seed.
        self.register_buffer(
            "int8_weights",
            torch.randint(-128, 127, (out_features, in_features), dtype=torch.int8, device=device),
        )
        self.register_buffer("scales", torch.randn(out_features, dtype=dtype, device=device))
        self.register_buffer("bias", torch.randn(out_features, dtype=dtype, device=device) if bias else None)
        self._decode: native.PreparedWeights | None = None  # see _decode_step

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "W8A16LinearLayer":
        """Quantize an `nn.Linear`, keeping its dtype (for scales and bias) and device."""
        # Built on meta: quantize() replaces every buffer, so random placeholders would be wasted work.
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            dtype=linear.weight.dtype,
            device="meta",
        )
        layer.quantize(linear.weight)
        if linear.bias is not None:
            layer.bias = linear.bias.detach().clone()
        return layer

    @torch.no_grad()
    def quantize(self, weights: torch.Tensor) -> None:
        """Per-channel absmax: ``scales = |W|.max(dim=-1) / 127``, ``int8 = round(W / scales)``.

        The scale is first rounded to the layer's dtype and the int8 values are computed against that stored
        scale, so ``int8 * scales`` is the best dequantization the stored numbers allow. For fp32 weights this
        is bit-identical to the formula above.
        """
        quant.check_weights(weights, (self.out_features, self.in_features), finite=False)
        scales = quant.per_channel_scales(weights)
        if not weights.is_meta and not torch.isfinite(scales).all():  # NaN/Inf somewhere: say where
            quant.check_weights(weights)
        scales = scales.to(self.scales.dtype)
        if not weights.is_meta and not torch.isfinite(scales).all():
            raise ValueError(f"weights up to {weights.abs().max().item():.3g} need scales that overflow {scales.dtype}")
        device = weights.device if self.int8_weights.is_meta else self.int8_weights.device
        self.int8_weights = quant.quantize(weights, scales).to(device)
        self.scales = scales.to(device)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``int8 * scales`` as a dense ``(out, in)`` matrix, for error analysis."""
        return quant.dequantize(self.int8_weights, self.scales, dtype or self.scales.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._decode_step(x)
        return y if y is not None else self._checked_forward(x)

    def _decode_step(self, x: torch.Tensor) -> torch.Tensor | None:
        """The native decode path with nothing but the per-call checks, or None to take `_checked_forward`.

        A decode step calls every layer once for a single row of x, so the general path's checks, dispatch and
        conversions (~30 µs) cost about as much as reading a 1024×1024 int8 weight; they are done once, in
        `_checked_forward`, which leaves a `native.PreparedWeights` here when the dispatcher chose ``native``.
        This repeats that choice for the cases it covers (`kernels.choose_path`) and nothing else.
        """
        prepared = self.__dict__.get("_decode")
        if prepared is None:
            return None
        buffers = self._buffers
        if not prepared.is_for(buffers["int8_weights"], buffers["scales"], buffers["bias"]):
            return None
        if x.ndim == 0 or not 0 < x.numel() // self.in_features <= kernels.NATIVE_MAX_M:
            return None  # (the width of x is checked by `run`)
        if torch.is_grad_enabled() and (x.requires_grad or prepared.scales.requires_grad):
            return None
        return prepared.run(x)

    def _checked_forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(
                f"W8A16LinearLayer({self.in_features}→{self.out_features}) got input of shape "
                f"{tuple(x.shape)}; the last dimension must be {self.in_features}"
            )
        if not x.is_floating_point():
            raise ValueError(f"W8A16LinearLayer expects a floating-point input, got {x.dtype}")
        if self.int8_weights.device.type == "cpu" and not is_aligned(self.int8_weights):
            # Once, not per call: the fast CPU kernel needs a contiguous, 64-byte aligned weight, and tensors
            # loaded from a safetensors file are often only 8-byte aligned. Same values, so state_dict agrees.
            self.int8_weights = aligned_copy(self.int8_weights)
        if self.scales.dtype in native.DTYPES and kernels.choose_path(x, self.int8_weights, self.scales) == "native":
            try:
                self._decode = native.PreparedWeights(self.int8_weights, self.scales, self.bias)
            except ValueError:  # e.g. a bias of another dtype: the general path converts it on every call
                self._decode = None
        return w8a16_linear(x, self.int8_weights, self.scales, self.bias)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_decode"] = None  # pointers into this process's memory: rebuilt on the first call after loading
        return state

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, dtype={self.scales.dtype}"
        )
