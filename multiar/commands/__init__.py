"""The commands behind the console script: generate, eval, score, quantize, export."""
