"""The W8A16 matmul as a registered PyTorch op, ``torch.ops.w8a16.linear``, and the paths behind it.

Why an op and not plain Python: ``torch.compile(fullgraph=True)`` and ``torch.export`` trace a model with fake
tensors that have no data, so a forward that takes data pointers (the C and Triton kernels do) or compares them
cannot be traced. Registered with `torch.library.custom_op`, the matmul is one opaque node: tracing sees only
its fake implementation (the output's shape and dtype), and at run time the node calls `dispatch.w8a16_linear`,
which picks the fastest correct path. `torch.library.register_autograd` gives it a backward that keeps the
int8 weight (never a dequantized copy) and computes the input's gradient tile by tile.

Read in this order: `reference` (the maths every path reproduces), `dispatch` (which path, and why), then the
paths: `cpu` (tiled, int8pack), `..native` (the C kernel), `gpu` (Triton).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import cpu, dispatch, gpu
from .dispatch import PATHS, backend_info, choose_path, supported_paths, w8a16_linear
from .reference import reference_linear


@torch.library.custom_op("w8a16::linear", mutates_args=())
def _linear(x: Tensor, int8_weights: Tensor, scales: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    return w8a16_linear(x, int8_weights, scales, bias)


@_linear.register_fake
def _linear_fake(x: Tensor, int8_weights: Tensor, scales: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    torch._check(x.shape[-1] == int8_weights.shape[1], lambda: "x's last dimension must be in_features")
    return x.new_empty((*x.shape[:-1], int8_weights.shape[0]))


@torch.library.custom_op("w8a16::linear_grad_input", mutates_args=())
def _grad_input(grad: Tensor, int8_weights: Tensor, scales: Tensor) -> Tensor:
    return cpu.tiled_grad_input(grad, int8_weights, scales)


@_grad_input.register_fake
def _grad_input_fake(grad: Tensor, int8_weights: Tensor, scales: Tensor) -> Tensor:
    return grad.new_empty((*grad.shape[:-1], int8_weights.shape[1]))


def _setup_context(ctx, inputs, output) -> None:
    x, int8_weights, scales, bias = inputs
    # Saved: the int8 weight and the scales themselves (the layer's buffers: no copy). x only when the scales
    # are trained — a frozen base (LoRA) or a trained bias (BitFit) never needs it.
    ctx.save_for_backward(int8_weights, scales, x if scales.requires_grad else None)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad: Tensor):
    int8_weights, scales, x = ctx.saved_tensors
    n_out = int8_weights.shape[0]
    grad_x = grad_scales = grad_bias = None
    if ctx.needs_input_grad[0]:  # dL/dx = dL/dy @ (q · s)
        grad_x = torch.ops.w8a16.linear_grad_input(grad, int8_weights, scales)
    if ctx.needs_input_grad[2]:  # dL/ds[o] = Σ_rows dL/dy[o] · (x · q[o])
        xq = torch.ops.w8a16.linear(x.float(), int8_weights, torch.ones_like(scales, dtype=torch.float32), None)
        grad_scales = (grad.float() * xq).reshape(-1, n_out).sum(0).to(scales.dtype)
    if ctx.needs_input_grad[3]:  # dL/db = Σ_rows dL/dy
        grad_bias = grad.float().reshape(-1, n_out).sum(0).to(ctx.bias_dtype)
    return grad_x, None, grad_scales, grad_bias


_linear.register_autograd(_backward, setup_context=_setup_context)


def linear(x: Tensor, int8_weights: Tensor, scales: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x (..., in) @ (int8_weights (out, in) · scales (out,)).T + bias`` → ``(..., out)``, as a traceable op.

    Under ``torch.autocast`` the input is cast to the autocast dtype first, as ``nn.Linear``'s is, so the output
    has the dtype ``nn.Linear`` would give; the scales are never rounded to it (the accuracy rule).
    """
    if x.dtype != torch.float64 and torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    return torch.ops.w8a16.linear(x, int8_weights, scales, bias)


__all__ = [
    "linear", "reference_linear", "w8a16_linear", "choose_path", "supported_paths", "backend_info", "PATHS",
    "cpu", "dispatch", "gpu",
]
