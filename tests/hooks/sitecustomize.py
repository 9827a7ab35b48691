"""Test-only hooks for `multiar` subprocesses, kept out of the package.

A test puts this folder on PYTHONPATH; Python imports this file at start-up, and each hook below is
installed only when its environment variable is set (otherwise nothing is imported, nothing changes):

MULTIAR_TEST_KILL_IN_CHECKPOINT_WRITE=N  SIGKILL this process half-way through its N-th checkpoint
                                         write (a half-written temporary stays, as after a real kill)
MULTIAR_TEST_RANK_RECORD=FOLDER          each rank writes FOLDER/rank_<R>.json: a digest of every
                                         training batch it drew and of its final weights
MULTIAR_TEST_NAN_AT=STEP                 the training loss turns NaN from STEP on, on the rank named by
MULTIAR_TEST_NAN_RANK=R                  (default 0); each rank writes its pid to
                                         MULTIAR_TEST_PIDS/<pid> when that is set
MULTIAR_TEST_KILL_BEFORE_JOURNAL=N      SIGKILL this process just before it journals N or more finished
                                         samples (generate): that batch's files are written, the
                                         journal one batch behind, as a kill between the two leaves them
MULTIAR_TEST_LAUNCHER_EXIT_DELAY_S=S     the process Lightning's launcher runs in (the one started
                                         without LOCAL_RANK) sleeps S seconds as its very last act
"""

from __future__ import annotations

import os

KILL_ENV = "MULTIAR_TEST_KILL_IN_CHECKPOINT_WRITE"
RANK_RECORD_ENV = "MULTIAR_TEST_RANK_RECORD"
NAN_AT_ENV, NAN_RANK_ENV, PIDS_ENV = "MULTIAR_TEST_NAN_AT", "MULTIAR_TEST_NAN_RANK", "MULTIAR_TEST_PIDS"
KILL_JOURNAL_ENV = "MULTIAR_TEST_KILL_BEFORE_JOURNAL"
EXIT_DELAY_ENV = "MULTIAR_TEST_LAUNCHER_EXIT_DELAY_S"


def kill_in_checkpoint_write(n: int) -> None:
    """The N-th fsync of a checkpoint temporary cuts the file to half and SIGKILLs this process."""
    import signal
    import types

    import multiar.training.checkpoint_io as checkpoint_io

    writes = 0

    def fsync(fd: int) -> None:
        nonlocal writes
        writes += 1
        if writes == n:
            os.ftruncate(fd, os.fstat(fd).st_size // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        os.fsync(fd)

    # the module's own view of `os` only: every other fsync in the process stays the real one
    proxy = types.ModuleType("os")
    proxy.__dict__.update(vars(os))
    proxy.fsync = fsync
    checkpoint_io.os = proxy


def kill_before_journal(done: int) -> None:
    """The first journal save of `done` or more finished samples SIGKILLs this process instead."""
    import signal

    from multiar.commands import resume

    real = resume.save

    def save(out_dir, digest, state) -> None:  # noqa: ANN001
        if getattr(state, "done", 0) >= done:
            os.kill(os.getpid(), signal.SIGKILL)
        real(out_dir, digest, state)

    resume.save = save


def record_ranks(folder: str) -> None:
    """Every Trainer gets a callback that writes what its rank saw (batches drawn, final weights)."""
    import hashlib
    import json
    from pathlib import Path

    import lightning as L

    class RankRecord(L.Callback):
        def __init__(self) -> None:
            self.batches: list[str] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
            self.batches.append(hashlib.sha256(batch.cpu().numpy().tobytes()).hexdigest()[:16])

        def on_fit_end(self, trainer, pl_module) -> None:  # noqa: ANN001
            h = hashlib.sha256()
            for name, t in sorted(pl_module.model.state_dict().items()):
                h.update(name.encode() + t.detach().float().cpu().numpy().tobytes())
            record = {"rank": trainer.global_rank, "batches": self.batches, "weights": h.hexdigest()}
            (Path(folder) / f"rank_{trainer.global_rank}.json").write_text(json.dumps(record))

    import functools

    real_init = L.Trainer.__init__

    @functools.wraps(real_init)  # the signature stays Lightning's: multiar checks trainer.* keys against it
    def init(self, *args, callbacks=None, **kwargs) -> None:  # noqa: ANN001, ANN002, ANN003
        real_init(self, *args, callbacks=[*(callbacks or []), RankRecord()], **kwargs)

    L.Trainer.__init__ = init


def nan_at(step: int, rank: int) -> None:
    """LitGPT's training loss becomes NaN from `step` on, on global rank `rank` only."""
    from multiar.training.module import LitGPT

    real = LitGPT._loss

    def poisoned(self, batch, forward):  # noqa: ANN001, ANN202
        loss, n = real(self, batch, forward)
        if self.training and self.global_step >= step and self.trainer.global_rank == rank:
            loss = loss * float("nan")
        return loss, n

    LitGPT._loss = poisoned


if os.environ.get(EXIT_DELAY_ENV) and "LOCAL_RANK" not in os.environ:
    import atexit
    import time

    atexit.register(time.sleep, float(os.environ[EXIT_DELAY_ENV]))  # registered first: runs last
if os.environ.get(PIDS_ENV):
    open(os.path.join(os.environ[PIDS_ENV], str(os.getpid())), "w").close()
if os.environ.get(KILL_ENV):
    kill_in_checkpoint_write(int(os.environ[KILL_ENV]))
if os.environ.get(KILL_JOURNAL_ENV):
    kill_before_journal(int(os.environ[KILL_JOURNAL_ENV]))
if os.environ.get(RANK_RECORD_ENV):
    record_ranks(os.environ[RANK_RECORD_ENV])
if os.environ.get(NAN_AT_ENV):
    nan_at(int(os.environ[NAN_AT_ENV]), int(os.environ.get(NAN_RANK_ENV, "0")))
