"""Training features around the loop: precision=auto, init_from, weights=best|last, early stopping,
the logger group, samples written during training."""

from __future__ import annotations

import csv
import json
import logging

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import TINY
from safetensors.torch import load_file

from multiar.config import load_config
from multiar.engine import precision
from multiar.engine.model import GPT, ModelConfig
from multiar.errors import ConfigError
from multiar.training.loggers import check_logger
from multiar.training.run import train

BASE = [*TINY, "domain=protein", "data.max_documents=120", "optim.warmup_steps=2"]


def run_train(tmp_path, name, *extra):
    cfg = load_config("train", [*BASE, f"run_dir={tmp_path / name}", *extra])
    return train(cfg)


def test_precision_auto_follows_the_probe_and_caches_it(tmp_path, monkeypatch):
    calls = []

    def fake_flops(dtype, **kw):
        calls.append(dtype)
        return {torch.float32: 100e9, torch.bfloat16: speed}[dtype]

    monkeypatch.setattr(precision, "matmul_flops", fake_flops)
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512f"})
    speed = 300e9
    chosen, why = precision.resolve_precision("auto", "cpu", tmp_path / "a")
    assert chosen == "bf16-mixed" and "probe" in why and len(calls) == 2
    assert precision.resolve_precision("auto", "cpu", tmp_path / "a")[0] == "bf16-mixed"
    assert len(calls) == 2  # the second decision comes from the cache, no new probe
    speed = 50e9  # a CPU where bf16 runs at half fp32's speed
    assert precision.resolve_precision("auto", "cpu", tmp_path / "b")[0] == "32-true"
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"amx_bf16", "amx_tile"})
    assert precision.resolve_precision("auto", "cpu", tmp_path / "c") == (
        "bf16-mixed",
        "CPU has AMX (bf16 matrix units)",
    )
    assert precision.resolve_precision("32-true", "cpu", tmp_path / "c")[0] == "32-true"


def test_explicit_trainer_precision_wins_and_is_recorded(tmp_path):
    run_train(tmp_path, "r", "trainer.max_steps=2", "trainer.val_check_interval=2")
    config = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert config["precision_used"] == "32-true"  # TINY sets trainer.precision=32-true


