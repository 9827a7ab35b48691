"""A thin LightningModule around GPT, and `train(cfg)`: wiring of data, model, loggers, callbacks, trainer."""

from __future__ import annotations

import logging
import math
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_model
from torch import Tensor

from multiar.data.corpus import prepare_corpus
from multiar.data.packing import BlockDataModule
from multiar.data.reference import (
    dataset_ids,
    reference_documents,
    unigram_counts,
    validation_tags,
    write_reference,
)
from multiar.data.source import Source
from multiar.data.streaming import StreamingDataModule, fit_on_first
from multiar.domain import Augmentable
from multiar.domains import DOMAINS, build_domain, load_domain
from multiar.engine.choice_cache import CACHE_FILE
from multiar.engine.host_memory import keep_freed_memory
from multiar.engine.model import GPT, ModelConfig
from multiar.engine.precision import resolve_precision
from multiar.engine.scoring import score_documents, summary
from multiar.errors import ConfigError
from multiar.run_folder import read_run_config, save_run, write_run_config
from multiar.schema import compile_setting, validate
from multiar.tags import Tagged
from multiar.training.callbacks import Progress, ResumedCurve, TrainingSamples
from multiar.training.checkpoint_io import AtomicCheckpointIO, remove_stale_temporaries
from multiar.training.compile_when_it_pays import CompileWhenItPays
from multiar.training.fastest_attention import FastestAttention
from multiar.training.loggers import build_loggers, check_logger, quiet_lightning
from multiar.training.module import LitGPT

log = logging.getLogger("multiar")


def _launcher_rank(devices_per_node: int = 1) -> int:
    """This process's global rank as its launcher set it (0 when not distributed), before a Trainer exists:
    torchrun's RANK; Lightning's own launcher's NODE_RANK (or GROUP_RANK) * devices_per_node + LOCAL_RANK;
    SLURM's SLURM_PROCID (last: an salloc shell sets it for processes that Lightning starts)."""
    env = os.environ
    if env.get("RANK"):
        return int(env["RANK"])
    node = env.get("NODE_RANK") or env.get("GROUP_RANK")
    if node or env.get("LOCAL_RANK"):
        return int(node or 0) * devices_per_node + int(env.get("LOCAL_RANK") or 0)
    return int(env.get("SLURM_PROCID") or 0)


def _devices_per_node(cfg: DictConfig) -> int:
    """trainer.devices as a count where it is one (a list counts its entries; "auto" counts 1)."""
    devices = cfg.trainer.get("devices", 1)
    if isinstance(devices, int) and devices > 0:
        return devices
    return len(devices) if OmegaConf.is_list(devices) else 1


def _holds_run(run_dir: Path) -> bool:
    return any((run_dir / n).exists() for n in ("model.safetensors", "checkpoints", "config.yaml", "domain"))


def windows_per_document(documents: Any, block_size: int) -> dict[str, float]:
    """How many block_size windows the training documents span (a long piece is many windows, not one
    truncated one): mean, max, and the share of documents longer than one window."""
    import pyarrow.compute as pc  # lengths straight from the arrow column: no Python lists of ids

    lengths = pc.list_value_length(documents.data.column("ids")).to_pylist()
    spans = [math.ceil((n + 2) / block_size) for n in lengths]
    return {
        "mean": round(sum(spans) / max(len(spans), 1), 2),
        "max": max(spans, default=0),
        "longer_than_one": round(sum(n > 1 for n in spans) / max(len(spans), 1), 3),
    }


