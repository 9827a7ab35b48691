"""Callbacks of a training run: the loss curve of a resumed run kept in one metrics.csv, and domain
samples written and scored while training runs."""

from __future__ import annotations

import csv
import logging
import shutil
import time
from pathlib import Path

import lightning as L

from multiar.domain import Domain
from multiar.files import write_new_text
from multiar.samples import unprompted_samples

log = logging.getLogger("multiar")


class ResumedCurve(L.Callback):
    """Keeps the loss curve of a resumed run in one metrics.csv.

    Lightning's CSVLogger deletes an existing metrics.csv when it starts; this callback reads the rows
    first and, once the checkpoint is restored, writes back those logged before the checkpoint's
    step (later ones died with the killed process), so the curve continues with no step twice.
    """

    def __init__(self, metrics_csv: Path) -> None:
        self.metrics_csv = metrics_csv
        self.rows: list[dict[str, str]] = []
        if metrics_csv.exists():
            with open(metrics_csv, newline="") as f:
                self.rows = list(csv.DictReader(f))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step:
            log.info("resumed at step %d", trainer.global_step)
        if not trainer.is_global_zero or not self.rows or not trainer.global_step:
            return
        keep = [r for r in self.rows if r.get("step") and int(r["step"]) < trainer.global_step]
        fields = sorted(self.rows[0])  # the order Lightning's writer keeps its columns in
        lines = [",".join(fields)] + [",".join(r.get(k) or "" for k in fields) for r in keep]
        write_new_text(self.metrics_csv, "\n".join(lines) + "\n", overwrite=True)
        writer = trainer.logger.experiment  # appends to the file from here on, under the same header
        writer.metrics_keys = list(fields)


class TrainingSamples(L.Callback):
    """Every every_n_steps optimizer steps and at the end: n samples from the current weights through the
    real sampling path (the domain's grammar constraint included), written by the domain under
    run_dir/samples/step_<N>/, and the domain's metrics logged to metrics.csv at that step.

    Only rank 0 samples; a resumed run that reaches a step again replaces that step's folder.
    """

    def __init__(
        self,
        domain: Domain,
        run_dir: Path,
        every_n_steps: int,
        n: int = 2,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        seed: int = 0,
    ) -> None:
        self.domain, self.run_dir, self.every = domain, run_dir, every_n_steps
        self.n, self.max_new_tokens, self.temperature, self.seed = n, max_new_tokens, temperature, seed
        self.last_step = -1
        self.written: list[Path] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        step = trainer.global_step
        if step and step % self.every == 0 and step != self.last_step:
            self.sample(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self.last_step:
            self.sample(trainer, pl_module)

    def sample(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        step = self.last_step = trainer.global_step
        if not trainer.is_global_zero:
            return {}
        domain = self.domain
        artifacts, metrics = unprompted_samples(
            pl_module.model, domain, self.n, self.max_new_tokens, self.temperature, self.seed + step
        )
        out = self.run_dir / "samples" / f"step_{step}"
        shutil.rmtree(out, ignore_errors=True)  # a resumed run's own earlier samples of this step
        provenance = {"run": str(self.run_dir), "step": step, "seed": self.seed + step}
        self.written = domain.write(artifacts, out, provenance, overwrite=True)
        trainer.logger.log_metrics(metrics, step=step)  # metrics.csv: the CSV logger comes first
        trainer.logger.save()
        log.info(
            "step %d: %d samples in %s; %s",
            step,
            len(artifacts),
            out,
            ", ".join(f"{k} {v:.3g}" for k, v in metrics.items()),
        )
        return metrics


class Progress(L.Callback):
    """One console line every `every` optimizer steps and at the last (step/max_steps, loss, tokens/s
    over the interval, ETA), and one per validation; global rank 0 only. Replaces Lightning's bar, whose
    `Epoch 0/-2` says nothing for a run counted in steps."""

    def __init__(self, every: int) -> None:
        self.every = max(1, every)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start_step, self.last_step, self.tokens = trainer.global_step, trainer.global_step, 0
        self.start = self.last = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.tokens += (batch.shape[-1] - 1) * batch.shape[0] * trainer.world_size
        step, total = trainer.global_step, trainer.max_steps
        if not trainer.is_global_zero or not (step % self.every == 0 or step == total):
            return
        if step == self.last_step:  # gradient accumulation: several batches end at one optimizer step
            return
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        now = time.monotonic()
        rate = self.tokens / max(now - self.last, 1e-9)
        per_step = (now - self.start) / max(step - self.start_step, 1)
        left = int(per_step * max(total - step, 0)) if total > 0 else 0
        tokens = f"{rate / 1000:.1f}k" if rate >= 1000 else f"{rate:.0f}"
        log.info(
            "step %d/%s  loss %.4f  %s tok/s  ETA %d:%02d",
            step,
            total if total > 0 else "?",
            float(loss),
            tokens,
            left // 60,
            left % 60,
        )
        self.last, self.tokens, self.last_step = now, 0, step

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or not trainer.is_global_zero:
            return
        loss = trainer.callback_metrics.get("val/loss")
        if loss is not None:
            log.info("step %d/%s  val/loss %.4f", trainer.global_step, trainer.max_steps, float(loss))
