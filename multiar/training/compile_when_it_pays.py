"""`compile=auto` for training: the first steps run eager and are timed, then the step is compiled if the
steps left repay the compile, by the rule generate's decode step follows (multiar.engine.compile_choice):
before any compile of this training step was measured on this machine, when the steps left would take
more than 4 x 60 s eager (on CUDA 2.4 x 30 s); after, when they save more than twice the compile's
seconds as measured. The compiled steps are timed and kept (decode_layout.json under data.cache_dir)
for the next run's decision; a compiled step measured slower than the eager one is dropped again.

Why it is worth a decision: on a 2-core Xeon with AMX the compiled 10.8M step ran 1.22x the eager one
in bf16 and 1.12x in fp32 (1.10x and 1.03x nanoGPT's eager step, where eager multiar is 0.90x and 0.92x),
after a cold compile of 21-24 s (~3 s from inductor's on-disk cache): a long run gains, a short one
would only pay the compile (benchmarks/README.md, training).

Only the training step is compiled (validation stays eager: under no_grad it would be a second graph,
whose compile nobody timed). One process only: under DDP or FSDP `compile=true` is the user's choice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
from pathlib import Path
from time import perf_counter
from typing import Any

import lightning as L
import torch

from multiar.engine.choice_cache import machine_key
from multiar.engine.compile_choice import CompileDecision, StepClock, compile_pays, read_measured

log = logging.getLogger("multiar")

WHAT = "the training step"


def training_key(pl_module: L.LightningModule, batch: torch.Tensor, precision: str) -> str:
    """What a training step's figures depend on: the machine, the precision, the batch's shape and the model."""
    model = json.dumps(pl_module.model.config.to_dict(), sort_keys=True)
    digest = hashlib.sha256(model.encode()).hexdigest()[:16]
    shape = "x".join(str(n) for n in batch.shape)
    return f"{machine_key(pl_module.device)} | train {precision} | batch {shape} | model {digest}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CompileWhenItPays(L.Callback):
    """Times the first EAGER_TIMED eager steps (after EAGER_WARM_UP), decides, and if it compiles, times
    the compiled steps (a StepClock: the first is the compile's seconds)."""

    EAGER_WARM_UP = 1  # the first step pays first-touch costs (allocations, kernel selection)
    EAGER_TIMED = 3

    def __init__(self, cache_file: Path | None) -> None:
        self.cache_file = cache_file
        self.eager: list[float] = []
        self.seen = 0
        self.decision: CompileDecision | None = None
        self.clock: StepClock | None = None
        self.checked = False  # compiled step compared with the eager one (once)
        self.measured: dict[str, float] = {}  # this run's compile: its seconds and the compiled step's ms
        self._start = 0.0

    def _timing(self) -> bool:
        return self.decision is None or self.clock is not None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self._timing():
            _sync(pl_module.device)
            self._start = perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._timing():
            return
        _sync(pl_module.device)
        seconds = perf_counter() - self._start
        if self.clock is not None:
            self.clock.record(seconds)
            self._drop_if_slower(pl_module)
            return
        self.seen += 1
        if self.seen > self.EAGER_WARM_UP:
            self.eager.append(seconds)
        if len(self.eager) == self.EAGER_TIMED:
            self._decide(trainer, pl_module, batch)

    def _decide(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: torch.Tensor) -> None:
        eager_ms = 1e3 * statistics.median(self.eager)
        left = batches_left(trainer)
        device = pl_module.device.type
        if trainer.world_size > 1:
            self.decision = CompileDecision(False, left, eager_ms, device=device, what=WHAT)
            log.info(
                "compile=auto: not compiling %s: %d processes (compile=true does)", WHAT, trainer.world_size
            )
            return
        key = training_key(pl_module, batch, str(trainer.precision))
        self.decision = compile_pays(left, eager_ms, read_measured(self.cache_file, key), device, WHAT)
        log.info("%s", self.decision.log_line())
        if self.decision.compile:
            pl_module.forward_blocks = torch.compile(pl_module.model.forward)
            self.clock = StepClock(self.cache_file, key, pl_module.device, rows=batch.size(0))

    def _drop_if_slower(self, pl_module: L.LightningModule) -> None:
        compiled_ms = self.clock.compiled_ms()
        if self.checked or compiled_ms is None:
            return
        self.checked = True
        self.measured = {"compile_s": round(self.clock.compile_s, 3), "compiled_ms": round(compiled_ms, 3)}
        if compiled_ms >= self.decision.eager_ms:  # saved by the clock: the next run stays eager
            pl_module.forward_blocks = pl_module.model.forward
            self.clock = None
            log.warning(
                "compile=auto: the compiled training step measured %.1f ms against %.1f eager: back to eager",
                compiled_ms,
                self.decision.eager_ms,
            )

    def state(self) -> dict:
        """What was decided and measured, for the run's config.yaml (empty before a decision)."""
        if self.decision is None:
            return {}
        return self.decision.as_dict() | ({"this_run": self.measured} if self.measured else {})


def batches_left(trainer: L.Trainer) -> int:
    """Training batches still to run: the optimizer steps left times the batches each accumulates."""
    total = trainer.estimated_stepping_batches
    steps = 10**9 if total == float("inf") else int(total) - trainer.global_step
    return max(0, steps) * trainer.accumulate_grad_batches
