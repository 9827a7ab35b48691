"""One Domain base: the core asks for capabilities with isinstance, never hasattr/getattr/AttributeError;
Tagged has exactly its base's capabilities; a domain with nothing but the required members trains,
generates and evaluates; a domain declares its own generate options."""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from conftest import TINY
from omegaconf import OmegaConf

from multiar.commands.evaluate import eval_run
from multiar.commands.generate import domain_options, sample_to_files, stop_rule
from multiar.config import load_config
from multiar.domain import CAPABILITIES, DomainBase, GenerateOption, Renderable, StopRules
from multiar.domains import DOMAINS, build_domain
from multiar.errors import ConfigError
from multiar.files import write_new_text
from multiar.tags import Tagged
from multiar.training.run import train

CORE = Path(__file__).resolve().parents[2] / "multiar"
# the objects a domain goes by in the core: probing them by name is what DomainBase replaces
DOMAIN_NAMES = r"(?:\w+\.)*(?:domain|base|d|a|b|tagged|draft|tokenizer)"
PROBE = re.compile(rf"\b(?:hasattr|getattr)\(\s*{DOMAIN_NAMES}\s*,|AttributeError|def __getattr__")


def test_the_core_never_probes_a_domain_for_attributes():
    found = [
        f"{path.relative_to(CORE.parent)}:{n}: {line.strip()}"
        for path in sorted(CORE.rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), start=1)
        if PROBE.search(line)
    ]
    assert not found, "ask isinstance(domain, Capability) or use DomainBase's default:\n" + "\n".join(found)


def test_the_probe_finds_what_it_forbids():
    for line in ('if hasattr(domain, "render"):', "x = getattr(run.domain, 'fim_rate', 0.0)",
                 "except (AttributeError, ValueError):", "    def __getattr__(self, name):"):  # fmt: skip
        assert PROBE.search(line), line
    assert not PROBE.search("getattr(err, 'strerror', None)")


def test_every_registered_domain_subclasses_the_base():
    assert all(issubclass(cls, DomainBase) for cls in DOMAINS.values())


def test_tagged_has_exactly_the_capabilities_of_its_base():
    for name, spec in (("protein", "header:OX"), ("music", "folder"), ("code", "file")):
        base = build_domain(name) if name != "code" else DOMAINS["code"]()
        tagged = Tagged(base, spec)
        for capability in CAPABILITIES:
            assert isinstance(tagged, capability) == isinstance(base, capability), (name, capability)
        again = pickle.loads(pickle.dumps(tagged))  # the per-base class travels as base + state
        assert type(again) is type(tagged) and again.spec == spec
    assert isinstance(Tagged(build_domain("music"), "folder"), Renderable)
    assert not isinstance(Tagged(build_domain("protein"), "folder"), Renderable)


class BrokenRule(DomainBase):
    name = "broken"

    def stop_rule(self, name: str):
        return self.rules[name]  # a bug: no attribute `rules`


def test_a_bug_inside_a_domains_stop_rule_is_not_reported_as_no_rule():
    cfg = OmegaConf.create({"stop_at": "block"})
    assert isinstance(BrokenRule(), StopRules)
    with pytest.raises(AttributeError, match="rules"):
        stop_rule(cfg, BrokenRule())
    with pytest.raises(ConfigError, match="stop_at: the toy domain has no stopping rules"):
        stop_rule(cfg, Toy())


