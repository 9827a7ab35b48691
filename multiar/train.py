"""A thin LightningModule around GPT, and `train(cfg)`: wiring of data, model, logger, trainer."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from multiar.data import BlockDataModule, prepare_corpus
from multiar.domains import build_domain
from multiar.model import GPT, ModelConfig
from multiar.run_folder import save_run

log = logging.getLogger("multiar")


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to min_lr_ratio at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class LitGPT(L.LightningModule):
    """Next-token training of GPT on packed blocks (B, block_size + 1); pad targets are ignored."""

    def __init__(self, model_config: dict[str, Any], optim: dict[str, Any], pad_id: int) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = GPT(ModelConfig(**model_config))
        self.optim = optim
        self.pad_id = pad_id

    def _loss(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean next-token loss over the real (non-pad) targets of batch, and how many there were."""
        idx, targets = batch[:, :-1], batch[:, 1:]  # (B, T) each
        targets = targets.masked_fill(targets == self.pad_id, -100)
        logits = self.model(idx)  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        return loss, (targets != -100).sum()

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss, _ = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/ppl", loss.detach().exp())
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_loss_sum = torch.zeros((), device=self.device)
        self._val_tokens = torch.zeros((), device=self.device)

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        loss, tokens = self._loss(batch)
        self._val_loss_sum += loss * tokens
        self._val_tokens += tokens

    def on_validation_epoch_end(self) -> None:
        # token-weighted mean over the whole validation set; perplexity is exp of that mean
        # (a mean of per-batch exps would overstate it)
        total = self.trainer.strategy.reduce(self._val_loss_sum, reduce_op="sum")  # over DDP ranks
        tokens = self.trainer.strategy.reduce(self._val_tokens, reduce_op="sum")
        loss = total / tokens.clamp(min=1)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)  # same value on every rank
        self.log("val/ppl", loss.exp(), sync_dist=True)

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
        )
        total = int(self.trainer.estimated_stepping_batches)
        warmup = min(self.optim["warmup_steps"], max(1, total // 10))
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup, total, self.optim["min_lr_ratio"])
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def _check_run_dir(run_dir: Path, resuming: bool, overwrite: bool) -> None:
    finished = (run_dir / "model.safetensors").exists() or (run_dir / "checkpoints").exists()
    if finished and not (resuming or overwrite):
        raise FileExistsError(
            f"{run_dir}: already holds a run (pass ckpt_path=last to resume, overwrite=true to replace it)"
        )


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train one model as cfg says; write the run directory; return its final validation metrics."""
    L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.run_dir).expanduser()
    _check_run_dir(run_dir, resuming=cfg.ckpt_path is not None, overwrite=cfg.overwrite)
    settings = OmegaConf.to_container(cfg.domain.settings, resolve=True)
    corpus = prepare_corpus(
        build_domain(cfg.domain.name, settings),
        settings,
        list(cfg.data.paths) if cfg.data.paths else None,
        cache_dir=cfg.data.cache_dir,
        max_documents=cfg.data.max_documents,
        val_fraction=cfg.data.val_fraction,
    )
    domain = corpus.domain
    model_args = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k != "name"}
    model_config = ModelConfig(vocab_size=domain.vocab_size, **model_args)  # the one place vocab_size enters
    module = LitGPT(model_config.to_dict(), OmegaConf.to_container(cfg.optim, resolve=True), domain.pad_id)
    datamodule = BlockDataModule(
        corpus, model_config.block_size, cfg.data.batch_size, cfg.data.num_workers, seed=cfg.seed
    )
    log.info("%s: %d parameters; data %s", domain.name, module.model.num_parameters(), corpus.stats)
    checkpoints = ModelCheckpoint(
        dirpath=run_dir / "checkpoints", filename="best", monitor="val/loss", save_last=True, save_top_k=1
    )
    trainer = L.Trainer(
        **OmegaConf.to_container(cfg.trainer, resolve=True),
        default_root_dir=run_dir,
        logger=CSVLogger(save_dir=run_dir, name="", version=""),
        callbacks=[checkpoints],
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    metrics = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    config = OmegaConf.to_container(cfg, resolve=True)
    config["data_stats"] = corpus.stats
    config["final"] = {k: float(v) for k, v in metrics.items()} | {"steps": trainer.global_step}
    if trainer.is_global_zero:
        save_run(run_dir, module.model, domain, config)
    print(
        f"{domain.name}: val/loss {metrics['val/loss']:.4f} (ppl {metrics['val/ppl']:.2f}) after "
        f"{trainer.global_step} steps -> {run_dir}"
    )
    return {"run_dir": str(run_dir), "steps": trainer.global_step, **config["final"]}