def test_fp32_and_bf16_loss_curves_stay_close():
    # the same seed and data: bf16 autocast follows the fp32 curve within a small tolerance
    curves = {}
    for dtype in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = GPT(ModelConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        data = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(30):
            batch = torch.randint(0, 16, (8, 33), generator=data)  # 16 of 64 ids: learnable
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                logits = model(batch[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        curves[dtype] = losses
    assert curves["fp32"][-1] < curves["fp32"][0] - 1.0  # it learned
    assert max(abs(a - b) for a, b in zip(curves["fp32"], curves["bf16"], strict=True)) < 0.05


def test_weights_best_or_last_choose_what_is_exported(tmp_path):
    common = ["trainer.max_steps=6", "trainer.val_check_interval=2"]
    for which in ("best", "last"):
        run_train(tmp_path, which, *common, f"weights={which}")
        run_dir = tmp_path / which
        final = yaml.safe_load((run_dir / "config.yaml").read_text())["final"]
        ckpt = torch.load(run_dir / "checkpoints" / f"{which}.ckpt", weights_only=True)
        saved = load_file(run_dir / "model.safetensors")
        assert all(torch.equal(saved[k], ckpt["state_dict"][f"model.{k}"]) for k in saved)
        assert final["weights"] == which and final["weights_step"] == ckpt["global_step"]
        with open(run_dir / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
        val = {int(r["step"]): float(r["val/loss"]) for r in rows if r.get("val/loss")}
        if which == "best":
            assert final["weights_step"] == min(val, key=val.get) + 1  # logged at the step before
            assert final["val/loss"] == pytest.approx(min(val.values()), abs=1e-5)


def test_early_stop_ends_training_without_improvement(tmp_path):
    # min_delta larger than any possible gain: no validation counts as better, so it stops after patience
    result = run_train(
        tmp_path,
        "es",
        "trainer.max_steps=40",
        "trainer.val_check_interval=2",
        "early_stop.patience=1",
        "early_stop.min_delta=100",
    )
    assert result["steps"] == 4


def test_init_from_starts_from_the_runs_weights_and_tokenizer(tmp_path, caplog):
    run_train(tmp_path, "source", "trainer.max_steps=4", "trainer.val_check_interval=2")
    # lr tiny: after one step the new run's weights are the source's, up to the tiny update
    with caplog.at_level(logging.WARNING, logger="multiar"):
        run_train(
            tmp_path,
            "tuned",
            "trainer.max_steps=1",
            "trainer.val_check_interval=1",
            f"init_from={tmp_path / 'source'}",
            "optim.lr=1e-9",
            "weights=last",
            "domain.settings.max_len=5000",  # the source's saved domain decides: said, not silently dropped
        )
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("domain.settings")]
    assert "max_len=5000 given, None used" in line
    a, b = (
        load_file(tmp_path / "source" / "model.safetensors"),
        load_file(tmp_path / "tuned" / "model.safetensors"),
    )
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    fresh = load_file(
        run_train(
            tmp_path,
            "fresh",
            "trainer.max_steps=1",
            "trainer.val_check_interval=1",
            "optim.lr=1e-9",
            "weights=last",
        )["run_dir"]
        + "/model.safetensors"
    )
    assert not all(torch.allclose(a[k], fresh[k], atol=1e-3) for k in a)
    for bad, message in (
        (["model.n_embd=64"], "its model differs"),
        (["domain=code"], "a protein run"),
        ([f"ckpt_path={tmp_path / 'x.ckpt'}"], "init_from"),
    ):
        with pytest.raises(ConfigError, match=message):
            run_train(tmp_path, "bad", f"init_from={tmp_path / 'source'}", *bad)


def test_samples_are_written_and_scored_while_training(tmp_path):
    run_train(
        tmp_path,
        "s",
        "trainer.max_steps=5",
        "trainer.val_check_interval=5",
        "samples.every_n_steps=2",
        "samples.n=2",
        "samples.max_new_tokens=8",
    )
    run_dir = tmp_path / "s"
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == ["step_2", "step_4", "step_5"]
    assert (run_dir / "samples" / "step_4" / "samples.fasta").read_text().count(">") == 2
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = {int(r["step"]) for r in rows if r.get("protein/mean_length")}
    assert logged == {2, 4, 5}
    assert any(r.get("train/loss") for r in rows)  # one file: samples' metrics beside the loss


def test_logger_tensorboard_writes_events_beside_metrics_csv(tmp_path):
    pytest.importorskip("tensorboardX")
    run_train(tmp_path, "tb", "trainer.max_steps=2", "trainer.val_check_interval=2", "logger=tensorboard")
    assert list((tmp_path / "tb" / "tensorboard").rglob("events.out.tfevents.*"))
    assert (tmp_path / "tb" / "metrics.csv").exists()


def test_a_missing_logger_package_is_one_config_error(monkeypatch):
    monkeypatch.setattr("multiar.training.loggers.find_spec", lambda name: None)
    with pytest.raises(
        ConfigError, match=r"logger=wandb: the wandb package is not installed .*multiar\[wandb\]"
    ):
        check_logger({"name": "wandb"})
    check_logger({"name": "csv"})  # always there


def test_probe_cache_survives_a_corrupt_file(tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: set())
    monkeypatch.setattr(precision, "matmul_flops", lambda dtype, **kw: 1e9)
    (tmp_path / "precision.json").write_text("{not json")
    assert precision.resolve_precision("auto", "cpu", tmp_path)[0] == "32-true"
    assert json.loads((tmp_path / "precision.json").read_text())


def test_compile_true_compiles_training_and_validation(tmp_path, monkeypatch):
    # compile=true from the command line (a string there) reaches the module as True: one compiled forward
    # for training and validation (compile_blocks replaced by a counting pass-through; a real compile is
    # trained end to end in test_compile_when_it_pays); auto and false start eager
    from multiar.training import module as lit

    calls = []

    def counted(model):
        return lambda idx: calls.append(torch.is_grad_enabled()) or model.forward(idx)

    monkeypatch.setattr(lit, "compile_blocks", counted)
    run_train(tmp_path, "compiled", "trainer.max_steps=2", "trainer.val_check_interval=2", "compile=true")
    used = yaml.safe_load((tmp_path / "compiled" / "config.yaml").read_text())["compile_used"]
    assert used == {"setting": "true", "compile": True}
    assert calls.count(True) == 2 and calls.count(False) >= 1  # 2 training steps, then validation
    config = ModelConfig(vocab_size=32, n_layer=1, n_head=2, n_embd=16).to_dict()
    for setting in ("auto", False):
        module = lit.LitGPT(config, {"lr": 1e-3}, pad_id=0, compile=setting)
        assert module.forward_blocks == module.forward_validation == module.model.forward


def test_attention_setting_reaches_the_model_and_config_yaml(tmp_path, monkeypatch):
    # forced: the model trains on it (its training steps, not validation); auto: timed at the batch's shape
    # and the faster one taken
    import multiar.engine.model as model_module

    calls, matmul = [], model_module.matmul_attention
    monkeypatch.setattr(model_module, "matmul_attention", lambda *a: calls.append(1) or matmul(*a))
    run_train(tmp_path, "sdpa", "trainer.max_steps=2", "trainer.val_check_interval=2", "attention=sdpa")
    assert calls == []
    run_train(tmp_path, "matmul", "trainer.max_steps=2", "trainer.val_check_interval=2", "attention=matmul")
    assert len(calls) == 2  # 2 steps of its one layer (TINY: model.n_layer=1)
    used = yaml.safe_load((tmp_path / "matmul" / "config.yaml").read_text())["attention_used"]
    assert used == {"setting": "matmul", "attention": "matmul", "how": "forced"}
    run_train(tmp_path, "auto", "trainer.max_steps=2", "trainer.val_check_interval=2")
    used = yaml.safe_load((tmp_path / "auto" / "config.yaml").read_text())["attention_used"]
    assert used["setting"] == "auto" and used["how"] in ("measured", "cached")
    assert used["attention"] == min(used["ms"], key=used["ms"].get)
    with pytest.raises(ConfigError, match="attention"):
        run_train(tmp_path, "bad", "attention=flash")


def test_a_resumed_run_keeps_the_attention_it_trained_with(tmp_path, monkeypatch):
    from multiar.training import fastest_attention as fa

    picked = {"attention": "matmul", "how": "measured", "ms": {"sdpa": 2.0, "matmul": 1.0}, "shape": "s"}
    monkeypatch.setattr(fa, "choose_attention", lambda *a: picked)
    run_train(tmp_path, "run", "trainer.max_steps=2", "trainer.val_check_interval=2")
    monkeypatch.setattr(fa, "choose_attention", lambda *a: pytest.fail("a resumed run measured again"))
    run_train(tmp_path, "run", "trainer.max_steps=4", "trainer.val_check_interval=2", "ckpt_path=last")
    used = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["attention_used"]
    assert used == {"setting": "auto"} | picked | {"how": "resumed"}


def test_samples_of_a_step_replace_that_steps_earlier_folder(tmp_path):
    # a resumed run that reaches step N again replaces the samples its killed predecessor wrote there
    from types import SimpleNamespace

    from multiar.domains import build_domain
    from multiar.training.callbacks import TrainingSamples

    stale = tmp_path / "samples" / "step_2"
    stale.mkdir(parents=True)
    (stale / "sample_000.fasta").write_text(">old\nMKT\n")
    logged = []
    logger = SimpleNamespace(log_metrics=lambda m, step: logged.append((step, m)), save=lambda: None)
    trainer = SimpleNamespace(global_step=2, is_global_zero=True, logger=logger)
    module = SimpleNamespace(
        model=GPT(
            ModelConfig(
                vocab_size=build_domain("protein").vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16
            )
        )
    )
    callback = TrainingSamples(build_domain("protein"), tmp_path, every_n_steps=2, n=2, max_new_tokens=5)
    callback.sample(trainer, module)
    assert sorted(p.name for p in stale.iterdir()) == ["samples.fasta"]
    assert logged and logged[0][0] == 2 and "protein/mean_length" in logged[0][1]


def test_the_console_shows_progress_lines_and_none_of_lightnings_noise(tmp_path):
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    args = [*BASE, "trainer.max_steps=6", "trainer.val_check_interval=3", "trainer.log_every_n_steps=3"]
    # two batches per optimizer step: still one line per logged step
    args += ["trainer.enable_progress_bar=true", "+trainer.accumulate_grad_batches=2", "run_dir=run"]
    multiar = str(Path(sys.executable).parent / "multiar")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out = subprocess.run(
        [multiar, "train", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    console = out.stdout + out.stderr
    for noise in ("litlogger", "LeafSpec", "Previous log files", "Epoch ", "/-", "GPU available", "Seed set"):
        assert noise not in console, noise
    steps = re.findall(r"step (\d+)/6 +loss \d+\.\d+ +[\d.]+k? tok/s +ETA \d+:\d\d", console)
    assert steps == ["3", "6"], console[-3000:]
    assert re.search(r"step 3/6 +val/loss \d+\.\d+", console)
