"""The image domain's saved state in a run folder: image.json (settings and the classifier's labels),
codebook.safetensors (the tokenizer: the codes decide the ids) and image.safetensors (what the metrics
need: the training images at 8 bits, the classifier's weights)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from multiar.files import write_new_file, write_new_text


def save(
    directory: Path,
    settings: dict[str, Any],
    labels: list[str],
    codebook: np.ndarray,
    training: np.ndarray | None,
    classifier: nn.Module | None,
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    write_new_text(directory / "image.json", json.dumps({**settings, "labels": labels}, indent=1), True)
    codes = {"codebook": torch.as_tensor(codebook).contiguous()}
    write_new_file(directory / "codebook.safetensors", lambda tmp: save_file(codes, str(tmp)), True)
    tensors = {}
    if training is not None:
        tensors["training"] = torch.as_tensor((training * 255).round().astype(np.uint8))
    if classifier is not None:
        tensors |= {f"classifier.{k}": v.contiguous() for k, v in classifier.state_dict().items()}
    if tensors:
        write_new_file(directory / "image.safetensors", lambda tmp: save_file(tensors, str(tmp)), True)


def load(
    directory: Path,
) -> tuple[dict[str, Any], list[str], np.ndarray, np.ndarray | None, dict[str, torch.Tensor]]:
    """settings, labels, codebook, training images (or None) and the classifier's weights (or {})."""
    settings = json.loads((directory / "image.json").read_text())
    labels = settings.pop("labels", [])
    codebook = load_file(str(directory / "codebook.safetensors"))["codebook"].numpy()
    extra = directory / "image.safetensors"
    tensors = load_file(str(extra)) if extra.exists() else {}
    training = tensors["training"].numpy().astype(np.float32) / 255 if "training" in tensors else None
    weights = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("classifier.")}
    return settings, labels, codebook, training, weights
