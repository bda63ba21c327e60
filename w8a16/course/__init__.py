"""What only the notebook course uses: model loaders (`models`), figures (`plots`, `detection`), per-layer error
tables (`analysis`), fair timing (`timing`), the benchmark (`bench`), the setup cell (`notebook`) and the
self-checking exercises (`exercises`). The package proper (quant, layer, quantizer, ops, io) never imports it."""
