"""Getting quantized models in and out: save/load in safetensors (`serialization`), ``python -m w8a16`` (`cli`) and
ONNX export (`onnx`, imported only when used)."""
