"""Lightning checkpoints written so that a killed run always resumes from a whole file.

A checkpoint is serialized in memory, written to a temporary file beside its name, fsynced, then
renamed over the old one: a SIGKILL or a full disk mid-write leaves the previous checkpoint intact.
Loading is `weights_only=True` (plain tensors and containers), so a planted pickle never runs.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io import TorchCheckpointIO

from multiar.files import file_mode


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose saves are atomic renames of fsynced files and whose loads never unpickle code."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        data = buffer.getbuffer()
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, file_mode())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict:
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        except Exception as err:  # an UnpicklingError from weights_only, or a cut file
            raise ValueError(
                f"{path}: not a loadable multiar checkpoint ({type(err).__name__}); nothing in it was run"
            ) from None


def remove_stale_temporaries(folder: Path) -> int:
    """Delete the temporaries of writes that a kill interrupted; returns how many."""
    stale = list(Path(folder).glob(".*.tmp")) if Path(folder).is_dir() else []
    for f in stale:
        f.unlink(missing_ok=True)
    return len(stale)
