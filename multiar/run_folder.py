"""The run folder: everything `generate`, `eval` and `export` need, and nothing that unpickles.

runs/<name>/config.yaml        format_version, the resolved config + the exact ModelConfig
runs/<name>/model.safetensors  weights
runs/<name>/domain/            tokenizer state, written by Domain.save when training starts
runs/<name>/metrics.csv        training curves (Lightning's CSVLogger)
runs/<name>/checkpoints/       Lightning checkpoints, for resuming training only (loaded weights_only)

`format_version` says what a run folder holds. Version 0 is the foundation's layout (no key);
version 1 adds the key and the tokenizer saved at the start of training. A newer or unknown version
is refused with one line; older versions keep loading.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_model, save_file
from torch import Tensor

from multiar.domain import Domain
from multiar.engine.model import GPT, ModelConfig
from multiar.errors import ConfigError, first_line
from multiar.files import write_new_file, write_new_text
from multiar.schema import resolve_device

FORMAT_VERSION = 1


@dataclass
class Run:
    """A trained model loaded from its run folder."""

    model: GPT
    domain: Domain
    config: dict[str, Any]
    path: Path


def write_run_config(run_dir: str | Path, config: dict[str, Any]) -> Path:
    """config.yaml with format_version first, replaced atomically."""
    text = yaml.safe_dump({"format_version": FORMAT_VERSION, **config}, sort_keys=False)
    return write_new_text(Path(run_dir) / "config.yaml", text, overwrite=True)


def save_run(
    run_dir: str | Path,
    model: GPT,
    domain: Domain,
    config: dict[str, Any],
    weights: dict[str, Tensor] | None = None,
) -> Path:
    """Write weights, config and tokenizer state into run_dir (each file replaced atomically). weights:
    the model's whole state dict where the model's own parameters are not it (FSDP's flattened shards;
    `multiar.training.run` gathers it); None: the model's."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in config.items() if k != "format_version"}
    config["model_config"] = model.config.to_dict()
    state, aliases = tied_once(model.state_dict() if weights is None else weights)
    write_new_file(
        run_dir / "model.safetensors",
        lambda tmp: save_file(state, str(tmp), metadata=aliases),
        overwrite=True,
    )
    write_run_config(run_dir, config)
    domain.save(run_dir / "domain")
    return run_dir


def tied_once(weights: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str] | None]:
    """A state dict as safetensors' save_model writes a GPT's (byte for byte): the tied embedding
    (wte.weight, lm_head.weight's alias) once, under lm_head.weight, the alias named in the metadata;
    each tensor contiguous. Named by name,
    not found by storage as save_model does: views into one flat parameter (FSDP's) share a storage
    that none of them covers, which save_model refuses."""
    state = {k: v.detach().contiguous() for k, v in weights.items()}
    if "lm_head.weight" in state and "wte.weight" in state:
        del state["wte.weight"]
        return state, {"wte.weight": "lm_head.weight"}
    return state, None


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """The run's config.yaml as plain data, its format version checked; ConfigError when it can't be read."""
    path = Path(run_dir).expanduser() / "config.yaml"
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not a readable run config ({type(err).__name__})") from None
    if not isinstance(config, dict) or not isinstance(config.get("domain"), dict):
        raise ConfigError(f"{path}: not a multiar run config (no domain section)")
    version = config.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise ConfigError(f"{path}: unknown format_version {version!r}")
    if version > FORMAT_VERSION:
        raise ConfigError(
            f"{path}: written by a newer multiar (format_version {version}; this one reads up to "
            f"{FORMAT_VERSION}): upgrade multiar to load it"
        )
    return config


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> Run:
    """Rebuild model and domain from a run folder, on device (auto: cuda when a GPU answers, else cpu);
    plain YAML and safetensors only, nothing unpickled."""
    from multiar.domains import load_domain  # the registry; imported here so the core stays domain-free

    run_dir = Path(run_dir).expanduser()
    for needed in ("config.yaml", "model.safetensors", "domain"):
        if not (run_dir / needed).exists():
            raise FileNotFoundError(f"{run_dir}: not a finished multiar run (missing {needed})")
    config = read_run_config(run_dir)
    domain = load_domain(config["domain"]["name"], run_dir / "domain")
    try:
        model_config = ModelConfig(**config["model_config"])
    except (KeyError, TypeError) as err:
        raise ConfigError(f"{run_dir / 'config.yaml'}: bad model_config ({err})") from None
    if model_config.vocab_size != domain.vocab_size:
        raise ConfigError(
            f"{run_dir}: model vocab_size {model_config.vocab_size} != tokenizer vocab_size "
            f"{domain.vocab_size}: the weights and domain/ come from different runs"
        )
    model = GPT(model_config)
    try:
        load_model(model, str(run_dir / "model.safetensors"), strict=True)
    except (SafetensorError, RuntimeError, OSError) as err:
        first = first_line(err)
        raise ValueError(
            f"{run_dir / 'model.safetensors'}: not loadable safetensors weights ({first})"
        ) from None
    model.to(resolve_device(device) if isinstance(device, str) else device).eval()
    return Run(model, domain, config, run_dir)
