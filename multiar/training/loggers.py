"""The `logger` config group: Lightning's own loggers. metrics.csv (CSVLogger) is always written, since
resumed runs, `multiar eval` and the samples callback read it; tensorboard, wandb or mlflow log beside it."""

from __future__ import annotations

import logging
import warnings
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger

from multiar.errors import ConfigError

# the package each logger needs, and the extra that installs it
NEEDS = {
    "tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"),
    "wandb": (("wandb",), "wandb"),
    "mlflow": (("mlflow",), "mlflow"),
}


def check_logger(settings: dict[str, Any]) -> None:
    """ConfigError naming the missing package when the chosen logger cannot run here."""
    name = settings.get("name", "csv")
    if name not in NEEDS:
        return
    packages, extra = NEEDS[name]
    if not any(find_spec(p) is not None for p in packages):
        raise ConfigError(
            f"logger={name}: the {packages[0]} package is not installed (pip install 'multiar[{extra}]'), "
            "or choose logger=csv"
        )


def build_loggers(settings: dict[str, Any], run_dir: Path, flush_every: int) -> list[Logger]:
    """CSVLogger into run_dir/metrics.csv first (callbacks reach it as trainer.logger), then the chosen one."""
    check_logger(settings)
    loggers: list[Logger] = [
        CSVLogger(save_dir=run_dir, name="", version="", flush_logs_every_n_steps=flush_every)
    ]
    name = settings.get("name", "csv")
    if name == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=run_dir, name="tensorboard", version=""))
    elif name == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        loggers.append(
            WandbLogger(
                project=settings.get("project", "multiar"),
                name=run_dir.name,
                save_dir=str(run_dir),
                offline=bool(settings.get("offline", True)),
            )
        )
    elif name == "mlflow":
        from lightning.pytorch.loggers import MLFlowLogger

        uri = settings.get("tracking_uri") or (run_dir / "mlruns").resolve().as_uri()
        loggers.append(
            MLFlowLogger(
                experiment_name=settings.get("experiment_name", "multiar"),
                run_name=run_dir.name,
                tracking_uri=uri,
            )
        )
    return loggers


# Lightning's console lines that say nothing about this run: an advertisement, what the CPU run already
# says, and the restoring of the best checkpoint for the final metrics
NOISE = (
    "💡 Tip",
    "GPU available",
    "TPU available",
    "HPU available",
    "Using bfloat16 Automatic Mixed Precision",
    "Using 16bit Automatic Mixed Precision",
    "`Trainer.fit` stopped",
    "Restoring states from the checkpoint path",
    "Loaded model weights from the checkpoint",
)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(NOISE)


def quiet_lightning() -> None:
    """Silence the known noise of a Lightning run on the console, and only that (other warnings stay)."""
    # the run folder holds config.yaml, domain/...: CSVLogger's "will be deleted" concerns its own file
    warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise())
