"""The domain registry: one name per domain, the same string everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from multiar.domain import Domain
from multiar.domains.code.domain import CodeDomain
from multiar.domains.image.domain import ImageDomain
from multiar.domains.music.domain import MusicDomain
from multiar.domains.protein.domain import ProteinDomain
from multiar.tags import Tagged

DOMAINS: dict[str, type] = {
    "music": MusicDomain,
    "code": CodeDomain,
    "protein": ProteinDomain,
    "image": ImageDomain,
}


def _domain_class(name: str) -> type:
    if name not in DOMAINS:
        raise ValueError(f"unknown domain {name!r}; choose one of {', '.join(DOMAINS)}")
    return DOMAINS[name]


def build_domain(name: str, settings: dict[str, Any] | None = None) -> Domain:
    """A fresh domain from its config settings (conf/domain/<name>.yaml)."""
    return _domain_class(name)(**(settings or {}))


def load_domain(name: str, directory: str | Path) -> Domain:
    """The domain with the tokenizer state saved in a run directory's domain/ folder (with its control
    tags when the run has them)."""
    domain = _domain_class(name).load(Path(directory))
    if (Path(directory) / "tags.json").exists():
        domain = Tagged.load(domain, Path(directory))
    return domain
