"""Distributed training: two DDP processes on the CPU (gloo), launched by Lightning as `multiar train`
re-run per rank; test-side hooks (tests/hooks/sitecustomize.py) record what each rank saw."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY
from hooks import hooked_env

from multiar.data import pack_dataset, prepare_corpus
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
