"""`compile=auto` for training: the first steps run eager and are timed, then the training step is compiled if
the steps left repay the compile: before any compile of this step was measured on this machine, when they
would take more than TRAIN_PAYBACK x TRAIN_FIRST_COMPILE_S eager (a compile assumed at 30 s, repaid
twice: 12 x 30 s under bf16 autocast, where it saves ~1/6 of a step; 36 x 30 s otherwise, ~1/18); after,
when they save more than twice the compile's seconds as measured (multiar.engine.compile_choice's rule). The first compiled step is a trial, forward
and backward on the batch just trained on, gradients discarded: a compile that fails (no C++ compiler)
leaves the run eager with one warning line. The compiled steps are timed and kept (decode_layout.json
under data.cache_dir) for the next run's decision; a compiled step measured slower than the eager one
is dropped again.

Why it is worth a decision: on a 2-core Xeon with AMX the compiled 10.8M step ran 1.05-1.24x the eager one,
after a cold compile of 8-20 s (its blocks compiled as one graph, engine.compiled_blocks; ~2-3 s from
inductor's on-disk cache): a long run gains, a short one would only pay the compile (benchmarks/README.md,
training).

Only the training step at the measured batch shape is compiled: a smaller last batch and validation
(under no_grad, a second graph whose compile nobody timed) run eager. One process only: under DDP or
FSDP `compile=true` is the user's choice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
from collections.abc import Callable
from pathlib import Path
from time import perf_counter
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Timer

from multiar.engine.choice_cache import machine_key
from multiar.engine.compile_choice import (
    CompileDecision,
    StepClock,
    compile_pays,
    read_measured,
    synchronize,
)
from multiar.engine.compiled_blocks import compile_blocks
from multiar.errors import first_line

log = logging.getLogger("multiar")

WHAT = "the training step"
# before a compile of the training step was measured here: a compile assumed at 30 s (8-20 s measured cold
# at 10.8M and 85M on 2 cores: one block's graph, whatever the depth), repaid twice by what it saves of a
# step: ~1/6 under bf16 autocast (1.16-1.24x measured, 10.8M), ~1/18 in fp32 (1.05-1.06x; 1.03x once the
# eager step had its hand-written backwards, session 22: optimistic there, until this machine measures)
TRAIN_FIRST_COMPILE_S = 30.0
TRAIN_PAYBACK = {"bf16": 12.0, "fp32": 36.0}


def training_key(pl_module: L.LightningModule, batch: torch.Tensor, trainer: L.Trainer) -> str:
    """What a training step's figures depend on: the machine, the precision, the batch's shape, the
    batches accumulated per optimizer step, the model, its attention and how it compiles (its blocks:
    figures of the whole forward compiled, or of the other attention, say nothing about this step)."""
    model = json.dumps(pl_module.model.config.to_dict(), sort_keys=True)
    digest = hashlib.sha256(model.encode()).hexdigest()[:16]
    shape = "x".join(str(n) for n in batch.shape)
    accumulate = trainer.accumulate_grad_batches
    return (
        f"{machine_key(pl_module.device)} | train {trainer.precision} | batch {shape} / {accumulate}"
        f" | model {digest} | attention {pl_module.model.attention} | compiled blocks"
    )


def for_shape(compiled: Callable, eager: Callable, shape: torch.Size) -> Callable:
    """compiled for idx of shape (the batches it was measured and compiled for), eager for the others (a
    smaller last batch would compile a graph of its own, untimed)."""

    def forward(idx: torch.Tensor) -> torch.Tensor:
        return compiled(idx) if idx.shape == shape else eager(idx)

    return forward


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
        self.shape: torch.Size | None = None  # the (B, T) inputs the graph is for
        self.measured: dict[str, float] = {}  # this run's compile: its seconds and the compiled step's ms
        self._start = 0.0

    def _timing(self) -> bool:
        return self.decision is None or self.clock is not None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self._timing():
            synchronize(pl_module.device)
            self._start = perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._timing():
            return
        synchronize(pl_module.device)
        seconds = perf_counter() - self._start
        if self.clock is not None:
            if batch[:, :-1].shape == self.shape:  # a smaller last batch ran eager: not the graph's time
                self.clock.record(seconds)
                self._drop_if_slower(pl_module)
            return
        self.seen += 1
        if self.seen == self.EAGER_WARM_UP + 1:
            self.shape = batch[:, :-1].shape  # the steps timed and compiled: a smaller batch is neither
        if self.seen > self.EAGER_WARM_UP and batch[:, :-1].shape == self.shape:
            self.eager.append(seconds)
            if len(self.eager) == self.EAGER_TIMED:
                self._decide(trainer, pl_module, batch, batch_idx)

    def _decide(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: torch.Tensor, batch_idx: int
    ) -> None:
        eager_ms = 1e3 * statistics.median(self.eager)
        left = batches_left(trainer, eager_ms / 1e3)
        device = pl_module.device.type
        if trainer.world_size > 1:
            self.decision = CompileDecision(False, left, eager_ms, device=device, what=WHAT)
            log.info(
                "compile=auto: not compiling %s: %d processes (compile=true does)", WHAT, trainer.world_size
            )
            return
        key = training_key(pl_module, batch, trainer)
        # training's own first-compile rule: a training step saves less than a decode step does
        payback = TRAIN_PAYBACK["bf16" if str(trainer.precision).startswith("bf16") else "fp32"]
        first_rule = (payback, TRAIN_FIRST_COMPILE_S)
        measured = read_measured(self.cache_file, key)
        self.decision = compile_pays(left, eager_ms, measured, device, WHAT, first_rule)
        log.info("%s", self.decision.log_line())
        if self.decision.compile:
            self.clock = StepClock(self.cache_file, key, pl_module.device, rows=batch.size(0))
            self._compile(trainer, pl_module, batch, batch_idx)

    def _compile(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: torch.Tensor, batch_idx: int
    ) -> None:
        """Compile the forward and try it on batch (forward and backward, the gradients discarded, the
        random stream as it was: dropout's masks stay the run's own): the trial's seconds are the
        compile's; a failure leaves the run eager."""
        compiled = compile_blocks(pl_module.model)
        params = [p for p in pl_module.parameters() if p.requires_grad]
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:  # stepped: the gradients are spent
            pl_module.zero_grad(set_to_none=True)  # room for the trial's own
        cuda = [pl_module.device] if pl_module.device.type == "cuda" else []
        start = perf_counter()
        try:
            with torch.random.fork_rng(devices=cuda):
                with trainer.precision_plugin.forward_context():  # autocast as the step's forward has it
                    loss, _ = pl_module._loss(batch, compiled)
                torch.autograd.grad(loss, params, allow_unused=True)
            synchronize(pl_module.device)
        except Exception as err:  # noqa: BLE001 (inductor fails many ways: no compiler, no headers)
            log.warning("compile=auto: %s did not compile (%s): training eagerly", WHAT, first_line(err))
            self.decision.compile, self.clock = False, None
            self.measured = {"failed": first_line(err)}
            return
        self.clock.record(perf_counter() - start)
        pl_module.forward_blocks = for_shape(compiled, pl_module.model.forward, self.shape)

    def _drop_if_slower(self, pl_module: L.LightningModule) -> None:
        """After the clock's first 16 steady steps (saved for the next run): keep the compiled step only
        if it is the faster one, and stop timing (a CUDA step's timing costs two syncs)."""
        compiled_ms = self.clock.compiled_ms()
        if compiled_ms is None:
            return
        self.measured = {"compile_s": round(self.clock.compile_s, 3), "compiled_ms": round(compiled_ms, 3)}
        self.clock = None
        if compiled_ms >= self.decision.eager_ms:
            pl_module.forward_blocks = pl_module.model.forward
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


def batches_left(trainer: L.Trainer, eager_s: float) -> int:
    """Training batches still to run: the optimizer steps left times the batches each accumulates, and no
    more than trainer.max_time leaves room for at eager_s a batch. A run of unknown length (no max_steps,
    an iterable dataset) counts as none: it stays eager."""
    total = trainer.estimated_stepping_batches
    if total == float("inf") or total < 0:
        left = 0
    else:
        left = max(0, int(total) - trainer.global_step) * trainer.accumulate_grad_batches
    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
    remaining = timer.time_remaining() if timer is not None else None
    if remaining is not None and eager_s > 0:
        left = min(left, max(0, int(remaining / eager_s)))
    return left
