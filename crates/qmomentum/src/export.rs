//! Export of a trained quantized model to the integer runtime format (see `doc/model-format.md`).
