"""generate's checks before any sampling: prompt files, filters, keys a domain cannot honour, the output
folder, the domain's own options."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from multiar.config import config_dir
from multiar.domain import (
    Assessed,
    Domain,
    Renderable,
    Validity,
)
from multiar.errors import ConfigError


def read_prompt_file(path: str | Path) -> list[str]:
    """Prompts, one per line (blank lines skipped); ConfigError naming the file when it can't be read."""
    path = Path(path).expanduser()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"prompt_file: {path}: {getattr(err, 'strerror', None) or err}") from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise ConfigError(f"prompt_file: {path}: holds no prompt")
    return prompts


def check_filters(cfg: DictConfig, domain: Domain) -> None:
    """ConfigError, before any sampling, for a filters.* key the domain does not know (its
    `filter_keys`), or any filter set (a value other than the default) for a domain without filters."""
    known = tuple(domain.filter_keys) if isinstance(domain, Assessed) else ()
    if known:
        unknown = [k for k in cfg.filters if k not in known]
        if unknown:
            raise ConfigError(f"filters.{unknown[0]}: no such filter; known: {', '.join(known)}")
        return
    # what filters hold when the user sets none; read without Hydra, which a multirun job already holds
    defaults = OmegaConf.load(config_dir() / "generate.yaml").filters
    given = [k for k, v in cfg.filters.items() if k not in defaults or defaults[k] != v]
    if given:
        raise ConfigError(f"filters.{given[0]}: the {domain.name} domain has no sample filters")


def check_before_sampling(cfg: DictConfig, domain: Domain, out_dir: Path) -> None:
    """ConfigError or FileExistsError, before any sampling, for a key the domain cannot honour (render,
    resample_invalid) or an output folder that already holds a run's report (overwrite=false)."""
    if cfg.render is not None and not isinstance(domain, Renderable):
        raise ConfigError(f"render: the {domain.name} domain has nothing to render (music only)")
    if cfg.resample_invalid and not isinstance(domain, Validity):
        raise ConfigError(f"resample_invalid: the {domain.name} domain has no validity check")
    if (out_dir / "generate.json").exists() and cfg.resume:
        raise ConfigError(f"resume: {out_dir} holds a finished run (generate.json): nothing to resume")
    if (out_dir / "generate.json").exists() and not cfg.overwrite:
        raise FileExistsError(
            f"{out_dir / 'generate.json'}: already exists (pass overwrite=true to replace it)"
        )


def domain_options(cfg: DictConfig, domain: Domain) -> dict[str, Any]:
    """The domain's own generate options that cfg sets (cfg.options.NAME; the CLI also takes a declared
    option as a top-level key, `prompt_bars=2`), checked against its `generate_options`: ConfigError,
    before any sampling, for an option the domain does not declare or a value of another type."""
    declared = domain.generate_options
    given = dict(cfg.get("options") or {})
    options = {}
    for key, value in given.items():
        where = f"options.{key}"
        if key not in declared:
            known = f"; it has {', '.join(declared)}" if declared else ""
            raise ConfigError(f"{where}: the {domain.name} domain has no such generate option{known}")
        kind = declared[key].type
        if value is None:
            continue
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise ConfigError(f"{where}: expected {kind.__name__}, got {value!r} ({declared[key].help})")
        least = declared[key].minimum
        if least is not None and value < least:
            raise ConfigError(f"{where}: must be >= {least}, got {value!r}")
        options[key] = value
    return options
