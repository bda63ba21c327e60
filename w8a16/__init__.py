"""w8a16: int8 weights with per-output-channel scales, 16-bit (or fp32) activations.

    from w8a16 import W8A16LinearLayer, Quantizer
    model = Quantizer(model, W8A16LinearLayer, ["lm_head"])
    model = Quantizer(model, [W8A16LinearLayer, W8A16Conv2d])      # convolutions too (a vision model)
"""

from .layer import W8A16Conv2d, W8A16LinearLayer
from .ops import backend_info
from .quant import (
    ErrorStats,
    dequantize,
    error_stats,
    per_channel_scales,
    per_group_scales,
    per_tensor_scale,
    quantize,
    quantize_dequantize,
)
from .quantizer import QuantizationReport, Quantizer, footprint_bytes, quantize_model
from .io.serialization import QuantizedFormatError, load_quantized, save_quantized
from .io import hf_hook

hf_hook.install()  # "w8a16" becomes a transformers quantization method once transformers loads its quantizers

__version__ = "0.1.0"


__all__ = [
    "W8A16LinearLayer",
    "W8A16Conv2d",
    "Quantizer",
    "quantize_model",
    "QuantizationReport",
    "footprint_bytes",
    "save_quantized",
    "load_quantized",
    "QuantizedFormatError",
    "export_onnx",
    "per_tensor_scale",
    "per_channel_scales",
    "per_group_scales",
    "quantize",
    "quantize_dequantize",
    "dequantize",
    "error_stats",
    "ErrorStats",
    "backend_info",
    "W8A16Config",
]


def __getattr__(name: str):
    # Imported on first use, so that `import w8a16` imports neither onnx and the ONNX exporter (export_onnx) nor
    # transformers' quantizer package (W8A16Config, about a second).
    if name == "export_onnx":
        from .io.onnx import export_onnx

        return export_onnx
    if name == "W8A16Config":
        from .io.hf import W8A16Config

        return W8A16Config
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