def check_train_config(cfg: DictConfig) -> Path | None:
    """Everything about cfg that can be checked before heavy work; ConfigError (exit 2) when wrong.
    Returns the checkpoint to resume from, or None."""
    validate("train", cfg)
    settings = OmegaConf.to_container(cfg.domain.settings, resolve=True)
    if cfg.domain.name not in DOMAINS:
        raise ConfigError(f"domain: unknown domain {cfg.domain.name!r}; choose one of {', '.join(DOMAINS)}")
    try:
        domain = build_domain(cfg.domain.name, settings)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"domain.settings: {str(err).splitlines()[0]}") from None
    if cfg.data.tags is not None:
        Tagged(domain, cfg.data.tags)  # the source is usable: a known kind, a readable TSV
    if cfg.data.augment:
        if not isinstance(domain, Augmentable):
            raise ConfigError(f"data.augment: the {domain.name} domain has no augmentation (music only)")
        try:
            domain.check_augment(OmegaConf.to_container(cfg.data.augment))
        except ValueError as err:
            raise ConfigError(str(err)) from None
    if cfg.data.corpus is not None:
        try:
            domain.default_paths(cfg.data.corpus)
        except ValueError as err:
            raise ConfigError(f"data.corpus: {err}") from None
    for p in cfg.data.paths or []:
        if not Path(p).expanduser().exists():
            raise ConfigError(f"data.paths: {p}: no such file or folder")
    check_logger(OmegaConf.to_container(cfg.logger, resolve=True))
    if cfg.init_from is not None:
        check_init_from(cfg)
    run_dir = Path(cfg.run_dir).expanduser()
    # only global rank 0 judges the run folder: it may be moving it aside (overwrite=true) or writing it
    # while the other ranks start; they read nothing of it before training starts
    judge = _launcher_rank(_devices_per_node(cfg)) == 0
    if judge and (run_dir / "config.yaml").exists():
        theirs = read_run_config(run_dir)["domain"]["name"]
        if theirs != cfg.domain.name and not cfg.overwrite:
            raise ConfigError(
                f"run_dir: {run_dir} holds a {theirs} run, not {cfg.domain.name} "
                "(choose another run_dir, or overwrite=true to replace it)"
            )
    if cfg.ckpt_path is None:
        if judge and not cfg.overwrite:
            _refuse_to_replace(run_dir)
        return None
    if cfg.overwrite:
        raise ConfigError("ckpt_path and overwrite=true together: resume a run, or replace it, not both")
    ckpt = (
        run_dir / "checkpoints" / "last.ckpt" if cfg.ckpt_path == "last" else Path(cfg.ckpt_path).expanduser()
    )
    if not ckpt.is_file():
        raise ConfigError(f"ckpt_path={cfg.ckpt_path}: nothing to resume ({ckpt} does not exist)")
    return ckpt


# model settings a fine-tuned run must share with the run it starts from (block_size and dropout may differ)
SHAPE_KEYS = ("n_layer", "n_head", "n_embd")


def check_init_from(cfg: DictConfig) -> None:
    """init_from names a finished run of the same domain whose model has the configured shape."""
    source = Path(cfg.init_from).expanduser()
    for needed in ("config.yaml", "model.safetensors", "domain"):
        if not (source / needed).exists():
            raise ConfigError(f"init_from={cfg.init_from}: not a finished multiar run (missing {needed})")
    theirs = read_run_config(source)
    if theirs["domain"]["name"] != cfg.domain.name:
        raise ConfigError(
            f"init_from={cfg.init_from}: a {theirs['domain']['name']} run; this run trains {cfg.domain.name}"
        )
    shape = theirs.get("model_config", {})
    differ = [f"{k} {shape.get(k)} != {cfg.model[k]}" for k in SHAPE_KEYS if shape.get(k) != cfg.model[k]]
    if differ:
        raise ConfigError(
            f"init_from={cfg.init_from}: its model differs ({', '.join(differ)}); "
            f"pass model={theirs['model'].get('name', '...')} or the same model.* values"
        )


def _refuse_to_replace(run_dir: Path) -> None:
    """FileExistsError when run_dir already holds a run."""
    if _holds_run(run_dir):
        raise FileExistsError(
            f"{run_dir}: already holds a run (pass ckpt_path=last to resume, overwrite=true to replace it)"
        )


