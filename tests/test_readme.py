"""Every `multiar ...` command the README shows composes into a valid config: no unknown key, no bad
value, nothing missing (in code blocks; the README's inline `multiar ...` spans name a command and some
of its keys, so theirs are checked for keys and types only)."""

from __future__ import annotations

import re
import shlex
from itertools import product
from pathlib import Path

import pytest

from multiar.cli import COMMANDS, domain_option_shorthand
from multiar.config import compose_config, load_config
from multiar.schema import describe

README = Path(__file__).parents[1] / "README.md"

# the README's placeholders, each given an example value
PLACEHOLDERS = {"NAME": "protein_cpu", "N": "2", "G": "4"}
# what precedes `multiar` on a README line: a launcher (torchrun, srun) or the venv's path to it
PREFIX = re.compile(r"^.*?(?:\.venv/bin/)?(?=multiar\s)")


def readme_commands() -> list[tuple[str, bool]]:
    """(command text, whole) for each `multiar ...` command in README.md: whole for code-block lines,
    not for inline spans. `a && b` is two commands; a comment after `#` is not part of one."""
    text = README.read_text(encoding="utf-8")
    found: list[tuple[str, bool]] = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M):
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if re.match(r"^(torchrun|srun|\.venv/bin/multiar|multiar)\s", line):
                found += [(part.strip(), True) for part in line.split("&&")]
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    for span in re.findall(r"`([^`]+)`", prose):
        span = " ".join(span.split())  # a span may wrap over lines
        if re.match(r"^(multiar|\.venv/bin/multiar)\s+[a-z<]|^(torchrun|srun)\s.*\bmultiar\s", span):
            found.append((span, False))
    return found


def arguments(command: str) -> tuple[str, list[list[str]]]:
    """The multiar command name and its overrides, one list per job (a -m sweep expands to every
    combination), with the README's conventions taken out explicitly."""
    words = shlex.split(PREFIX.sub("", command))  # torchrun/srun and their own options are not multiar's
    assert words[0] == "multiar", command
    name, overrides, sweep = words[1], [], False
    for word in words[2:]:
        if word == "...":  # "and any other options": the options shown must compose without them
            continue
        if word in ("-m", "--multirun"):
            sweep = True
            continue
        if word in ("-h", "--help"):
            continue
        key, sep, value = word.partition("=")
        if key.startswith("hydra.") or key.startswith("hydra/"):
            # Hydra's own settings (sweep folder, launcher): Hydra reads them at multirun, no schema key
            continue
        overrides.append(f"{key}{sep}{PLACEHOLDERS.get(value, value)}")
    if not sweep:
        return name, [overrides]
    # a sweep runs every combination of the comma-separated values
    choices = [
        [f"{o.partition('=')[0]}={v}" for v in o.partition("=")[2].split(",")]
        if "," in o and not o.partition("=")[2].startswith(("[", "{", "'", '"'))
        else [o]
        for o in overrides
    ]
    return name, [list(combo) for combo in product(*choices)]


COMMANDS_IN_README = readme_commands()


def test_readme_shows_commands():
    names = {arguments(c)[0] for c, _ in COMMANDS_IN_README}
    assert {"train", "generate", "quantize", "export", "eval", "score"} <= names
    assert any(c.startswith("torchrun") for c, _ in COMMANDS_IN_README)  # the prefixes are exercised
    assert any(c.startswith("srun") for c, _ in COMMANDS_IN_README)
    assert any(" -m " in c for c, _ in COMMANDS_IN_README)


@pytest.mark.parametrize(("command", "whole"), COMMANDS_IN_README, ids=[c for c, _ in COMMANDS_IN_README])
def test_readme_command_composes(command, whole):
    name, jobs = arguments(command)
    names = list(COMMANDS) if name == "<command>" else [name]  # the placeholder: any command
    assert set(names) <= set(COMMANDS), f"README: unknown command in {command!r}"
    for config_name, given in product((COMMANDS[n][0] for n in names), jobs):
        overrides = domain_option_shorthand(config_name, given)  # prompt_bars=4, as the CLI reads it
        if whole:
            load_config(config_name, overrides)  # ConfigError: unknown key, bad value or missing key
        else:
            describe(config_name, compose_config(config_name, overrides))  # keys and types


def test_readme_conventions_are_handled(tmp_path):
    # what the parser takes out, shown on lines of the README's own shapes
    assert arguments(
        "torchrun --nnodes N --rdzv-endpoint HOST:29500 .venv/bin/multiar train trainer.num_nodes=N"
    )[1] == [["trainer.num_nodes=2"]]
    assert arguments("multiar generate run=r draft=ngram ...") == ("generate", [["run=r", "draft=ngram"]])
    assert arguments(
        "multiar train -m domain=music,code model=tiny hydra/launcher=x hydra.launcher.gpus_per_node=1"
    )[1] == [["domain=music", "model=tiny"], ["domain=code", "model=tiny"]]
    # an unknown key fails
    with pytest.raises(ValueError, match="No such key"):
        load_config("generate", arguments("multiar generate run=r no_such_key=1")[1][0])
