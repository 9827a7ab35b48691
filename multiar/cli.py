"""The `multiar` console script: `multiar <command> key=value ...`, configs composed by Hydra."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from multiar.config import compose_config, config_dir, load_config
from multiar.errors import ConfigError, first_line
from multiar.schema import SCHEMAS, describe

log = logging.getLogger("multiar")


def cmd_train(cfg: DictConfig) -> Any:
    from multiar.training.run import train

    return train(cfg)


def cmd_generate(cfg: DictConfig) -> Any:
    from multiar.commands.generate import sample_to_files

    return sample_to_files(cfg)


def cmd_quantize(cfg: DictConfig) -> Any:
    from multiar.commands.quantize import quantize_run

    return quantize_run(cfg)


def cmd_export(cfg: DictConfig) -> Any:
    from multiar.commands.export import export_run

    return export_run(cfg)


def cmd_eval(cfg: DictConfig) -> Any:
    from multiar.commands.evaluate import eval_run

    return eval_run(cfg)


def cmd_score(cfg: DictConfig) -> Any:
    from multiar.commands.score import score_run

    return score_run(cfg)


def cmd_serve(cfg: DictConfig) -> Any:
    from multiar.commands.serve import serve

    return serve(cfg)


def cmd_demo(cfg: DictConfig) -> Any:
    """Train a tiny model per domain on the bundled data and write samples under cfg.out/<domain>/."""
    from multiar.commands.generate import sample_to_files
    from multiar.training.run import train

    start, rows = time.time(), []
    for name in cfg.domains:
        domain_start = time.time()
        run_dir = Path(cfg.runs) / name
        train_cfg = load_config(
            "train", [f"domain={name}", f"run_dir={run_dir}", "overwrite=true", *cfg.train_overrides[name]]
        )
        result = train(train_cfg)
        gen_cfg = load_config("generate", [f"run={run_dir}", f"out={Path(cfg.out) / name}", "overwrite=true"])
        gen_cfg = OmegaConf.merge(gen_cfg, cfg.generate[name])
        report = sample_to_files(gen_cfg)
        rows.append((name, result["val/loss"], report, time.time() - domain_start))
    print(f"\ndemo finished in {time.time() - start:.0f} s")
    for name, val_loss, report, seconds in rows:
        print(
            f"  {name:8s} val/loss {val_loss:.3f}  {seconds:4.0f} s  {report['samples']} samples in "
            f"{len(report['files'])} file(s) under {Path(cfg.out) / name}"
        )
    return rows


COMMANDS: dict[str, tuple[str, Callable[[DictConfig], Any], str]] = {
    "train": (
        "train",
        cmd_train,
        "train a model: multiar train domain=protein model=tiny trainer.max_steps=200",
    ),
    "generate": (
        "generate",
        cmd_generate,
        "sample files: multiar generate run=runs/protein-tiny n=8 out=out/",
    ),
    "quantize": (
        "quantize",
        cmd_quantize,
        "int8 (or mode=int4) weights into the run, validation ppl beside fp32's: multiar quantize run=runs/p",
    ),
    "export": (
        "export",
        cmd_export,
        "a transformers LlamaForCausalLM folder: multiar export run=runs/p format=hf out=hf/",
    ),
    "eval": (
        "eval",
        cmd_eval,
        "loss, ppl, bits per unit vs unigram and init baselines: multiar eval run=runs/p",
    ),
    "score": (
        "score",
        cmd_score,
        "per-document log-likelihood as CSV: multiar score run=runs/p data.paths=[seqs.fasta]",
    ),
    "serve": (
        "serve",
        cmd_serve,
        "an HTTP API with continuous batching: multiar serve runs=[runs/p] port=8000 slots=8",
    ),
    "demo": ("demo", cmd_demo, "tiny model per domain on the bundled data, files under outputs/demo/"),
}


def domain_option_shorthand(config_name: str, overrides: Sequence[str]) -> list[str]:
    """`prompt_bars=2` for `options.prompt_bars=2`: a top-level key that some domain declares as a
    generate option (and the schema does not hold) is that option; the domain checks it when sampling."""
    if config_name != "generate":
        return list(overrides)
    from multiar.domains import DOMAINS  # the registry: each domain's declared generate options

    declared = {name for cls in DOMAINS.values() for name in cls.generate_options}
    fields = set(SCHEMAS["generate"].__dataclass_fields__)

    def rewrite(override: str) -> str:
        key = override.partition("=")[0]
        return f"options.{override}" if key in declared and key not in fields else override

    return [rewrite(o) for o in overrides]


def usage() -> str:
    lines = ["usage: multiar <command> [key=value ...]", "", "commands:"]
    lines += [f"  {name:9s} {doc}" for name, (_, _, doc) in COMMANDS.items()]
    lines += [
        "",
        "multiar <command> --help lists that command's keys: value (defaults, or as overridden), what it does.",
    ]
    lines += [f"configs: {config_dir()}"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, overrides = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"multiar: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    # no network at run time: nothing is fetched from a hub unless a user names one explicitly
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if not log.handlers:  # our own logger only: Lightning configures its own
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    config_name, run, _ = COMMANDS[command]
    overrides = domain_option_shorthand(config_name, overrides)
    sweep = [o for o in overrides if o in ("-m", "--multirun")]
    try:
        if sweep and not ("-h" in overrides or "--help" in overrides):
            from multiar.sweep import multirun

            multirun(config_name, run, [o for o in overrides if o not in sweep])
            return 0
        given = [o for o in overrides if o not in ("-h", "--help", *sweep)]
        if "-h" in overrides or "--help" in overrides:
            print(command_help(command, given))
            return 0
        run(load_config(config_name, given))
    except ConfigError as err:  # arguments and config: what to change, before any heavy work
        print(f"multiar {command}: {one_line(err)}", file=sys.stderr)
        return 2
    except (OSError, ValueError, FloatingPointError, OmegaConfBaseException) as err:
        # bad input or a failed write during the work: one line naming the file and the problem
        print(f"multiar {command}: {one_line(err)}", file=sys.stderr)
        return 1
    return 0


def command_help(command: str, overrides: Sequence[str]) -> str:
    """`multiar <command> --help`: one line per key with its value (the default, or as overridden) and
    what it does, from the schema's field docs."""
    config_name, _, summary = COMMANDS[command]
    cfg = compose_config(config_name, overrides)
    if config_name not in SCHEMAS:
        return OmegaConf.to_yaml(cfg)
    rows = [(key, _show(value), text) for key, value, text in describe(config_name, cfg)]
    width = max(len(key) for key, _, _ in rows)
    values = min(24, max(len("value"), *(len(value) for _, value, _ in rows)))
    lines = [f"multiar {command}: {summary}", "", f"{'key':{width}}  {'value':{values}}  what it does"]
    lines += [f"{key:{width}}  {value:{values}}  {text}" for key, value, text in rows]
    return "\n".join(lines)


def _show(value: Any) -> str:
    """A config value as it is written on the command line (null, true, [a, b])."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    return repr(value) if isinstance(value, str) and (value != value.strip() or not value) else str(value)


class StderrHandler(logging.StreamHandler):
    """A log handler writing to whatever sys.stderr is when a record comes, not the stream it was made
    with: main() may run several times in one process (tests, notebooks), each with its own stderr."""

    @property
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # noqa: ANN001
        pass  # StreamHandler.__init__ sets it; the property always answers with today's stderr


def one_line(err: BaseException) -> str:
    """An exception as one line; OSErrors name their file first."""
    if isinstance(err, OSError) and err.filename and err.strerror:
        return f"{err.filename}: {err.strerror}"
    return first_line(err)


if __name__ == "__main__":
    sys.exit(main())
