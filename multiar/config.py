"""Composing multiar's Hydra configs (conf/, installed as multiar.conf) from key=value overrides."""

from __future__ import annotations

import re
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig


def config_dir() -> Path:
    """Where the installed Hydra configs live (conf/ in the repo, installed as multiar.conf)."""
    return Path(str(files("multiar.conf")))


def _quote_free_text(overrides: Sequence[str]) -> list[str]:
    # a prompt is free text ('def parse(' or a path): quote it so Hydra's override grammar takes it literally
    out = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if (
            key.lstrip("+") == "prompt"
            and sep
            and not (value[:1] in "'\"" and value[-1:] == value[:1] and len(value) > 1)
        ):
            # Hydra's quoted strings: backslashes escape only before a quote or at the end
            value = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, value).replace("'", "\\'")
            value = f"'{value}'"
        out.append(f"{key}{sep}{value}")
    return out


def load_config(name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """Compose conf/<name>.yaml with key=value overrides, as the CLI does."""
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name=name, overrides=_quote_free_text(overrides))
