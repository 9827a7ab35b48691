"""The LightningModule around GPT: next-token training on packed blocks, the token-weighted validation loss,
AdamW with warmup + cosine, and the non-finite-loss check every rank takes together."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from torch import Tensor

from multiar.engine.compiled_blocks import compile_blocks
from multiar.engine.model import GPT, ModelConfig
from multiar.engine.scoring import token_nats

log = logging.getLogger("multiar")


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to min_lr_ratio at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def clip_norm_scale(parameters: Iterable[Tensor], max_norm: float) -> Tensor:
    """The reciprocal of what clip_grad_norm_ multiplies the gradients by, as a fused optimizer's
    `grad_scale` divides them: (total norm + 1e-6) / max_norm where that is above 1, else 1 (a 0-dim
    tensor on the gradients' device: no sync)."""
    total = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
    return torch.clamp(max_norm / (total + 1e-6), max=1.0).reciprocal()


def forget_clip_scale(optimizer: torch.optim.Optimizer) -> None:
    """Drop a clip coefficient set on optimizer (absent, not None: torch's loss scaler multiplies any
    grad_scale it finds into its own)."""
    optimizer.__dict__.pop("grad_scale", None)


NO_BAD = torch.iinfo(torch.long).max  # no rank has seen a non-finite training loss


def stop_watching_launched_ranks() -> None:
    """Ends the watch Lightning's own launcher keeps over the rank processes it started: it SIGKILLs this
    process (a node's local rank 0) within 5 s of one of them exiting non-zero. On a stop every rank
    agreed on, they all exit 1 while rank 0 still has its line to write; rank 0 then waits for them
    itself (run._end_other_ranks: bounded, killing any left)."""
    try:  # Lightning's private API: where it moved, the stop goes on (the watch may then kill this rank)
        from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver
    except ImportError:
        log.debug("no Lightning launcher watch to stop in this Lightning version")
        return
    for thread in threading.enumerate():
        if isinstance(thread, _ChildProcessObserver):
            thread._child_processes = []  # its next look finds nothing to watch and ends


class LitGPT(L.LightningModule):
    """Next-token training of GPT on packed blocks (B, block_size + 1); pad targets are ignored."""

    def __init__(
        self, model_config: dict[str, Any], optim: dict[str, Any], pad_id: int, compile: bool | str = False
    ) -> None:
        """compile: True compiles training and validation; "auto" starts eager and leaves the training
        step to CompileWhenItPays (which swaps forward_blocks); False never compiles."""
        super().__init__()
        self.save_hyperparameters()
        self.model = GPT(ModelConfig(**model_config))
        self.optim = optim
        self.pad_id = pad_id
        # a compiled function, not a module: state_dict keys stay the model's own, and sampling during
        # training (TrainingSamples) runs the plain model with its KV cache
        self.forward_blocks = compile_blocks(self.model) if compile is True else self.model.forward
        self.forward_validation = self.forward_blocks

    def _loss(
        self, batch: torch.Tensor, forward: Callable[[torch.Tensor], torch.Tensor]
    ) -> tuple[Tensor, Tensor]:
        """Mean next-token loss over the real (non-pad) targets of batch, and how many there were."""
        idx, targets = batch[:, :-1], batch[:, 1:]  # (B, T) each
        targets = targets.masked_fill(targets == self.pad_id, -100)
        count = (targets != -100).sum()
        loss = token_nats(forward(idx), targets).sum() / count.clamp(min=1)
        return loss, count

    def on_fit_start(self) -> None:
        # the first step whose training loss was not finite, as step * world_size + rank (NO_BAD: none);
        # kept on the device, so a step pays no host sync for it
        self._first_bad = torch.full((), NO_BAD, dtype=torch.long, device=self.device)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss, _ = self._loss(batch, self.forward_blocks)
        key = self.global_step * self.trainer.world_size + self.global_rank
        self._first_bad = torch.where(torch.isfinite(loss), self._first_bad, self._first_bad.clamp(max=key))
        if self.global_step % max(1, self.trainer.log_every_n_steps) == 0:
            # every rank checks at the same steps (the logging interval: its host sync is paid anyway), so
            # all stop together, before this step's optimizer update
            self.stop_if_not_finite()
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/ppl", loss.detach().exp())
        return loss

    def stop_if_not_finite(self) -> None:
        """FloatingPointError on every rank at once when any rank's training loss was not finite so far."""
        if not hasattr(self, "_first_bad"):  # validation outside fit: nothing trained
            return
        first = int(self.trainer.strategy.reduce(self._first_bad.clone(), reduce_op="min"))
        if first == NO_BAD:
            return
        world = self.trainer.world_size
        step, rank = divmod(first, world)
        if world > 1:
            if self.trainer.local_rank == 0:  # the process that launched its node's other ranks
                stop_watching_launched_ranks()
            # no rank leaves (and exits 1) before rank 0 has stopped watching: else Lightning's launcher
            # could kill rank 0 before it says why
            self.trainer.strategy.barrier("stop_if_not_finite")
        # checkpoints written before this point (the last good one) stay as they are
        raise FloatingPointError(
            f"training loss became nan or inf at step {step}{f' on rank {rank}' if world > 1 else ''}; "
            "stopped on every rank. The last good checkpoint is kept: lower optim.lr or check the data, "
            "then resume with ckpt_path=last"
        )

    def on_train_end(self) -> None:
        self.stop_if_not_finite()  # the steps after the last check: never exported

    def on_validation_epoch_start(self) -> None:
        # before validation, hence before the checkpoint written after it: weights that saw a non-finite
        # loss since the last check never become a checkpoint or the exported model
        self.stop_if_not_finite()
        self._val_loss_sum = torch.zeros((), device=self.device)
        self._val_tokens = torch.zeros((), device=self.device)

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        loss, tokens = self._loss(batch, self.forward_validation)
        self._val_loss_sum += loss * tokens  # a block of pads only (tokens 0) adds nothing
        self._val_tokens += tokens

    def on_validation_epoch_end(self) -> None:
        # token-weighted mean over the whole validation set; perplexity is exp of that mean
        # (a mean of per-batch exps would overstate it)
        total = self.trainer.strategy.reduce(self._val_loss_sum, reduce_op="sum")  # over DDP ranks
        tokens = self.trainer.strategy.reduce(self._val_tokens, reduce_op="sum")
        loss = total / tokens.clamp(min=1)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)  # same value on every rank
        self.log("val/ppl", loss.exp(), sync_dist=True)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Lightning's, except for torch's fused optimizer holding one process's whole gradients (fp32, or
        bf16-mixed with no loss scaler; DDP's are all-reduced by now). There the norm's coefficient goes
        to the optimizer's `grad_scale` (the hook of torch's loss scaler) for this step only: its kernel
        divides each gradient by it as it reads it, so clipping costs the norm's pass, not a multiply
        over every gradient too (10.8M fp32, clip and step 17.8 -> 15.2 ms; the step 0.7% faster,
        paired). bf16-mixed needs this to clip at all: Lightning's MixedPrecision plugin refuses to clip
        for any optimizer that unscales gradients itself, but bf16 has no scaler. Every other plugin
        (FSDP's, which must clip across shards; fp16's scaler, which sets `grad_scale` itself) keeps
        Lightning's own rule."""
        plugin = self.trainer.precision_plugin
        # every group fused: torch's other paths refuse a grad_scale
        fused = getattr(optimizer, "_step_supports_amp_scaling", False) and all(
            group.get("fused") for group in optimizer.param_groups
        )
        whole = type(plugin) is Precision or (isinstance(plugin, MixedPrecision) and plugin.scaler is None)
        forget_clip_scale(optimizer)
        if not (gradient_clip_val and fused and whole):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        elif gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(self.parameters(), gradient_clip_val)
        else:
            optimizer.grad_scale = clip_norm_scale(self.parameters(), gradient_clip_val)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        for optimizer in self.trainer.optimizers:  # a later step taken outside fit must not divide by it
            forget_clip_scale(optimizer)

    def configure_optimizers(self) -> dict:
        # weight decay on matrices (linears, embedding) only; norms' gains are not decayed
        params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.optim["weight_decay"]},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.optim["lr"],
            betas=tuple(self.optim["betas"]),
            # one kernel per parameter instead of a dozen passes: on a CPU 6 ms a step instead of 22 at the
            # 13.8M shape (benchmarks/README.md, training); torch has it for CPU and CUDA tensors. Not
            # under fp16's loss scaler, which must unscale the gradients before they are clipped
            fused=(
                all(p.device.type in ("cpu", "cuda") for p in params)
                and str(self.trainer.precision) not in ("16-mixed", "16")
            )
            or None,
        )
        total = int(self.trainer.estimated_stepping_batches)
        warmup = min(self.optim["warmup_steps"], max(1, total // 10))
        if warmup < self.optim["warmup_steps"]:  # a short run keeps 90% of its steps past warmup
            log.warning(
                "optim.warmup_steps=%d is capped at 10%% of the %d steps: %d warmup steps used",
                self.optim["warmup_steps"],
                total,
                warmup,
            )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup, total, self.optim["min_lr_ratio"])
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
