"""The engine: the model, sampling, the decode loop, speculative decoding, quantized and packed weights,
scoring, precision and the Hugging Face layout. Imports no Lightning, Hydra or domain code."""
