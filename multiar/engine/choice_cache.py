"""Measured choices kept per machine: `decode_layout.json` under the cache folder, one entry per key (the
CPU model or GPU, torch's version, the thread count and device, and what else the choice depends on).
Written atomically; a cache that cannot be read or written only costs a measurement. No Lightning,
Hydra or domain code here."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn as nn

from multiar.engine.precision import cpu_model
from multiar.engine.quantize import Int4Linear, Int8Linear
from multiar.files import write_new_file

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
    """Set key's entry in cache_file, the file's other keys kept."""
    update_cache(cache_file, key, lambda _: entry)


def update_cache(cache_file: Path | None, key: str, change: Callable[[dict | None], dict]) -> None:
    """Set key's entry to change(its entry now, or None), the file's other keys kept. Processes that
    write at once (many short jobs, each adding its eager seconds to a count) take turns under a lock
    file where the OS has flock, each writing its own temporary file: no write is half of two, and no
    count read by one is overwritten by another's stale one."""
    if cache_file is None:
        return
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        with _locked(cache_file.with_name(cache_file.name + ".lock")):
            try:
                cached = json.loads(cache_file.read_text()) if cache_file.exists() else {}
            except (OSError, ValueError):
                cached = {}
            if not isinstance(cached, dict):
                cached = {}
            entry = cached.get(key)
            now = entry if isinstance(entry, dict) and entry.get("format") == CACHE_FORMAT else None
            text = json.dumps(cached | {key: {"format": CACHE_FORMAT} | change(now)}, indent=1)
            write_new_file(cache_file, lambda tmp: tmp.write_text(text), overwrite=True)
    except OSError:
        pass  # a read-only cache only costs the measurement next time


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on path (created) while the block runs, where fcntl exists (not on Windows,
    where writers may race as before)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def parses(name: object, parse: Callable[[str], object]) -> bool:
    """Whether name is a str that parse (a rule's reader, raising ValueError) accepts: a cached entry
    checked before it is trusted (one edited by hand is measured again)."""
    if not isinstance(name, str):
        return False
    try:
        parse(name)
    except ValueError:
        return False
    return True
