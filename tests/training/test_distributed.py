"""Distributed training: two DDP processes on the CPU (gloo), launched by Lightning as `multiar train`
re-run per rank; test-side hooks (tests/hooks/sitecustomize.py) record what each rank saw."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY
from hooks import hooked_env

from multiar.data.corpus import prepare_corpus
from multiar.data.packing import pack_dataset
from multiar.run_folder import load_run

MULTIAR = str(Path(sys.executable).parent / "multiar")
DDP = ["train", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]


def test_ddp_on_two_cpu_processes_writes_one_run(tmp_path):
    # Lightning starts rank 1 by re-running this command while rank 0 writes the run folder: only
    # rank 0 may judge whether the folder already holds a run
    args = [
        *DDP,
        "data.max_documents=220",  # 127 validation blocks: odd, one rank gets one more
        *TINY,
        "trainer.max_steps=6",
        "trainer.val_check_interval=3",
        "trainer.limit_val_batches=1.0",
        "weights=last",
        "run_dir=run",
    ]
    record = tmp_path / "ranks"
    record.mkdir()
    env = hooked_env(MULTIAR_TEST_RANK_RECORD=str(record))
    out = subprocess.run([MULTIAR, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("protein: val/loss") == 2  # both ranks finished
    ranks = [json.loads((record / f"rank_{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]["batches"]) == len(ranks[1]["batches"]) == 6
    assert not set(ranks[0]["batches"]) & set(ranks[1]["batches"])  # each rank its own batches
    run = load_run(tmp_path / "run")
    h = hashlib.sha256()
    for name, t in sorted(run.model.state_dict().items()):
        h.update(name.encode() + t.float().numpy().tobytes())
    assert h.hexdigest() == ranks[0]["weights"]  # the saved weights are rank 0's
    # the validation loss is the token-weighted mean over every validation block, each counted once
    config = run.config
    corpus = prepare_corpus(
        run.domain, {}, None, cache_dir=config["data"]["cache_dir"], max_documents=220, fit=False
    )
    blocks = torch.stack(
        list(pack_dataset(corpus.val, run.model.config.block_size, run.domain)["block"])
    ).long()
    targets = blocks[:, 1:].masked_fill(blocks[:, 1:] == run.domain.pad_id, -100)
    with torch.no_grad():
        logits = run.model(blocks[:, :-1])
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100).item()
    assert len(blocks) % 2 == 1  # where Lightning's default sampler would count a repeated block twice
    assert config["final"]["val/loss"] == pytest.approx(expected, abs=2e-5)


def alive(pid: int) -> bool:
    """Whether a process runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


