"""The run directory: everything `generate`, `eval` and `export` need, and nothing that unpickles.

runs/<name>/config.yaml        resolved config + the exact ModelConfig (vocab_size included)
runs/<name>/model.safetensors  weights
runs/<name>/domain/            tokenizer state, written by Domain.save
runs/<name>/metrics.csv        training curves (Lightning's CSVLogger)
runs/<name>/checkpoints/       Lightning checkpoints, for resuming training only
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_model, save_model

from multiar.domain import Domain, write_new_file, write_new_text
from multiar.model import GPT, ModelConfig


@dataclass
class Run:
    """A trained model loaded from its run directory."""

    model: GPT
    domain: Domain
    config: dict[str, Any]
    path: Path


def save_run(run_dir: str | Path, model: GPT, domain: Domain, config: dict[str, Any]) -> Path:
    """Write weights, config and tokenizer state into run_dir (each file replaced atomically)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {**config, "model_config": model.config.to_dict()}
    # save_model drops the tied lm_head alias and keeps one copy of the shared tensor
    write_new_file(run_dir / "model.safetensors", lambda tmp: save_model(model, str(tmp)), overwrite=True)
    write_new_text(run_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False), overwrite=True)
    domain.save(run_dir / "domain")
    return run_dir


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> Run:
    """Rebuild model and domain from a run directory; plain YAML and safetensors only."""
    from multiar.domains import (
        load_domain,  # the registry; imported here so the core modules stay domain-free
    )

    run_dir = Path(run_dir).expanduser()
    for needed in ("config.yaml", "model.safetensors", "domain"):
        if not (run_dir / needed).exists():
            raise FileNotFoundError(f"{run_dir}: not a finished multiar run (missing {needed})")
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    domain = load_domain(config["domain"]["name"], run_dir / "domain")
    model_config = ModelConfig(**config["model_config"])
    if model_config.vocab_size != domain.vocab_size:
        raise ValueError(
            f"{run_dir}: model vocab_size {model_config.vocab_size} != tokenizer vocab_size {domain.vocab_size}"
        )
    model = GPT(model_config)
    load_model(model, str(run_dir / "model.safetensors"), strict=True)
    model.to(device).eval()
    return Run(model, domain, config, run_dir)
