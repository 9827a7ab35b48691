"""Faults injected on purpose: a killed training run (also mid-checkpoint-write), a replaced run, a loss
that turns NaN, a full disk or a refused write; each loses no data and says what happened in one line."""

from __future__ import annotations

import csv
import errno
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, copy_fixture_run
from hooks import hooked_env

import multiar
from multiar.cli import main
from multiar.config import load_config
from multiar.errors import ConfigError
from multiar.training.module import LitGPT
from multiar.training.run import train

MULTIAR = str(Path(sys.executable).parent / "multiar")
TINY = [*TINY, "optim.lr=1e-2", "optim.warmup_steps=2"]


def code_folder(tmp_path: Path, k: int = 30) -> Path:
    """k real source files from the standard library, copied so a test may touch them."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    folder = tmp_path / "src"
    folder.mkdir()
    for f in sorted(stdlib.glob("*.py"))[:k]:
        shutil.copy(f, folder)
    return folder


def cli(args, cwd, env_extra=None, timeout=300):
    env = hooked_env(**(env_extra or {}))  # the test-side hooks, each off unless its variable is set
    return subprocess.run([MULTIAR, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def train_rows(metrics_csv: Path) -> list[tuple[int, float]]:
    with open(metrics_csv, newline="") as f:
        return [(int(r["step"]), float(r["train/loss"])) for r in csv.DictReader(f) if r.get("train/loss")]


def resumed_step(stderr: str) -> int:
    return int(re.search(r"resumed at step (\d+)", stderr).group(1))


def test_the_package_holds_no_test_hooks():
    # hooks that tests need live in tests/hooks (a sitecustomize on the subprocess's PYTHONPATH)
    package = Path(multiar.__file__).parent
    assert [p.name for p in sorted(package.rglob("*.py")) if "MULTIAR_TEST" in p.read_text()] == []


def test_killed_during_a_checkpoint_write_resumes_from_the_last_whole_one_with_its_own_tokenizer(tmp_path):
    src = code_folder(tmp_path)
    args = [
        "train",
        "domain=code",
        f"data.paths=[{src}]",
        "domain.settings.vocab_size=400",
        "run_dir=run",
        "trainer.max_steps=30",
        "trainer.val_check_interval=5",
        *TINY,
    ]
    # the 3rd checkpoint write (after best.ckpt and last.ckpt at step 5) is cut half-way by SIGKILL
    killed = cli(args, tmp_path, {"MULTIAR_TEST_KILL_IN_CHECKPOINT_WRITE": "3"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run = tmp_path / "run"
    tokenizer = (run / "domain" / "tokenizer.json").read_bytes()  # saved before the first step
    assert list((run / "checkpoints").glob(".*.tmp"))  # the half-written temporary, under no real name
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5
    # an input file changes: a tokenizer refitted from the data would differ; the run keeps its own
    os.utime(next(src.glob("*.py")), (time.time() + 100, time.time() + 100))
    resumed = cli([*args, "ckpt_path=last"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming with the run's own tokenizer" in resumed.stderr
    assert resumed_step(resumed.stderr) == 5  # lost at most one checkpoint interval (killed at 10)
    assert (run / "domain" / "tokenizer.json").read_bytes() == tokenizer
    assert not list((run / "checkpoints").glob(".*.tmp")) and not list(run.rglob("*-v1.ckpt"))
    rows = train_rows(run / "metrics.csv")
    steps = [s for s, _ in rows]
    assert steps == sorted(set(steps)) and steps[-1] == 29  # no step twice, the curve runs to the end
    first = dict(rows)
    # the curve continues: the first loss after resuming is far below the untrained start (ln V)
    assert first[5] < math.log(400) - 0.5 and first[0] > first[5]


def test_sigkill_mid_run_then_the_same_command_resumes(tmp_path):
    args = [
        "train",
        "domain=protein",
        "data.max_documents=300",
        "run_dir=run",
        "trainer.max_steps=100000",
        "trainer.val_check_interval=10",
        *TINY,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([MULTIAR, *args], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(1.0)  # mid-run, between checkpoints or inside one
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert last.exists()
    step = torch.load(last, weights_only=True)["global_step"]
    assert step >= 10
    resumed = cli([*args[:4], "trainer.max_steps=" + str(step + 10), *args[5:], "ckpt_path=last"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed_step(resumed.stderr) == step
    steps = [s for s, _ in train_rows(tmp_path / "run" / "metrics.csv")]
    assert steps == sorted(set(steps)) and steps[-1] == step + 9


FAST = [
    "domain=protein",
    "data.max_documents=200",
    "trainer.val_check_interval=5",
    "trainer.limit_val_batches=2",
    *TINY,
]


def test_resume_with_nothing_to_resume_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="nothing to resume"):
        train(load_config("train", [*FAST, f"run_dir={tmp_path / 'run'}", "ckpt_path=last"]))
    assert not (tmp_path / "run").exists()


def test_overwrite_replaces_the_whole_run_and_a_failed_replacement_keeps_the_old(tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(load_config("train", [*FAST, f"run_dir={run}", "trainer.max_steps=12"]))
    (run / "old-marker").write_text("from the first run")
    train(load_config("train", [*FAST, f"run_dir={run}", "trainer.max_steps=6", "overwrite=true"]))
    assert not (run / "old-marker").exists() and not list(run.rglob("*-v1.ckpt"))
    steps = [s for s, _ in train_rows(run / "metrics.csv")]
    assert max(steps) == 5 and len(steps) == len(set(steps))  # only the new run's rows
    assert not list(tmp_path.glob(".run.replaced-*"))

    (run / "old-marker").write_text("second run")

    def broken(self, batch, batch_idx):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(LitGPT, "training_step", broken)
    with pytest.raises(RuntimeError, match="injected failure"):
        train(load_config("train", [*FAST, f"run_dir={run}", "trainer.max_steps=6", "overwrite=true"]))
    assert (run / "old-marker").read_text() == "second run" and (run / "model.safetensors").exists()


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real = LitGPT._loss

    def poisoned(self, batch, forward):
        loss, n = real(self, batch, forward)
        if self.training and self.global_step >= 7:
            loss = loss * float("nan")
        return loss, n

    monkeypatch.setattr(LitGPT, "_loss", poisoned)
    run = tmp_path / "run"
    with pytest.raises(FloatingPointError, match="became nan or inf at step 7; stopped on every rank"):
        train(load_config("train", [*FAST, f"run_dir={run}", "trainer.max_steps=20"]))
    good = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert good["global_step"] == 5
    assert all(torch.isfinite(t).all() for t in good["state_dict"].values())


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
@pytest.mark.parametrize("failing", ["generate.json", "second sample"])
def test_a_failed_write_is_one_line_and_keeps_only_complete_files(
    tmp_path, monkeypatch, capsys, code, failing
):
    run = copy_fixture_run(tmp_path)
    out = tmp_path / "out"
    import multiar.files

    real_replace, real_write = os.replace, os.write
    fasta_writes = []

    def failing_replace(src, dst):  # whole files (the report) go through a rename
        if failing == "generate.json" and Path(dst).name == failing:
            raise OSError(code, os.strerror(code))
        return real_replace(src, dst)

    def failing_write(fd, data):  # samples.fasta grows by appends: the second batch's half gets written
        if failing == "second sample" and os.readlink(f"/proc/self/fd/{fd}").endswith("samples.fasta"):
            fasta_writes.append(fd)
            if len(fasta_writes) == 2:
                real_write(fd, data[: len(data) // 2])
                raise OSError(code, os.strerror(code))
        return real_write(fd, data)

    monkeypatch.setattr(multiar.files.os, "replace", failing_replace)
    monkeypatch.setattr(multiar.files.os, "write", failing_write)
    args = [f"run={run}", f"out={out}", "n=3", "batch_size=1", "max_new_tokens=10", "min_new_tokens=10"]
    rc = main(["generate", *args])
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the log's lines (the decode layout)
    name = "generate.json" if failing == "generate.json" else "samples.fasta"
    assert rc == 1 and err == f"multiar generate: {out / name}: cannot write: {os.strerror(code)}"
    # no temporary left: the samples so far, the journal a resume goes on from, and (when only the report
    # failed) the figures written before it
    left = sorted(p.name for p in out.iterdir())
    if failing == "generate.json":
        journal = ["generate.resume", "generate.resume.files"]  # the journal and its list of files
        assert left == sorted(["composition.png", *journal, "lengths.png", "samples.csv", "samples.fasta"])
    else:
        assert "generate.json" not in left and not [n for n in left if n.startswith(".")], left
    from Bio import SeqIO

    kept = list(SeqIO.parse(out / "samples.fasta", "fasta"))
    # the first batch whole, the failed half-record cut away: a resumed run goes on from whole records
    assert len(kept) == (3 if failing == "generate.json" else 1) and all(len(r.seq) == 10 for r in kept)
    assert (out / "samples.fasta").read_text().endswith("\n")


def test_writing_to_dev_full_is_a_clear_error():
    from multiar.files import write_new_file

    def to_full(tmp):
        with open("/dev/full", "wb") as f:
            f.write(b"x" * 10)

    target = Path(os.environ.get("TMPDIR", "/tmp")) / f"multiar-devfull-{os.getpid()}.bin"
    with pytest.raises(OSError, match="No space left on device") as info:
        write_new_file(target, to_full)
    assert info.value.filename == str(target) and not target.exists()
    assert not list(target.parent.glob(f".{target.name}.*"))


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_outputs_get_the_permissions_the_umask_gives(tmp_path, umask):
    run = copy_fixture_run(tmp_path)
    old = os.umask(umask)
    try:
        assert main(["generate", f"run={run}", f"out={tmp_path / 'out'}", "n=2", "max_new_tokens=8"]) == 0
    finally:
        os.umask(old)
    for f in (tmp_path / "out").iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f