class Toy(DomainBase):
    """Lower-case letters, one record per line of a .txt file: only the members DomainBase requires."""

    name = "toy"
    suffixes = (".txt",)
    unit = "letter"
    letters = "abcdefghijklmnopqrstuvwxyz "
    pad_id, bos_id, eos_id = 0, 1, 2
    vocab_size = 3 + len(letters)

    def default_paths(self, corpus: str | None = None) -> list[Path]:
        raise ValueError("the toy domain bundles no corpus: give data.paths")

    def read(self, path: Path) -> Iterator[str]:
        yield from (line for line in path.read_text().splitlines() if line.strip())

    def from_value(self, value: Any, key: str) -> str:
        return str(value)

    def content(self, record: str) -> bytes:
        return record.encode()

    def units(self, record: str) -> int:
        return len(record)

    def encode(self, record: str) -> list[int]:
        if set(record) - set(self.letters):
            raise ValueError("letters outside a-z")
        return [3 + self.letters.index(c) for c in record]

    def prompt_ids(self, prompt: str | None) -> list[int]:
        return [self.bos_id] + (self.encode(prompt) if prompt else [])

    def decode(self, ids: list[int]) -> tuple[str, int]:
        kept = [i for i in ids if 3 <= i < self.vocab_size]
        return "".join(self.letters[i - 3] for i in kept), len(ids) - len(kept)

    def write(
        self,
        artifacts: Sequence[str],
        out_dir: Path,
        provenance: dict,
        overwrite: bool = False,
        start: int = 0,
    ) -> list[Path]:
        return [
            write_new_text(Path(out_dir) / f"sample_{start + i:03d}.txt", text + "\n", overwrite)
            for i, text in enumerate(artifacts)
        ]

    def save(self, directory: Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        write_new_text(Path(directory) / "toy.json", "{}", overwrite=True)

    @classmethod
    def load(cls, directory: Path) -> Toy:
        return cls()


def test_a_domain_with_only_the_required_members_trains_generates_and_evaluates(tmp_path, monkeypatch):
    monkeypatch.setitem(DOMAINS, "toy", Toy)
    data = tmp_path / "data"
    data.mkdir()
    words = ["the cat sat", "a dog ran far", "we sing", "birds fly high", "sun and rain"]
    for n in range(6):
        (data / f"f{n}.txt").write_text("\n".join(w + " " + "ab" * n for w in words) + "\n")
    cfg = load_config("train", [*TINY, "domain=protein", f"data.paths=[{data}]", f"run_dir={tmp_path / 'run'}",
                                "trainer.max_steps=3", "trainer.val_check_interval=3"])  # fmt: skip
    OmegaConf.set_struct(cfg, False)
    cfg.domain.name, cfg.domain.settings = "toy", {}  # a domain the conf tree does not know
    train(cfg)
    report = sample_to_files(load_config("generate", [f"run={tmp_path / 'run'}", f"out={tmp_path / 'out'}",
                                                      "n=2", "max_new_tokens=8", "dtype=fp32"]))  # fmt: skip
    assert report["samples"] == 2 and len(report["files"]) == 2
    assert all(set(Path(f).read_text()) <= set(Toy.letters + "\n") for f in report["files"])
    result = eval_run(load_config("eval", [f"run={tmp_path / 'run'}", "n=2", "max_new_tokens=8"]))
    assert result["bits_per_unit"] > 0 and result["metrics"]["toy/new_tokens_mean"] > 0
    assert json.loads((tmp_path / "run" / "eval" / "eval.json").read_text())["documents"] >= 1


class Shouty(Toy):
    generate_options = {"shout": GenerateOption(int, None, "letters to repeat")}


def test_a_domain_declares_its_own_generate_options():
    cfg = OmegaConf.create({"options": {"shout": 3}})
    assert domain_options(cfg, Shouty()) == {"shout": 3}
    with pytest.raises(ConfigError, match="options.shout: the toy domain has no such generate option"):
        domain_options(cfg, Toy())
    with pytest.raises(ConfigError, match="options.shout: expected int"):
        domain_options(OmegaConf.create({"options": {"shout": "loud"}}), Shouty())
    # music's prompt_bars is music's alone: refused for another domain, passed to music
    with pytest.raises(ConfigError, match="options.prompt_bars: the toy domain has no such generate option"):
        domain_options(OmegaConf.create({"options": {"prompt_bars": 2}}), Toy())
    music = build_domain("music")
    assert domain_options(OmegaConf.create({"options": {"prompt_bars": 2}}), music) == {"prompt_bars": 2}
