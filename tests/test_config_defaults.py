"""One source of config defaults: the typed schema (multiar/schema.py). conf/<command>.yaml holds only its
defaults list and free-form entries the schema leaves empty; the group options (domain, model, trainer,
logger) and recipes (experiment) hold what they change. Every composed key that no option file sets has
the schema's default."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from multiar.config import compose_config, config_dir, hydra_overrides, load_config
from multiar.schema import SCHEMAS


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    """A nested container's leaves as {dotted key: value}; an empty dict or list is a leaf."""
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_leaves(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def _schema_defaults(name: str) -> dict[str, Any]:
    schema = OmegaConf.structured(SCHEMAS[name])
    return _leaves(OmegaConf.to_container(schema, resolve=False, throw_on_missing=False))


def _free_form(key: str, defaults: dict[str, Any]) -> bool:
    """Whether key lies in a field the schema leaves empty ({} or []): its entries are the YAML's to give."""
    parts = key.split(".")
    return any(defaults.get(".".join(parts[:i])) in ({}, []) for i in range(1, len(parts) + 1))


def _file_keys(path: Path, group: str) -> dict[str, Any]:
    """The keys a config file sets, with their package (a group's own node, or _global_)."""
    body = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    body.pop("defaults", None)
    prefix = "" if not group or "@package _global_" in path.read_text() else f"{group}."
    return _leaves(body, prefix) if body else {}


def restated_defaults(conf: Path) -> list[str]:
    """Keys of conf/<command>.yaml that restate or contradict a schema default, as 'file: key' lines."""
    problems = []
    for name in SCHEMAS:
        defaults = _schema_defaults(name)
        for key in _file_keys(conf / f"{name}.yaml", group=""):
            if not _free_form(key, defaults):
                problems.append(f"{name}.yaml: {key} (the schema holds its default)")
    return problems


def test_no_command_yaml_restates_a_schema_default():
    assert restated_defaults(config_dir()) == []


def test_a_restated_default_is_caught(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(config_dir(), conf)
    for name, key, value in (("train", "optim.lr", 3e-3), ("generate", "run", "???")):
        cfg = OmegaConf.load(conf / f"{name}.yaml")
        OmegaConf.update(cfg, key, value, force_add=True)
        OmegaConf.save(cfg, conf / f"{name}.yaml")
    assert restated_defaults(conf) == [
        "train.yaml: optim.lr (the schema holds its default)",
        "generate.yaml: run (the schema holds its default)",
    ]


def _check_composed(name: str, overrides: list[str]) -> None:
    """Every key of the composed config is set by an option file it chose, or holds the schema's default."""
    cfg = compose_config(name, overrides)  # also registers the schemas where the configs need them
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        choices = compose(name, hydra_overrides(overrides), return_hydra_config=True).hydra.runtime.choices
    by_options: dict[str, Any] = {}
    for group, option in choices.items():
        path = config_dir() / group / f"{option}.yaml"
        if path.exists():
            by_options.update(_file_keys(path, group))
    defaults = _schema_defaults(name)
    own = _file_keys(config_dir() / f"{name}.yaml", group="")
    composed = _leaves(OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False))
    for key, value in composed.items():
        if key in by_options:
            continue  # a preset's, trainer's, domain's, logger's or recipe's own value
        if _free_form(key, defaults) and key in own:
            continue  # an entry of a field the schema leaves empty (demo's domains, generate's filters)
        assert key in defaults, f"{name} {overrides}: {key} comes from neither the schema nor an option file"
        assert value == defaults[key], (
            f"{name} {overrides}: {key} is {value!r}, the schema says {defaults[key]!r}"
        )


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_each_command_composes_to_the_schema_defaults(name):
    _check_composed(name, [])


def test_every_group_option_and_recipe_composes_to_the_schema_defaults():
    for group in ("domain", "model", "trainer", "logger"):
        for option in _options(group):
            _check_composed("train", [f"{group}={option}"])
    for recipe in _options("experiment"):
        _check_composed("train", [f"+experiment={recipe}"])


def test_the_cache_dir_default_follows_multiar_cache(monkeypatch):
    monkeypatch.setenv("MULTIAR_CACHE", "/tmp/elsewhere")
    assert load_config("train").data.cache_dir == "/tmp/elsewhere"
    monkeypatch.delenv("MULTIAR_CACHE")
    assert load_config("train").data.cache_dir == "~/.cache/multiar"


def test_a_domains_generate_option_passes_the_schema_to_the_domain():
    from multiar.commands.generate import domain_options
    from multiar.domains import build_domain

    cfg = load_config("generate", ["run=x", "options.prompt_bars=2"])  # the schema leaves options free
    assert domain_options(cfg, build_domain("music")) == {"prompt_bars": 2}
    assert load_config("generate", ["run=x", "+options.prompt_bars=2"]).options == {"prompt_bars": 2}
    with pytest.raises(ValueError, match="options.prompt_bars: the code domain has no such generate option"):
        domain_options(cfg, build_domain("code"))


def test_free_form_entries_have_their_own_help():
    from multiar.schema import describe

    def helps(name: str, overrides: list[str]) -> dict[str, str]:
        return {key: text for key, _, text in describe(name, compose_config(name, overrides))}

    assert "wandb sync" in helps("train", ["logger=wandb"])["logger.offline"]
    assert "run_dir/mlruns" in helps("train", ["logger=mlflow"])["logger.tracking_uri"]
    generate = helps("generate", ["run=x"])
    assert "Shannon entropy" in generate["filters.min_entropy"]
    assert "4-mers" in generate["filters.candidates"]


def test_entries_of_free_form_mappings_need_no_plus():
    from multiar.config import load_config

    cfg = load_config(
        "train",
        ["domain=music", "data.augment={pitch: [-2, 3]}", "trainer.accumulate_grad_batches=2", "trainer=ddp"],
    )
    assert cfg.data.augment == {"pitch": [-2, 3]} and cfg.trainer.accumulate_grad_batches == 2
    assert cfg.trainer.strategy == "ddp"  # a group choice stays a group choice
    assert (
        load_config("train", []).data.augment == {}
        and load_config("train", ["data.augment=null"]).data.augment is None
    )


@pytest.mark.parametrize(
    "keys",
    [
        {"temperature": 0.5, "seed": 3, "max_new_tokens": 7},
        {"top_p": 0.9, "options": {"min_len": 3}, "stop": ["x"]},
        {"temperature": -1.0},  # a range check (__post_init__)
        {"temperature": "hot"},  # a type
        {"top_k": 1.5},
        {"filters": {"no_such_filter": 1}},  # an unknown nested key
        {"n": 0},
    ],
)
def test_validate_update_checks_what_validate_checks(keys):
    """The server's fast path (keys onto a base validated once) accepts and rejects what validate does on
    the merged config, and gives the same config when it accepts."""
    from multiar.errors import ConfigError
    from multiar.schema import validate, validate_update

    base = validate("generate", load_config("generate", ["run=runs/x", "device=cpu"]))
    try:
        slow = validate("generate", OmegaConf.merge(base, keys))
    except Exception as err:  # noqa: BLE001 (the merge or the checks: either way, refused)
        slow = err
    try:
        fast = validate_update(base, keys)
    except ConfigError as err:
        fast = err
    if isinstance(slow, Exception):
        assert isinstance(fast, ConfigError), (keys, slow)
    else:
        assert OmegaConf.to_container(fast) == OmegaConf.to_container(slow)
