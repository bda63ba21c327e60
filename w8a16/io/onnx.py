"""`export_onnx`: a quantized model to an ONNX file that keeps its weights in int8.

Each ``torch.ops.w8a16.linear`` node becomes standard ONNX::

    W   = DequantizeLinear(int8_weights (out, in), scales (out,) fp32, zero_point (out,) int8 0, axis=0)
    y   = MatMul(Cast(x, fp32), Transpose(W))  [+ bias]  → Cast back to x's dtype

which is this project's accuracy rule written in ONNX ops: the weight is dequantized in fp32, the products are
summed in fp32 and the result is rounded once to the input's dtype. The int8 matrix stays an int8 initializer,
so the file is about the quantized size (one byte per weight), not the float one.

Why this form and not onnxruntime's ``MatMulNBits``: ``DequantizeLinear`` with per-axis scales is in the ONNX
standard (opset ≥ 13), so any runtime runs it, and it represents our format exactly — one fp32 scale per output
row, symmetric, int8 — whatever the layer's width. ``MatMulNBits`` is a Microsoft contrib op that only
onnxruntime knows, is built for 4-bit block-wise weights (block sizes a power of two ≥ 16, unsigned storage with
a zero point), so a per-row scale over, say, 1000 inputs cannot be written in it without re-quantizing.

How: torch's dynamo-based exporter (``torch.onnx.export(..., dynamo=True)``, torch ≥ 2.6) traces the model with
``torch.export``, where our registered op stays one node, and ``custom_translation_table`` maps that node to the
onnxscript function below. ``onnx`` and ``onnxscript`` (what the exporter itself needs) are imported only when
this runs: install them with ``pip install "w8a16[onnx]"`` (which adds ``onnxruntime`` to run the file).

Running it with onnxruntime: its CPU optimizer recognises ``DequantizeLinear → MatMul`` and fuses it into its own
``MatMulNBits`` kernel (8 bits, which reads the int8 weight directly: the fused form is the fast one). By
default that kernel also quantizes the *activations* to int8 (``accuracy_level=4``), which makes the model W8A8:
on a test MLP, 0.7 % relative output error instead of 4e-7. `onnxruntime_session` sets the session option that
keeps the fused kernel's activations in fp32 (``accuracy_level=1``), so the file runs as the W8A16 it is.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

__all__ = ["export_onnx", "onnxruntime_session", "w8a16_linear_onnx", "ORT_FP32_ACCURACY"]

_EXTRA_HINT = 'ONNX export needs onnx and onnxscript: pip install "w8a16[onnx]" (which also installs onnxruntime)'

# ONNX TensorProto data types used below.
_FLOAT, _INT8 = 1, 3


def _require_onnx() -> Any:
    """Import onnxscript's opset (and check onnx is there), or raise an ImportError that names the extra."""
    try:
        import onnx  # noqa: F401 — the exporter writes with it
        from onnxscript import opset18
    except ImportError as err:
        raise ImportError(f"{_EXTRA_HINT} ({err})") from err
    return opset18


def w8a16_linear_onnx(x: Any, int8_weights: Any, scales: Any, bias: Any = None) -> Any:
    """The ONNX translation of ``torch.ops.w8a16.linear`` (an onnxscript function, traced by the exporter).

    Scales and bias are cast to fp32 (an exporter folds the cast into an fp32 initializer), whatever the layer's
    dtype, so a bf16 layer is dequantized exactly as the op dequantizes it and no runtime needs bf16 arithmetic.
    """
    import numpy as np

    op = _require_onnx()
    from onnxscript import ir

    scales32 = op.Cast(scales, to=_FLOAT)
    # (out,) int8 zeros, a constant of the file: the exported shapes are static, and a ConstantOfShape would be
    # left in the graph by the exporter's folding (it declines to fold ops that create tensors).
    zero_point = op.Constant(value=ir.tensor(np.zeros(int(scales.shape[0]), dtype=np.int8)))
    weight = op.DequantizeLinear(int8_weights, scales32, zero_point, axis=0)  # (out, in) fp32
    y = op.MatMul(op.Cast(x, to=_FLOAT), op.Transpose(weight, perm=[1, 0]))
    if bias is not None:
        y = op.Add(y, op.Cast(bias, to=_FLOAT))
    return op.CastLike(y, x)


