"""multiar: train and sample autoregressive models on symbolic data (music, code, proteins)."""

__version__ = "0.1.0"
