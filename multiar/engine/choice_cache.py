"""Measured choices kept per machine: `decode_layout.json` under the cache folder, one entry per key (the
CPU model or GPU, torch's version, the thread count and device, and what else the choice depends on).
Written atomically; a cache that cannot be read or written only costs a measurement. No Lightning,
Hydra or domain code here."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from multiar.engine.precision import cpu_model
from multiar.engine.quantize import Int4Linear, Int8Linear

# 2: bf16 weights decode over bf16 caches on an AMX CPU, so the choices measured before are stale
CACHE_FORMAT = 2
CACHE_FILE = "decode_layout.json"


def cache_root() -> Path:
    """Where multiar keeps what it measured and built on this machine: $MULTIAR_CACHE, else
    ~/.cache/multiar (read on each call, so a test or benchmark can point it elsewhere)."""
    return Path(os.environ.get("MULTIAR_CACHE", "~/.cache/multiar")).expanduser()


def cache_key(model: nn.Module, batch_size: int | None, asked: str) -> str:
    """CPU model, torch version, threads, device, batch size (None: a choice for every batch size),
    layer shapes and the narrowing asked."""
    shapes = [list(m.weight.shape) for m in model.modules() if isinstance(m, nn.Linear)]
    shapes += [
        [m.out_features, m.in_features] for m in model.modules() if isinstance(m, Int8Linear | Int4Linear)
    ]
    digest = hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16]
    batch = "any batch" if batch_size is None else f"batch {batch_size}"
    return f"{machine_key(next(model.parameters()).device)} | {batch} | shapes {digest} | {asked}"


def machine_key(device: torch.device) -> str:
    """What a measured choice depends on beside the model: the CPU model (or the GPU's name), torch's
    version, the thread count and the device type."""
    if device.type == "cpu":
        where = cpu_model()
    else:
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return f"{where} | torch {torch.__version__} | {torch.get_num_threads()} threads | {device.type}"


def read_cache(cache_file: Path | None, key: str) -> dict | None:
    if cache_file is None or not cache_file.exists():
        return None
    try:
        table = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        return None
    entry = table.get(key) if isinstance(table, dict) else None
    return entry if isinstance(entry, dict) and entry.get("format") == CACHE_FORMAT else None


def write_cache(cache_file: Path | None, key: str, entry: dict) -> None:
    if cache_file is None:
        return
    try:
        cached = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    except (OSError, ValueError):
        cached = {}
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(cached | {key: {"format": CACHE_FORMAT} | entry}, indent=1))
        tmp.replace(cache_file)
    except OSError:
        pass  # a read-only cache only costs the measurement next time
