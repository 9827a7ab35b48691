"""`attention=auto|sdpa|matmul` for training: before the first step, the model's full-sequence attention is
set to the faster of SDPA and batched matmuls at this run's batch shape and autocast dtype
(multiar.engine.attention_choice measures; rank 0 decides for every process)."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch

from multiar.engine.attention_choice import KINDS, AttentionChoice, choose_attention, log_line
from multiar.errors import first_line

log = logging.getLogger("multiar")


def step_dtype(precision: str, weights: torch.dtype) -> torch.dtype:
    """The dtype a training step's matmuls run in under Lightning's precision setting."""
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return weights


class FastestAttention(L.Callback):
    """Sets the model's training attention (GPT.attention) before the first training step: as `attention=`
    says, or (auto) the faster one at batch_size x block_size, timed or read from cache_file by rank 0
    alone and sent to every process, so all train alike. A resumed run (auto) keeps the attention its
    checkpoint was trained with. A measurement that fails leaves SDPA (one warning)."""

    def __init__(self, setting: str, batch_size: int, cache_file: Path | None) -> None:
        self.setting, self.batch_size, self.cache_file = setting, batch_size, cache_file
        self.choice: AttentionChoice = {}
        self.resumed: AttentionChoice = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # on_train_start, not on_fit_start: after every strategy has restored the checkpoint (FSDP's
        # restores after on_fit_start); validation before it runs without gradients, on SDPA anyway
        model = pl_module.model
        choice = None
        if self.setting == "auto" and self.resumed.get("attention") in KINDS:
            choice = self.resumed | {"how": "resumed"}  # what the checkpoint's weights were trained with
        elif trainer.is_global_zero:  # one process times: several at once on one CPU would skew it
            dtype = step_dtype(str(trainer.precision), model.wte.weight.dtype)
            try:
                choice = choose_attention(
                    self.setting, model.config, self.batch_size, dtype, pl_module.device, self.cache_file
                )
            except (RuntimeError, MemoryError) as err:  # the other ranks wait for this one's answer
                log.warning("attention=auto: the measurement failed (%s): SDPA", first_line(err))
                choice = {"attention": "sdpa", "how": f"measurement failed: {first_line(err)}"}
        if choice is None or choice.get("how") != "resumed":
            choice = trainer.strategy.broadcast(choice, src=0)
        self.choice = choice
        model.attention = self.choice["attention"]
        log.info("%s", log_line(self.choice))

    def state_dict(self) -> dict:
        return dict(self.choice)

    def load_state_dict(self, state_dict: dict) -> None:
        self.resumed = dict(state_dict)

    def state(self) -> dict:
        """config.yaml's attention_used: the setting and what it picked (empty before fit)."""
        return {"setting": self.setting} | self.choice if self.choice else {}
