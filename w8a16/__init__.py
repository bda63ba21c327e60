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
)
from .quantizer import QuantizationReport, Quantizer, footprint_bytes, quantize_model
from .io.serialization import QuantizedFormatError, load_quantized, save_quantized

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
    "per_tensor_scale",
    "per_channel_scales",
    "per_group_scales",
    "quantize",
    "dequantize",
    "error_stats",
    "ErrorStats",
    "backend_info",
]