def _move_aside(run_dir: Path) -> Path:
    """Rename an existing run out of the way; it is deleted only once the new run has finished."""
    aside = run_dir.with_name(f".{run_dir.name}.replaced-{os.getpid()}")
    shutil.rmtree(aside, ignore_errors=True)
    run_dir.rename(aside)
    log.info("%s: the old run is moved to %s until this one finishes", run_dir, aside)
    return aside


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train one model as cfg says; write the run folder; return its final validation metrics.

    The tokenizer is saved into the run folder before the first step, and a resumed run
    (ckpt_path=last) encodes its data with that saved tokenizer, never a refitted one.
    overwrite=true moves an existing run aside and deletes it once the new one has finished.
    """
    ckpt = check_train_config(cfg)
    cfg = validate("train", cfg)
    quiet_lightning()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    run_dir = Path(cfg.run_dir).expanduser()
    moved: list[Path] = []  # where global rank 0 has moved the old run (overwrite=true)
    try:
        result = _train(cfg, run_dir, ckpt, moved)
    except BaseException:
        replaced = moved[0] if moved else None
        if replaced is not None:  # the new run failed: put the old one back as it was
            shutil.rmtree(run_dir, ignore_errors=True)
            replaced.rename(run_dir)
            log.warning("%s: the new run failed; the old run is back in place", run_dir)
        raise
    if moved:
        shutil.rmtree(moved[0], ignore_errors=True)
    return result


def warn_unused_settings(settings: dict[str, Any], source_run: Path) -> None:
    """One warning naming the domain.settings given now that differ from those source_run was built with:
    a resumed or fine-tuned run reads and tokenizes as its saved domain/ says, not as they say."""
    saved = read_run_config(source_run)["domain"].get("settings") or {}
    differ = sorted(k for k in set(settings) | set(saved) if settings.get(k) != saved.get(k))
    if differ:
        log.warning(
            "domain.settings: %s differ from %s's and are not used (its saved domain/ decides what is read "
            "and how it is tokenized): %s",
            ", ".join(differ),
            source_run,
            "; ".join(f"{k}={settings.get(k)!r} given, {saved.get(k)!r} used" for k in differ),
        )


@dataclass
class _Data:
    """What the data step hands on: the (possibly refitted) domain, the datamodule and what the reference needs."""

    domain: Any
    source: Source
    datamodule: L.LightningDataModule
    stats: dict[str, Any]
    sample: Any = None  # streaming: the documents the tokenizer was fitted on (the unigram reference)
    corpus: Any = None  # cached: the prepared corpus (its train split and validation keys and tags)


def _train(cfg: DictConfig, run_dir: Path, ckpt: Path | None, moved: list[Path]) -> dict[str, Any]:
    """Wire domain, data, model, callbacks and trainer; global rank 0 writes the run folder; fit; save."""
    if (heap := keep_freed_memory()) is not None:
        log.info("host memory: %s", heap)
    settings = OmegaConf.to_container(cfg.domain.settings, resolve=True)
    domain, own_tokenizer, init_run = _domain(cfg, run_dir, ckpt, settings)
    data = _data(cfg, domain, settings, own_tokenizer)
    domain = data.domain  # a cached corpus may hand back the domain it fitted
    config = OmegaConf.to_container(cfg, resolve=True)
    config["data_stats"] = data.stats
    module = _module(cfg, domain, init_run, ckpt)
    log.info("%s: %d parameters; data %s", domain.name, module.model.num_parameters(), data.stats)
    checkpoints, callbacks = _callbacks(cfg, run_dir, ckpt, domain)
    trainer = _trainer(cfg, run_dir, callbacks, config)
    if trainer.is_global_zero:  # only after the Trainer exists: its global rank is the one that counts
        _write_run_folder(cfg, run_dir, ckpt, moved, data, config)
    _fit(trainer, module, data.datamodule, ckpt)
    config["compile_used"] = _compile_used(cfg, callbacks)
    config["attention_used"] = next(c for c in callbacks if isinstance(c, FastestAttention)).state()
    metrics = _final_validation(cfg, trainer, module, data.datamodule, checkpoints, config)
    weights = model_weights(trainer)  # on every rank: FSDP gathers the shards to rank 0 here
    if trainer.is_global_zero:  # the figures go into config["final"], so before save_run writes it
        config["final"] |= reference_figures(module.model, trainer, run_dir, domain, cfg.data)
        save_run(run_dir, module.model, domain, config, weights)
    whole = config["final"].get("val_docs/ppl")
    print(
        f"{domain.name}: val/loss {metrics['val/loss']:.4f} (ppl {metrics['val/ppl']:.2f}, packed blocks)"
        + (f", validation documents ppl {whole:.2f}" if whole is not None else "")
        + f" after {trainer.global_step} steps -> {run_dir}"
    )
    return {"run_dir": str(run_dir), **config["final"]}


def _domain(
    cfg: DictConfig, run_dir: Path, ckpt: Path | None, settings: dict[str, Any]
) -> tuple[Any, bool, Path | None]:
    """The domain to train with, whether its tokenizer is already fitted, and the init_from run if any."""
    own_tokenizer = ckpt is not None and (run_dir / "domain").is_dir()
    init_run = Path(cfg.init_from).expanduser() if cfg.init_from is not None else None
    if own_tokenizer:
        domain = load_domain(cfg.domain.name, run_dir / "domain")
        log.info("%s: resuming with the run's own tokenizer from %s", domain.name, run_dir / "domain")
        warn_unused_settings(settings, run_dir)
    elif init_run is not None:  # fine-tuning: the source run's tokenizer, never a refitted one
        domain = load_domain(cfg.domain.name, init_run / "domain")
        own_tokenizer = True
        log.info("%s: starting from %s (its weights and tokenizer; a fresh optimizer)", domain.name, init_run)
        warn_unused_settings(settings, init_run)
    else:
        domain = build_domain(cfg.domain.name, settings)
        if cfg.data.tags is not None:
            domain = Tagged(domain, cfg.data.tags, max_tags=cfg.data.max_tags)
    return domain, own_tokenizer, init_run


def _data(cfg: DictConfig, domain: Any, settings: dict[str, Any], own_tokenizer: bool) -> _Data:
    """The datamodule: streamed from the source, or a prepared (cached) corpus; the tokenizer fitted unless own."""
    data = cfg.data
    source = Source(
        domain,
        list(data.paths) if data.paths else None,
        data.hf_dataset,
        data.hf_column,
        data.hf_split,
        corpus=data.corpus,
    )
    block_size = int(cfg.model.block_size)
    if data.streaming:
        sample = fit_on_first(domain, source, data.val_fraction, data.fit_documents, fit=not own_tokenizer)
        stats = {"streaming": True, "fit_documents": len(sample), "root": source.root}
        datamodule = StreamingDataModule(
            source,
            domain,
            block_size,
            data.batch_size,
            data.val_fraction,
            data.num_workers,
            cfg.seed,
            data.shuffle_buffer,
        )
        return _Data(domain, source, datamodule, stats, sample=sample)
    corpus = prepare_corpus(
        domain,
        {**settings, **({"tags": data.tags, "max_tags": data.max_tags} if data.tags else {})},
        augment=OmegaConf.to_container(data.augment) if data.augment else None,
        cache_dir=data.cache_dir,
        max_documents=data.max_documents,
        val_fraction=data.val_fraction,
        strict=data.strict,
        fit=not own_tokenizer,
        source=source,
    )
    stats = corpus.stats
    stats["windows_per_document"] = windows_per_document(corpus.train, block_size)
    datamodule = BlockDataModule(
        corpus, block_size, data.batch_size, data.num_workers, seed=cfg.seed, tag_dropout=data.tag_dropout
    )
    return _Data(corpus.domain, source, datamodule, stats, corpus=corpus)


def _module(cfg: DictConfig, domain: Any, init_run: Path | None, ckpt: Path | None) -> LitGPT:
    """The LitGPT for cfg.model over domain's vocabulary; init_from's weights when fine-tuning (not resuming)."""
    model_args = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k != "name"}
    model_config = ModelConfig(vocab_size=domain.vocab_size, **model_args)  # the one place vocab_size enters
    optim = OmegaConf.to_container(cfg.optim, resolve=True)
    module = LitGPT(model_config.to_dict(), optim, domain.pad_id, compile_setting(cfg.compile))
    if init_run is not None and ckpt is None:  # a resumed run's checkpoint holds the weights instead
        load_model(module.model, str(init_run / "model.safetensors"), strict=True)
    return module


def _callbacks(
    cfg: DictConfig, run_dir: Path, ckpt: Path | None, domain: Any
) -> tuple[ModelCheckpoint, list[L.Callback]]:
    """The checkpointing callback (its best path picks the exported weights) and all callbacks, it first."""
    checkpoints = ModelCheckpoint(
        dirpath=run_dir / "checkpoints", filename="best", monitor="val/loss", save_last=True, save_top_k=1
    )
    callbacks: list[L.Callback] = [checkpoints]
    if ckpt is not None:  # read only when resuming: no rank reads a folder that rank 0 may be replacing
        callbacks.append(ResumedCurve(run_dir / "metrics.csv"))
    cache_file = Path(cfg.data.cache_dir).expanduser() / CACHE_FILE
    callbacks.append(FastestAttention(cfg.attention, cfg.data.batch_size, cache_file))
    if compile_setting(cfg.compile) == "auto":
        callbacks.append(CompileWhenItPays(cache_file))
    if cfg.early_stop.patience is not None:
        callbacks.append(
            EarlyStopping(
                monitor="val/loss",
                patience=cfg.early_stop.patience,
                min_delta=cfg.early_stop.min_delta,
                mode="min",
            )
        )
    if cfg.samples.every_n_steps:
        callbacks.append(
            TrainingSamples(
                domain,
                run_dir,
                cfg.samples.every_n_steps,
                cfg.samples.n,
                cfg.samples.max_new_tokens,
                cfg.samples.temperature,
                cfg.seed,
            )
        )
    return checkpoints, callbacks


def _compile_used(cfg: DictConfig, callbacks: list[L.Callback]) -> dict[str, Any]:
    """compile= as set, and what compile=auto decided and measured (config.yaml's compile_used)."""
    chooser = next((c for c in callbacks if isinstance(c, CompileWhenItPays)), None)
    if chooser is None:
        return {"setting": str(cfg.compile).lower(), "compile": compile_setting(cfg.compile) is True}
    return {"setting": "auto"} | (chooser.state() or {"compile": False, "why": "too few steps to time"})


def _trainer(
    cfg: DictConfig, run_dir: Path, callbacks: list[L.Callback], config: dict[str, Any]
) -> L.Trainer:
    """The Trainer: precision resolved (and recorded in config), loggers, our progress lines, atomic checkpoints."""
    trainer_args = OmegaConf.to_container(cfg.trainer, resolve=True)
    if trainer_args.get("precision") is None:
        trainer_args["precision"], why = resolve_precision(
            cfg.precision, str(trainer_args.get("accelerator", "auto")), cfg.data.cache_dir
        )
        log.info("precision=%s: %s %s", cfg.precision, trainer_args["precision"], f"({why})")
    else:
        log.info("trainer.precision=%s (as configured)", trainer_args["precision"])
    config["precision_used"] = str(trainer_args["precision"])
    if trainer_args.get("enable_progress_bar", True):  # our lines instead of Lightning's bar
        callbacks.append(Progress(int(trainer_args.get("log_every_n_steps") or 50)))
    trainer_args["enable_progress_bar"] = False
    return L.Trainer(
        **trainer_args,
        default_root_dir=run_dir,
        logger=build_loggers(
            OmegaConf.to_container(cfg.logger, resolve=True),
            run_dir,
            int(trainer_args.get("log_every_n_steps") or 50),
        ),
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
    )


def _write_run_folder(
    cfg: DictConfig, run_dir: Path, ckpt: Path | None, moved: list[Path], data: _Data, config: dict[str, Any]
) -> None:
    """Global rank 0 only: move an old run aside (or refuse to replace it), then write domain/, config, reference."""
    # Lightning's own global rank (NODE_RANK counted) moves and writes the folder; the other ranks
    # read nothing of it before fit, whose start (the process group's rendezvous) waits for this one
    if cfg.overwrite and _holds_run(run_dir):
        moved.append(_move_aside(run_dir))
    elif ckpt is None and not cfg.overwrite:
        _refuse_to_replace(run_dir)  # the launcher's guess of the rank, checked early, may differ
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(run_dir / "checkpoints")
    domain = data.domain
    if ckpt is None:  # saved before the first step: a killed run resumes with exactly this
        domain.save(run_dir / "domain")
    write_run_config(run_dir, config)
    val_fraction = cfg.data.val_fraction
    if cfg.data.streaming:
        counts = unigram_counts(data.sample, domain.vocab_size, domain.eos_id)
        write_reference(run_dir, data.source, counts, val_fraction, keys=None)
    else:
        corpus = data.corpus
        counts = unigram_counts(dataset_ids(corpus.train), domain.vocab_size, domain.eos_id)
        tags = validation_tags(domain, corpus.val)
        write_reference(run_dir, data.source, counts, val_fraction, list(corpus.val["key"]), tags)


def _fit(trainer: L.Trainer, module: LitGPT, datamodule: L.LightningDataModule, ckpt: Path | None) -> None:
    """trainer.fit; on a failure, global rank 0 ends the rank processes it launched before raising."""
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
    except FloatingPointError:
        if not trainer.is_global_zero:  # every rank stopped at the same step: global rank 0 says why
            raise SystemExit(1) from None
        _end_other_ranks(trainer)
        raise
    except BaseException:
        _end_other_ranks(trainer)
        raise


def model_weights(trainer: L.Trainer) -> dict[str, Tensor]:
    """The trained GPT's whole state dict, through the strategy (FSDP: the full weights gathered onto
    global rank 0, which alone gets them; its module's own parameters are flattened shards there); a
    collective: called on every rank."""
    state = trainer.strategy.lightning_module_state_dict()
    return {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}


def _final_validation(
    cfg: DictConfig,
    trainer: L.Trainer,
    module: LitGPT,
    datamodule: L.LightningDataModule,
    checkpoints: ModelCheckpoint,
    config: dict[str, Any],
) -> dict[str, float]:
    """Validate the exported weights; record config["final"]; return the validation metrics."""
    # the exported weights: the best validated ones (weights=best) or the last; the final metrics are theirs
    use_best = cfg.weights == "best" and bool(checkpoints.best_model_path)
    metrics = trainer.validate(
        module,
        datamodule=datamodule,
        verbose=False,
        ckpt_path="best" if use_best else None,
        weights_only=True,
    )[0]
    best_step = _checkpoint_step(checkpoints.best_model_path) if use_best else trainer.global_step
    config["final"] = {k: float(v) for k, v in metrics.items()} | {
        "steps": trainer.global_step,
        "weights": "best" if use_best else "last",
        "weights_step": best_step,
    }
    return metrics


def reference_figures(
    model: GPT, trainer: L.Trainer, run_dir: Path, domain: Any, data: DictConfig
) -> dict[str, float]:
    """The exported weights on the run's reference documents, scored as `multiar eval` and `multiar
    quantize` score them (every validation document whole, tags as context): `val_docs/*`. The
    in-loop `val/loss` is over packed blocks, capped by trainer.limit_val_batches. Not for streamed
    runs (finding their validation documents means reading the whole input again: `multiar eval`
    does) nor sharded models (one rank alone cannot run them); a failure is a warning, never the run's."""
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    if data.streaming or isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy)):
        return {}
    try:
        docs = reference_documents(run_dir, domain)
    except (OSError, ValueError) as err:
        log.warning("val_docs/*: not scored (%s); `multiar eval` scores them later", err)
        return {}
    nats = score_documents(model, docs, domain.bos_id, domain.eos_id, data.batch_size)
    figures = summary(nats, docs, domain.unit)
    return {
        f"val_docs/{k}": float(figures[k]) for k in ("loss", "ppl", "bits_per_unit", "documents", "tokens")
    }


def _end_other_ranks(trainer: L.Trainer, wait_s: float = 60.0) -> None:
    """On a failure in global rank 0 under Lightning's own launcher: wait (bounded) for the rank processes
    it started, then kill those still running, so that none outlives the run."""
    procs = getattr(trainer.strategy.launcher, "procs", None) if trainer.is_global_zero else None
    deadline = time.monotonic() + wait_s
    for proc in procs or []:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:  # blocked in a collective that rank 0 left
            log.warning("rank process %d still ran %.0f s after rank 0 stopped: killed", proc.pid, wait_s)
            proc.kill()
            proc.wait()


def _checkpoint_step(path: str) -> int:
    """The optimizer step a checkpoint was saved at."""
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])