# onnxruntime's session option for the fused DequantizeLinear→MatMul kernel: 1 computes in fp32 (W8A16), its
# default 4 quantizes activations to int8 (W8A8).
ORT_FP32_ACCURACY = ("session.qdq_matmulnbits_accuracy_level", "1")


def onnxruntime_session(path: str | os.PathLike, *, fp32_activations: bool = True, **session_kwargs: Any) -> Any:
    """An ``onnxruntime.InferenceSession`` on the CPU for an exported file, computing as W8A16 by default.

    ``fp32_activations=False`` leaves onnxruntime's default, which quantizes activations to int8 in its fused
    weight-only kernel (faster on some CPUs, ~1 % output error — measure it on your model before choosing it).
    """
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise ImportError(f'running an exported file needs onnxruntime: pip install "w8a16[onnx]" ({err})') from err
    options = session_kwargs.pop("sess_options", None) or ort.SessionOptions()
    if fp32_activations:
        options.add_session_config_entry(*ORT_FP32_ACCURACY)
    session_kwargs.setdefault("providers", ["CPUExecutionProvider"])
    return ort.InferenceSession(str(path), options, **session_kwargs)


def _strip_debug_metadata(graph: Any) -> None:
    """Drop the exporter's per-node debugging records (the Python stack trace, module path and FX node of each
    ONNX node). On a small transformer they are as large as the weights, and they hold this machine's file paths,
    so the same model would give files of different sizes on different machines. Subgraphs included."""
    for node in graph.node:
        del node.metadata_props[:]
        for attribute in node.attribute:
            if attribute.HasField("g"):
                _strip_debug_metadata(attribute.g)
            for sub in attribute.graphs:
                _strip_debug_metadata(sub)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Keep the exporter's informational chatter off stderr for the duration of one export.

    The exporter logs a warning per torchvision op it cannot register when torchvision is absent, onnxscript's
    constant folder logs each constant it declines to fold, and torch.export may emit a FutureWarning from
    pytree internals: none concerns the exported model. Errors still propagate as exceptions.
    """
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def _without_kv_cache(model: nn.Module) -> Iterator[None]:
    """``config.use_cache = False`` while exporting a transformers model, as it was afterwards."""
    config = getattr(model, "config", None)
    had = getattr(config, "use_cache", None)
    if had:
        config.use_cache = False
    try:
        yield
    finally:
        if had:
            config.use_cache = had


def export_onnx(
    model: nn.Module,
    example_args: tuple[Any, ...] | torch.Tensor,
    path: str | os.PathLike,
    *,
    example_kwargs: dict[str, Any] | None = None,
    dynamic_shapes: Any = None,
    opset_version: int | None = None,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
) -> Path:
    """Export ``model`` (quantized with `Quantizer`, or not) to ONNX at ``path`` and return the path.

    ``example_args`` (a tensor or a tuple) and ``example_kwargs`` are what ``model`` is called with while it is
    traced; ``dynamic_shapes`` is passed to ``torch.export`` (e.g. ``({0: torch.export.Dim("batch")},)``) — by
    default every shape is fixed to the example's. Put the model in ``eval()`` first, as for any export: the
    model is traced in whatever mode it is in. A transformers model is traced with ``use_cache=False`` (its
    key/value cache object cannot be an ONNX output): the file computes the logits of the whole input. The file is written in one piece (no external data), so
    its size on disk is the model's — about one byte per quantized weight — and, as one protobuf, it must stay
    under 2 GB. The exporter's per-node debugging records (stack traces) are removed.

    Raises ImportError, naming the ``w8a16[onnx]`` extra, when onnx or onnxscript is missing.
    """
    _require_onnx()
    import onnx

    args = (example_args,) if isinstance(example_args, torch.Tensor) else tuple(example_args)
    path = Path(path)
    with _quiet_exporter(), _without_kv_cache(model):
        program = torch.onnx.export(
            model,
            args,
            kwargs=example_kwargs,
            dynamo=True,
            verbose=False,
            opset_version=opset_version,
            dynamic_shapes=dynamic_shapes,
            input_names=input_names,
            output_names=output_names,
            custom_translation_table={torch.ops.w8a16.linear.default: w8a16_linear_onnx},
        )
    proto = program.model_proto
    _strip_debug_metadata(proto.graph)
    onnx.save(proto, str(path))
    return path
