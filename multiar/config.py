"""Composing multiar's Hydra configs from key=value overrides: each command's typed schema
(multiar/schema.py, registered with Hydra's ConfigStore as `<command>_schema`) holds every default, and
conf/<command>.yaml (installed as multiar.conf) lists it first in its defaults, then the config groups
(domain, model, trainer, logger) and recipes (experiment) that change it."""

from __future__ import annotations

import re
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig
from omegaconf.errors import ValidationError

from multiar.errors import ConfigError, first_line
from multiar.schema import SCHEMAS, config_error, validate


def config_dir() -> Path:
    """Where the installed Hydra configs live (conf/ in the repo, installed as multiar.conf)."""
    return Path(str(files("multiar.conf")))


def store_schemas() -> None:
    """Register each command's schema with Hydra's ConfigStore as `<command>_schema`, the first entry of
    conf/<command>.yaml's defaults list: the schema's defaults are the config's base."""
    store = ConfigStore.instance()
    for name, schema in SCHEMAS.items():
        store.store(name=f"{name}_schema", node=schema)


# keys whose values are free text (a prompt, a path): quoted for the user, so no Hydra escaping is needed
FREE_TEXT_KEYS = {
    "prompt",
    "prompt_file",
    "stop",
    "draft",
    "tags",
    "template",
    "fixed",
    "data.tags",
    "prompt_prefix",
    "prompt_suffix",
    "infill",
}


def _quote_free_text(overrides: Sequence[str]) -> list[str]:
    """Quote free-text values so Hydra's override grammar takes them literally: no interpolation of
    '${...}', quotes and backslashes kept. `key=null` stays null (it unsets the key)."""
    out = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if (
            key.lstrip("+") in FREE_TEXT_KEYS
            and sep
            and value != "null"
            and not (value[:1] in "'\"" and value[-1:] == value[:1] and len(value) > 1)
        ):
            # in Hydra's quoted strings a backslash escapes only before a quote, '${' or the end
            value = re.sub(r"(\\+)(?='|$|\$\{)", lambda m: m.group(1) * 2, value)
            value = value.replace("'", "\\'").replace("${", "\\${")
            value = f"'{value}'"
        out.append(f"{key}{sep}{value}")
    return out


# free-form mappings of the schema: their entries are checked by what reads them (a domain's options
# and settings, its filters and augmentation, Lightning's Trainer and loggers), so a new entry needs no +
FREE_FORM = ("options", "filters", "data.augment", "domain.settings", "trainer", "logger")


def hydra_overrides(overrides: Sequence[str]) -> list[str]:
    """key=value overrides as Hydra's grammar takes them: `experiment=NAME` as `+experiment=NAME` (the
    recipes are no default of the train config, so Hydra itself takes only the + form), an entry of a
    free-form mapping (`options.prompt_bars=2`, `data.augment={pitch: [-2, 2]}`,
    `trainer.accumulate_grad_batches=2`) as `++` (set or add), free text quoted."""
    return _quote_free_text([_plus(o) for o in overrides])


def _plus(override: str) -> str:
    key = override.partition("=")[0]
    if key == "experiment":
        return "+" + override
    value_field = key in ("options", "filters", "data.augment")  # `trainer=ddp` picks a group: left as is
    if value_field or key.startswith(tuple(f + "." for f in FREE_FORM)):
        return "++" + override
    return override


def compose_config(name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """conf/<name>.yaml composed with key=value overrides by Hydra, not yet checked against the schema;
    a bad override is a ConfigError of one line."""
    store_schemas()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            return compose(config_name=name, overrides=hydra_overrides(overrides))
    except ConfigError:
        raise
    except Exception as err:  # Hydra's override-grammar and composition errors
        if isinstance(err.__cause__, ValidationError):  # a value the schema's type refuses: name the key
            raise config_error(err.__cause__) from None
        message = first_line(err)
        if message.startswith("Could not override"):
            message += " No such key: `multiar <command> --help` lists the keys."
        raise ConfigError(f"bad arguments: {message}") from None


def load_config(name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """Compose conf/<name>.yaml with key=value overrides, as the CLI does, and check it against the
    command's typed schema: any bad override or value is a ConfigError of one line."""
    return validate(name, compose_config(name, overrides))
