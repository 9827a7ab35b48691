"""The data path: sources (files, HF datasets), the token cache, packing and the DataModule, streaming,
fill-in-the-middle, and the run's reference documents."""
