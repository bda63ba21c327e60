"""Quantization-aware training (QAT): train with the rounding in the forward, then convert to `W8A16LinearLayer`.

Post-training quantization rounds weights that were trained without knowing they would be rounded. QAT lets
training see the rounding: each Linear keeps its float weight as a trainable Parameter, and its forward uses the
weight *as it will be after quantization*::

    s  = per-row scale of W (absmax, or "mse" clipping), rounded to W's dtype as the layer rounds it
    Ŵ  = clamp(round(W / s), -Q, Q) · s          # fake quantization: float numbers on the int grid
    y  = x @ Ŵ.T + b                               # fp32 inside, rounded once to x's dtype (the op's rule)

round() has a zero gradient almost everywhere, so backward uses the straight-through estimator (STE): dŴ/dW is
taken as 1 where W is inside the clip range (|round(W/s)| ≤ Q) and 0 where it was clipped. The scale is treated as a
constant of each step (recomputed from W in the next forward), as in most weight-only QAT recipes.

    model = prepare_qat(model, exclude=["lm_head"], bits=4)   # nn.Linear -> FakeQuantLinear, in place
    ... train as usual ...
    convert(model)                                            # FakeQuantLinear -> W8A16LinearLayer

`convert` stores exactly the int8 values and scales the last fake-quant forward used, so the converted model
computes the same function (the same dequantized weight, bit for bit; outputs equal up to fp32 summation order,
as the op's kernels sum in another order than ``F.linear``). At ``bits < 8`` the values still occupy int8
storage (one byte per weight): the W8A16 layer runs them unchanged, without packing.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from torch.nn import functional as F

from . import quant
from .layer import W8A16LinearLayer
from .quantizer import _matches, _set_submodule

__all__ = ["FakeQuantLinear", "fake_quantize", "fake_quant_scales", "prepare_qat", "convert"]


def fake_quant_scales(weight: torch.Tensor, *, bits: int = 8, method: str = "absmax") -> torch.Tensor:
    """Per-row scales as `W8A16LinearLayer.quantize` stores them: computed in fp32, rounded to the weight's dtype,
    returned in fp32 (so fake quantization and the converted layer divide by the same number)."""
    return quant.per_channel_scales(weight, bits=bits, method=method).to(weight.dtype).float()


class _FakeQuantSTE(torch.autograd.Function):
    """Ŵ = clamp(round(W / s), -Q, Q) · s, with gradient ``grad · [|round(W/s)| ≤ Q]`` for W (straight-through)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, scales: torch.Tensor, qmax: int) -> torch.Tensor:
        w = weight.float()
        safe = torch.where(scales == 0, torch.ones_like(scales), scales)[:, None]
        rounded = torch.round(w / safe)
        # Inside the clip range: where the clamp changes nothing. Not |W/s| ≤ Q: W/s of a row's absmax element
        # can come out as 127.00001 in fp32, and that element is not clipped.
        ctx.save_for_backward(rounded.abs() <= qmax)
        ctx.dtype = weight.dtype
        return rounded.clamp_(-qmax, qmax) * scales[:, None]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inside,) = ctx.saved_tensors
        return (grad * inside).to(ctx.dtype), None, None


def fake_quantize(weight: torch.Tensor, *, bits: int = 8, method: str = "absmax") -> torch.Tensor:
    """The weight as the quantized layer will see it (fp32, ``(out, in)``), differentiable by the STE."""
    quant.check_weights(weight, finite=False)
    scales = fake_quant_scales(weight.detach(), bits=bits, method=method)
    return _FakeQuantSTE.apply(weight, scales, quant.q_max(bits))


class FakeQuantLinear(nn.Linear):
    """An `nn.Linear` whose forward multiplies by its fake-quantized weight; ``weight`` stays a float Parameter.

    A subclass of `nn.Linear`, so optimizers, ``state_dict`` and code that reads ``.weight`` see an ordinary
    Linear. ``bits`` (2–8) and ``method`` (``"absmax"``, or ``"mse"``: a clipping search at every step, about
    50× slower per forward) choose the grid.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, bits: int = 8,
                 method: str = "absmax", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        quant.q_max(bits)
        quant._check_method(method)
        self.bits, self.method = bits, method

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, bits: int = 8, method: str = "absmax") -> "FakeQuantLinear":
        """A FakeQuantLinear sharing nothing with ``linear``: its weight and bias are copied (same dtype, device)."""
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, bits=bits, method=method,
                    device="meta", dtype=w.dtype)
        layer.weight = nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        return layer

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight (fp32), differentiable: what this layer multiplies by."""
        return fake_quantize(self.weight, bits=self.bits, method=self.method)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 inside and one rounding at the end, as torch.ops.w8a16.linear computes after conversion.
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.quantized_weight(), bias).to(x.dtype)

    @torch.no_grad()
    def to_w8a16(self) -> W8A16LinearLayer:
        """The `W8A16LinearLayer` holding exactly this layer's current grid values and scales."""
        w = self.weight.detach()
        scales = fake_quant_scales(w, bits=self.bits, method=self.method)
        layer = W8A16LinearLayer(self.in_features, self.out_features, bias=self.bias is not None, dtype=w.dtype,
                                 device="meta")
        layer.int8_weights = quant.quantize(w, scales, bits=self.bits).contiguous()
        layer.scales = scales.to(w.dtype)
        if self.bias is not None:
            layer.bias = self.bias.detach().clone()
        return layer

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}, method={self.method!r}"


def prepare_qat(model: nn.Module, exclude: Iterable[str] = (), *, bits: int = 8,
                method: str = "absmax") -> nn.Module:
    """Swap every `nn.Linear` of ``model`` (not excluded) for a `FakeQuantLinear`, in place; returns ``model``.

    ``exclude`` takes the names and globs `Quantizer` takes. Only plain ``nn.Linear`` modules are swapped (not
    subclasses, not transformers' Conv1D): what is left is an ordinary float model to train.
    """
    quant.q_max(bits)
    quant._check_method(method)
    patterns = [exclude] if isinstance(exclude, str) else list(exclude)
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or not name or any(_matches(name, p) for p in patterns):
            continue
        _set_submodule(model, name, FakeQuantLinear.from_linear(module, bits=bits, method=method))
    return model


def convert(model: nn.Module) -> nn.Module:
    """Replace every `FakeQuantLinear` of ``model`` by its `W8A16LinearLayer`, in place; returns ``model``."""
    for name, module in list(model.named_modules()):
        if isinstance(module, FakeQuantLinear):
            if not name:
                raise ValueError("the model is itself a FakeQuantLinear: use model.to_w8a16() instead")
            _set_submodule(model, name, module.to_w8a16())
    return model