@pytest.mark.parametrize("bad_rank", [pytest.param(0, marks=pytest.mark.slow), 1])  # ~40 s each
def test_a_nan_on_one_rank_stops_every_rank_together_with_one_line(tmp_path, bad_rank):
    # the loss turns NaN from step 7 on one rank only (tests/hooks/sitecustomize.py); the finite flag is
    # reduced over ranks every log_every_n_steps (3) steps and before each validation (every 5 steps).
    # The launcher process lingers 6 s at exit: longer than the 5 s between looks of Lightning's watch
    # over the ranks it started, which SIGKILLed it (exit -9, line unsaid) when the other rank's exit 1
    # came first; CI met that race once
    pids = tmp_path / "pids"
    pids.mkdir()
    args = [
        *DDP,
        "data.max_documents=220",
        *TINY,
        "trainer.max_steps=40",
        "trainer.val_check_interval=5",
        "trainer.log_every_n_steps=3",
        "run_dir=run",
    ]
    env = hooked_env(
        MULTIAR_TEST_NAN_AT="7",
        MULTIAR_TEST_NAN_RANK=str(bad_rank),
        MULTIAR_TEST_PIDS=str(pids),
        MULTIAR_TEST_LAUNCHER_EXIT_DELAY_S="6",
    )
    try:
        out = subprocess.run(
            [MULTIAR, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
        )
        assert out.returncode == 1, (out.returncode, out.stderr[-3000:])
        assert len(list(pids.iterdir())) == 2  # both ranks ran
        left = [int(p.name) for p in pids.iterdir() if alive(int(p.name))]
        assert left == []  # no rank outlives the command
    finally:
        for p in pids.iterdir():  # a failed run's orphans are the test's to end
            if alive(int(p.name)):
                os.kill(int(p.name), signal.SIGKILL)
    said = [line for line in out.stderr.splitlines() if line.startswith("multiar train:")]
    assert said == [
        f"multiar train: training loss became nan or inf at step 7 on rank {bad_rank}; stopped on every "
        "rank. The last good checkpoint is kept: lower optim.lr or check the data, then resume with "
        "ckpt_path=last"
    ], out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "after rank 0 stopped: killed" not in out.stderr  # none hung
    good = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert good["global_step"] == 5  # the checkpoint before the NaN, untouched
    assert all(torch.isfinite(t).all() for t in good["state_dict"].values())
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_a_second_nodes_first_process_is_not_global_rank_zero(monkeypatch):
    # Lightning's own launcher on node 1: its first process has LOCAL_RANK 0 (or none) and NODE_RANK 1
    from multiar.training.run import _launcher_rank

    monkeypatch.setenv("NODE_RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    for var in ("RANK", "SLURM_PROCID", "GROUP_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert _launcher_rank(devices_per_node=2) == 2
    import lightning as L
    from lightning.fabric.utilities.rank_zero import rank_zero_only
    from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only

    # the Trainer sets the process-wide rank Lightning's rank_zero_only reads (2 here): put it back after
    # this test, or later in-process runs think they are not rank 0 (no metrics.csv)
    for holder in (rank_zero_only, utils_rank_zero_only):
        monkeypatch.setattr(holder, "rank", getattr(holder, "rank", 0))
    trainer = L.Trainer(accelerator="cpu", devices=2, num_nodes=2, strategy="ddp", logger=False)
    assert trainer.global_rank == 2 and not trainer.is_global_zero  # the rank Lightning will use agrees
    monkeypatch.setenv("NODE_RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("SLURM_PROCID", "0")  # SLURM's variable is set in an salloc shell, not managed
    assert _launcher_rank(devices_per_node=2) == 1


def test_other_ranks_never_read_the_run_folder_rank_zero_replaces(tmp_path, monkeypatch):
    # overwrite=true: global rank 0 renames the folder; a rank reading config.yaml meanwhile could see
    # anything, here a half-written file. Only rank 0 judges the folder
    from multiar.config import load_config
    from multiar.errors import ConfigError
    from multiar.training.run import check_train_config

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("domain: {name: prot")  # cut mid-write
    args = [*DDP[1:], "trainer.num_nodes=2", *TINY, f"run_dir={run}", "overwrite=true"]
    cfg = load_config("train", args)
    monkeypatch.setenv("NODE_RANK", "0")
    with pytest.raises(ConfigError, match="not a readable run config"):
        check_train_config(cfg)  # rank 0 reads it, and says so
    monkeypatch.setenv("NODE_RANK", "1")
    assert check_train_config(cfg) is None  # node 1 leaves the folder to rank 0


def test_a_validation_split_of_one_block_validates_on_both_ranks(tmp_path):
    # one validation document of one block: rank 1 has no block of its own, yet must enter the
    # validation loop (and its reduce) with rank 0, which sees the whole figure
    data = tmp_path / "data"
    data.mkdir()
    for i, seq in enumerate(["MKTAYIAKQRQISFVKSHFSRQ", "MKKLLPTAAAGLLLLAAQPAMA", "MSTNPKPQRKTKRNTNRRPQ"]):
        (data / f"p{i}.fasta").write_text(f">p{i}\n{seq}\n")
    args = [*DDP, *TINY, f"data.paths=[{data}]", "trainer.max_steps=2", "trainer.val_check_interval=2"]
    out = subprocess.run(
        [MULTIAR, *args, "run_dir=run"],
        cwd=tmp_path,
        env=hooked_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    run = load_run(tmp_path / "run")
    assert run.config["data_stats"]["documents_val"] == 1
    # the token-weighted mean over the one real block (the padding block scores no token)
    assert run.config["final"]["val/loss"] == pytest.approx(run.config["final"]["val_docs/loss"], abs=2e-5)


def test_rank_zero_kills_a_rank_process_still_running_after_its_wait_and_says_so(caplog):
    from types import SimpleNamespace

    from multiar.training.run import _end_other_ranks

    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()  # ended before rank 0 looks, however slow its start on a loaded machine
    hung = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    trainer = SimpleNamespace(
        is_global_zero=True, strategy=SimpleNamespace(launcher=SimpleNamespace(procs=[done, hung]))
    )
    try:
        with caplog.at_level(logging.WARNING, logger="multiar"):
            _end_other_ranks(trainer, wait_s=1.0)
    finally:
        hung.kill()  # a no-op once killed; a failed test leaves no process behind
        hung.wait()
    assert done.returncode == 0 and hung.returncode == -signal.SIGKILL
    assert [r.getMessage() for r in caplog.records] == [
        f"rank process {hung.pid} still ran 1 s after rank 0 stopped: killed"
    ]
