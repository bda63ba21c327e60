"""Getting quantized models in and out: save/load in safetensors (`serialization`) and ``python -m w8a16`` (`cli`)."""
