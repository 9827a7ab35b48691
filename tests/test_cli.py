"""The console script and the config groups."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from itertools import product
from pathlib import Path

import pytest
import torch
import yaml
from Bio import SeqIO
from conftest import TINY, copy_fixture_run
from omegaconf import OmegaConf

from multiar.config import config_dir, load_config
from multiar.domains import DOMAINS
from multiar.engine.model import ModelConfig
from multiar.errors import ConfigError
from multiar.run_folder import load_run

MULTIAR = str(Path(sys.executable).parent / "multiar")


def run_cli(args, cwd, timeout=300):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([MULTIAR, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_every_config_group_composes():
    groups = {
        p.name: sorted(f.stem for f in p.glob("*.yaml"))
        for p in config_dir().iterdir()
        if p.is_dir() and not p.name.startswith("__")
    }
    assert groups["domain"] == sorted(DOMAINS)  # one conf/domain/NAME.yaml per registered domain
    assert {"code_cpu", "music_cpu", "music_pop909_cpu", "protein_cpu"} <= set(groups["experiment"])
    assert {k: groups[k] for k in ("logger", "model", "trainer")} == {
        "logger": ["csv", "mlflow", "tensorboard", "wandb"],
        "model": ["base", "small", "tiny"],
        "trainer": ["cpu", "ddp", "fsdp", "gpu"],
    }
    for domain, model, trainer in product(groups["domain"], groups["model"], groups["trainer"]):
        cfg = load_config("train", [f"domain={domain}", f"model={model}", f"trainer={trainer}"])
        assert cfg.domain.name == domain and cfg.model.name == model
        args = {k: v for k, v in cfg.model.items() if k != "name"}
        assert ModelConfig(vocab_size=100, **args).block_size >= 512
        assert cfg.trainer.precision is None and cfg.precision == "auto"  # resolved when training starts
    for logger in groups["logger"]:
        assert load_config("train", [f"logger={logger}"]).logger.name == logger
    for recipe in groups["experiment"]:
        cfg = load_config("train", [f"+experiment={recipe}"])
        assert cfg.domain.name == recipe.split("_")[0] and cfg.run_dir == f"runs/{recipe}"
        days, hours, minutes, seconds = map(int, cfg.trainer.max_time.split(":"))
        assert days == hours == 0 and minutes * 60 + seconds <= 15 * 60  # a recipe's wall clock is bounded
    assert load_config("eval", ["run=x"]).data.paths is None
    assert load_config("score", ["run=x", "data.paths=[a.fasta]"]).data.paths == ["a.fasta"]
    assert load_config("generate", ["run=x"]).run == "x"
    assert set(load_config("demo").domains) == set(DOMAINS)  # the demo trains every domain


@pytest.mark.parametrize(
    "prompt", ["def parse(", "x = 'a' + \"b\"", "a\\b", "end\\", "it\\'s", "MKT", "'quoted'"]
)
def test_free_text_prompts_pass_through_unchanged(prompt):
    expected = prompt[1:-1] if prompt == "'quoted'" else prompt
    assert load_config("generate", ["run=r", f"prompt={prompt}"]).prompt == expected


def test_help_lists_the_commands(tmp_path):
    out = run_cli(["--help"], tmp_path)
    assert out.returncode == 0
    for command in ("train", "generate", "demo"):
        assert command in out.stdout


def test_bad_input_is_one_clear_line(tmp_path):
    out = run_cli(["generate", "run=nowhere"], tmp_path)
    assert (
        out.returncode == 1
        and out.stderr.strip()
        == "multiar generate: nowhere: not a finished multiar run (missing config.yaml)"
    )
    # arguments and config: exit code 2, before any work (a missing data.paths entry was exit 1 before)
    out = run_cli(["train", "data.paths=[missing.fasta]"], tmp_path)
    assert out.returncode == 2 and out.stderr.strip() == (
        "multiar train: data.paths: missing.fasta: no such file or folder"
    )
    out = run_cli(["generate"], tmp_path)
    assert out.returncode == 2 and out.stderr.strip() == "multiar generate: run: missing mandatory value"
    out = run_cli(["frobnicate"], tmp_path)
    assert out.returncode == 2 and "unknown command" in out.stderr


def test_train_and_generate_through_the_console_script_outside_the_checkout(tmp_path):
    fasta = tmp_path / "my.fasta"
    with open(fasta, "w") as f:
        for i in range(40):
            f.write(f">seq{i}\n{'MKTAYIAKQRQISFVKSHFSRQ'[i % 5 :]}{'LEEAGHW' * (i % 4 + 1)}\n")
    args = [
        "train",
        "domain=protein",
        f"data.paths=[{fasta}]",
        "model=tiny",
        "model.block_size=128",
        "trainer.max_steps=12",
        "trainer.val_check_interval=6",
        "trainer.enable_progress_bar=false",
        "run_dir=runs/p",
    ]
    out = run_cli(args, tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "protein: val/loss" in out.stdout
    out = run_cli(
        [
            "generate",
            "run=runs/p",
            "n=8",
            "max_new_tokens=100",
            "temperature=0.9",
            "top_k=0",
            "top_p=0.95",
            "seed=1",
            "out=out/",
            "prompt=MKT",
        ],
        tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    records = list(SeqIO.parse(tmp_path / "out" / "samples.fasta", "fasta"))
    assert len(records) == 8 and all(str(r.seq).startswith("MKT") for r in records)


def test_demo_trains_and_writes_every_domain(tmp_path, capsys):
    from multiar.cli import main

    fast = [
        "model.n_layer=1",
        "model.n_embd=32",
        "model.n_head=2",
        "model.block_size=128",
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        "trainer.limit_val_batches=2",
        "trainer.enable_progress_bar=false",
        "data.max_documents=30",
    ]
    fast = "[" + ",".join(f"'{o}'" for o in fast) + "]"  # Hydra list of strings that contain '='
    args = ["demo", f"out={tmp_path / 'out'}", f"runs={tmp_path / 'runs'}"]
    args += [f"train_overrides.{d}={fast}" for d in ("music", "code", "protein")]
    args += [
        "generate.music.max_new_tokens=60",
        "generate.code.max_new_tokens=60",
        "generate.protein.max_new_tokens=60",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "demo finished" in printed
    out = tmp_path / "out"
    assert len(list((out / "music").glob("*.mid"))) >= 4
    assert len(list((out / "code").glob("*.py"))) >= 4
    assert len(list(SeqIO.parse(out / "protein" / "samples.fasta", "fasta"))) >= 16


def test_multirun_trains_each_combination_into_its_own_folder(tmp_path):
    args = [
        "train",
        "-m",
        "experiment=protein_cpu,code_cpu",  # the bare form, as README writes recipes
        *TINY,
        "data.max_documents=20",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    out = run_cli(args, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    for name in ("protein", "code"):
        config = yaml.safe_load((tmp_path / "sweep" / f"+experiment={name}_cpu" / "config.yaml").read_text())
        assert config["domain"]["name"] == name and config["model"]["name"] == f"{name}_cpu"
        name = f"+experiment={name}_cpu"
        assert (tmp_path / "sweep" / name / "model.safetensors").exists()
    bad = run_cli(["train", "-m", "domain=protein,nope"], tmp_path)
    assert bad.returncode == 2 and "Could not find 'domain/nope'" in bad.stderr


def test_a_generate_sweep_on_a_code_run_writes_each_combination(tmp_path):
    from multiar.training.run import train

    data = tmp_path / "src"
    data.mkdir()
    for i in range(4):
        (data / f"m{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n")
    run = tmp_path / "run"
    train(
        load_config(
            "train",
            [
                *TINY,
                "domain=code",
                f"data.paths=[{data}]",
                f"run_dir={run}",
                "data.val_fraction=0.3",
                "trainer.max_steps=2",
                "trainer.val_check_interval=2",
            ],
        )
    )
    # each job checks its filters before sampling, inside Hydra's multirun
    args = [
        "generate",
        "-m",
        f"run={run}",
        "seed=1,2",
        "n=1",
        "max_new_tokens=4",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    out = run_cli(args, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    for seed in (1, 2):
        assert (tmp_path / "sweep" / f"seed={seed}" / "generate.json").exists()


def test_experiment_composes_with_or_without_plus():
    for recipe in ("protein_cpu", "code_cpu", "music_cpu", "music_pop909_cpu"):
        bare = load_config("train", [f"experiment={recipe}", "trainer.max_steps=7"])
        plus = load_config("train", [f"+experiment={recipe}", "trainer.max_steps=7"])
        assert OmegaConf.to_container(bare) == OmegaConf.to_container(plus)
        assert bare.run_dir == f"runs/{recipe}" and bare.trainer.max_steps == 7


def _help(command: str, capsys, *overrides: str) -> dict[str, tuple[str, str]]:
    """`multiar <command> --help` as {key: (value, help)}, from the table it prints."""
    from multiar.cli import main

    assert main([command, "--help", *overrides]) == 0
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        parts = line.split(None, 2)
        if len(parts) == 3 and "=" not in parts[0] and (parts[0][0].islower()):
            rows[parts[0]] = (parts[1], parts[2])
    return rows


def test_help_names_every_key_with_what_it_does(capsys):
    train = _help("train", capsys, "model=small")
    assert train["optim.lr"][1].startswith("peak learning rate")
    assert train["model.n_layer"] == ("6", "transformer blocks")  # the composed value, with its help
    assert "Lightning Trainer argument" in train["trainer.max_steps"][1]
    generate = _help("generate", capsys)  # run=??? is no error for --help
    assert generate["run"][0] == "???" and "run folder" in generate["run"][1]
    assert "nucleus" in generate["top_p"][1] and generate["device"][0] == "auto"
    quantize = _help("quantize", capsys)
    assert quantize["mode"][0] == "int8" and "int4" in quantize["mode"][1]
    for command in ("train", "generate", "quantize", "eval", "score", "export", "demo"):
        rows = _help(command, capsys)
        assert rows and all(help_text.strip() for _, help_text in rows.values()), command


def test_device_auto_resolves_to_a_real_device(tmp_path):
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    for command, args in [
        ("generate", ["run=r"]),
        ("eval", ["run=r"]),
        ("score", ["run=r", "data.paths=[a.fasta]"]),
        ("quantize", ["run=r"]),
    ]:
        assert load_config(command, args).device == expected  # the default is auto
        assert load_config(command, [*args, "device=auto"]).device == expected
        assert load_config(command, [*args, "device=cpu"]).device == "cpu"
    with pytest.raises(ConfigError, match="device: must be auto, cpu, cuda or cuda:N, got 'gpu'"):
        load_config("generate", ["run=r", "device=gpu"])
    run = load_run(copy_fixture_run(tmp_path), device="auto")
    assert run.model.wte.weight.device.type == expected


def test_model_presets_have_learning_rates_for_their_size():
    lr = {m: load_config("train", [f"model={m}"]).optim.lr for m in ("tiny", "small", "base")}
    # GPT-3 (Brown et al. 2020, table 2.1) / nanoGPT: 6e-4 at GPT-2 small's size; nanoGPT's 10M
    # shakespeare-char model 1e-3; smaller models take larger steps
    assert lr == {"tiny": 3e-3, "small": 1e-3, "base": 6e-4}
    assert load_config("train", ["model=base", "optim.lr=1e-4"]).optim.lr == 1e-4  # an override wins
    assert load_config("train", ["optim.lr=1e-4", "model=base"]).optim.lr == 1e-4
    assert load_config("train", ["+experiment=protein_cpu"]).optim.lr == 2e-3  # a recipe's own lr wins
    assert load_config("train", ["+experiment=protein_cpu", "model=base"]).optim.lr == 2e-3


@pytest.mark.parametrize(
    "preset,lr,width",
    [
        ("tiny", 3e-3, 128),
        pytest.param("small", 1e-3, 384, marks=pytest.mark.slow),
        pytest.param("base", 6e-4, 768, marks=pytest.mark.slow),
    ],
)
def test_each_preset_learning_rate_lowers_the_training_loss(tmp_path, preset, lr, width):
    # 30 steps of the preset (its shape and optim.lr; shorter windows) on 40 bundled chorales;
    # measured (tiny): train/loss 6.19 at the first step, 1.8-1.95 over the last three
    from multiar.training.run import train

    cfg = load_config(
        "train",
        [
            "domain=music",
            f"model={preset}",
            "model.block_size=128",
            "data.batch_size=4",
            "data.max_documents=40",
            "trainer.max_steps=30",
            "trainer.val_check_interval=30",
            "trainer.limit_val_batches=1",
            "trainer.log_every_n_steps=1",
            "trainer.enable_progress_bar=false",
            "trainer.precision=32-true",
            "samples.every_n_steps=0",
            f"run_dir={tmp_path / 'run'}",
        ],
    )
    assert cfg.optim.lr == lr and cfg.model.n_embd == width
    threads = torch.get_num_threads()
    if preset == "tiny":
        torch.set_num_threads(
            1
        )  # matrices this small gain nothing from a second thread, and lose on a busy CPU
    try:
        train(cfg)
    finally:
        torch.set_num_threads(threads)
    with open(tmp_path / "run" / "metrics.csv") as f:
        losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(losses) == 30
    assert max(losses[-3:]) < 0.5 * losses[0], losses
