"""The typed schema of multiar's configs: wrong types, out-of-range values and unknown keys are caught
when a config is composed, before any heavy work, as one `ConfigError` line that says what to change.

Each command's YAML (conf/<name>.yaml) is merged into a dataclass schema with OmegaConf (types and
unknown keys), then instantiated once so the dataclasses' `__post_init__` checks ranges.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException


class ConfigError(ValueError):
    """A bad argument or config value; the CLI prints it as one line and exits with code 2."""


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


@dataclass
class DomainSchema:
    name: str = "protein"
    settings: dict[str, Any] = field(default_factory=dict)  # the domain class checks its own settings


@dataclass
class ModelSchema:
    name: str = "tiny"
    block_size: int = 512
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for key in ("block_size", "n_layer", "n_head", "n_embd"):
            _check(getattr(self, key) >= 1, f"model.{key}", f"must be >= 1, got {getattr(self, key)}")
        _check(
            self.n_embd % self.n_head == 0 and (self.n_embd // self.n_head) % 2 == 0,
            "model.n_embd",
            f"{self.n_embd} must split into n_head={self.n_head} heads of even size (rotary positions)",
        )
        _check(0.0 <= self.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {self.dropout}")


@dataclass
class DataSchema:
    paths: list[str] | None = None
    corpus: str | None = None  # a bundled corpus of the domain (protein: ecoli, yeast, ecoli+yeast)
    tags: str | None = None  # control tags: header:FIELD, folder, file or tsv:PATH
    tag_dropout: float = 0.2  # share of training documents whose tags are left out
    max_tags: int = 256  # the most frequent tags of the training documents get a token
    augment: dict[str, Any] | None = None  # music: shifted copies of training pieces, {pitch: [-2, 2], ...}
    max_documents: int | None = None
    val_fraction: float = 0.05
    batch_size: int = 16
    num_workers: int = 0
    cache_dir: str = "~/.cache/multiar"
    strict: bool = False  # the first unreadable file or record is an error instead of skipped
    hf_dataset: str | None = None
    hf_column: str | None = None
    hf_split: str = "train"
    streaming: bool = False
    fit_documents: int = 10000
    shuffle_buffer: int = 1000

    def __post_init__(self) -> None:
        _check(
            not (self.hf_dataset is not None and self.paths),
            "data.hf_dataset",
            "give data.paths or data.hf_dataset, not both",
        )
        _check(
            self.hf_dataset is None or bool(self.hf_column),
            "data.hf_column",
            "name the column that holds the documents",
        )
        _check(
            not (self.corpus is not None and self.paths),
            "data.corpus",
            "give data.paths or data.corpus (a bundled corpus), not both",
        )
        _check(
            0.0 <= self.tag_dropout < 1.0, "data.tag_dropout", f"must be in [0, 1), got {self.tag_dropout}"
        )
        _check(self.max_tags >= 1, "data.max_tags", f"must be >= 1, got {self.max_tags}")
        _check(
            not (self.augment and self.streaming),
            "data.augment",
            "augmentation needs the cached corpus (data.streaming=false)",
        )
        _check(
            self.tags is None or not self.streaming,
            "data.tags",
            "control tags need the cached corpus (data.streaming=false)",
        )
        _check(self.fit_documents >= 1, "data.fit_documents", f"must be >= 1, got {self.fit_documents}")
        _check(self.shuffle_buffer >= 1, "data.shuffle_buffer", f"must be >= 1, got {self.shuffle_buffer}")
        _check(
            self.max_documents is None or self.max_documents >= 2,
            "data.max_documents",
            f"must be >= 2 (a train and a validation document), got {self.max_documents}",
        )
        _check(
            0.0 < self.val_fraction < 1.0, "data.val_fraction", f"must be in (0, 1), got {self.val_fraction}"
        )
        _check(self.batch_size >= 1, "data.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.num_workers >= 0, "data.num_workers", f"must be >= 0, got {self.num_workers}")


@dataclass
class OptimSchema:
    lr: float = 3e-3
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        _check(self.lr > 0 and math.isfinite(self.lr), "optim.lr", f"must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "optim.betas",
            f"must be two values in [0, 1), got {list(self.betas)}",
        )
        _check(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _check(
            0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}"
        )


@dataclass
class EarlyStopSchema:
    patience: int | None = None
    min_delta: float = 0.0

    def __post_init__(self) -> None:
        _check(
            self.patience is None or self.patience >= 1,
            "early_stop.patience",
            f"must be >= 1 or null (off), got {self.patience}",
        )
        _check(self.min_delta >= 0, "early_stop.min_delta", f"must be >= 0, got {self.min_delta}")


@dataclass
class SamplesSchema:
    every_n_steps: int = 500
    n: int = 2
    max_new_tokens: int = 64
    temperature: float = 1.0

    def __post_init__(self) -> None:
        _check(
            self.every_n_steps >= 0,
            "samples.every_n_steps",
            f"must be >= 0 (0 is off), got {self.every_n_steps}",
        )
        _check(self.n >= 1, "samples.n", f"must be >= 1, got {self.n}")
        _check(self.max_new_tokens >= 1, "samples.max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        _check(self.temperature >= 0, "samples.temperature", f"must be >= 0, got {self.temperature}")


LOGGERS = ("csv", "tensorboard", "wandb", "mlflow")
PRECISIONS = ("auto", "32-true", "32", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true")


@dataclass
class TrainSchema:
    domain: DomainSchema = field(default_factory=DomainSchema)
    model: ModelSchema = field(default_factory=ModelSchema)
    trainer: dict[str, Any] = field(default_factory=dict)  # Lightning Trainer arguments, checked below
    run_dir: str = "runs/run"
    seed: int = 1337
    overwrite: bool = False
    ckpt_path: str | None = None
    data: DataSchema = field(default_factory=DataSchema)
    optim: OptimSchema = field(default_factory=OptimSchema)
    init_from: str | None = None
    weights: str = "best"
    precision: str = "auto"
    compile: bool = False
    early_stop: EarlyStopSchema = field(default_factory=EarlyStopSchema)
    samples: SamplesSchema = field(default_factory=SamplesSchema)
    logger: dict[str, Any] = field(default_factory=lambda: {"name": "csv"})

    def __post_init__(self) -> None:
        _check(self.weights in ("best", "last"), "weights", f"must be best or last, got {self.weights!r}")
        _check(
            self.precision in PRECISIONS,
            "precision",
            f"must be one of {', '.join(PRECISIONS)}, got {self.precision!r}",
        )
        _check(
            self.logger.get("name") in LOGGERS,
            "logger",
            f"must be one of {', '.join(LOGGERS)}, got {self.logger.get('name')!r}",
        )
        _check(
            not (self.init_from is not None and self.ckpt_path is not None),
            "init_from",
            "and ckpt_path together: resume this run, or start a new one from another run's weights",
        )


@dataclass
class GenerateSchema:
    run: str = "???"
    out: str | None = None
    n: int = 8
    batch_size: int = 8
    max_new_tokens: int = 256
    min_new_tokens: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    repetition_window: int = 64
    stop: str | None = None
    stop_ids: list[list[int]] = field(default_factory=list)
    seed: int = 1
    prompt: str | None = None
    prompt_file: str | None = None
    include_prompt: bool = True
    overwrite: bool = False
    device: str = "cpu"
    quantize: str | None = None  # int8 / int4: weight-only (a stored model.<mode>.safetensors is reused)
    dtype: str = "auto"  # auto: bf16 where the hardware runs it fast, else fp32
    compile: bool = False
    draft: str | None = None  # a run folder, or "ngram"
    speculate_k: int = 4
    ngram: int = 3
    tags: str | None = None  # control tags, comma-separated (a run trained with data.tags)
    min_len: int | None = None  # in the domain's units (protein residues), prompt included
    max_len: int | None = None
    template: str | None = None  # a sequence to redesign, keeping the `fixed` positions
    fixed: str | None = None  # 1-based positions of the template: 1-20,45,60-70
    rank_by: str | None = None  # ppl: score every sample with the model, rank the ones passing filters
    top: int | None = None  # with rank_by: write the best `top` under out/top/
    filters: dict[str, Any] = field(default_factory=dict)  # the domain's sample filters (protein)
    constrain: bool = True  # sample under the domain's grammar constraint (music, code)
    resample_invalid: int = 0  # re-draw a sample the domain judges invalid (code: no parse), up to K times
    stop_at: str | None = None  # a domain's stopping rule: code's "block" (the end of the definition)
    prompt_prefix: str | None = None  # fill in the middle between prompt_prefix and prompt_suffix
    prompt_suffix: str | None = None
    infill: str | None = None  # a file whose text <FILL> marks the gap to fill
    prompt_bars: int | None = None  # music: continue only the first bars of the prompt file
    render: str | None = None  # music: wav writes a WAV beside each .mid (fluidsynth + a GM SoundFont)
    soundfont: str | None = None  # render=wav: the SoundFont (.sf2); default: Debian's FluidR3_GM

    def __post_init__(self) -> None:
        _check(
            self.quantize in (None, "int8", "int4"),
            "quantize",
            f"must be int8, int4 or null, got {self.quantize!r}",
        )
        _check(
            self.dtype in ("auto", "fp32", "bf16"), "dtype", f"must be auto, fp32 or bf16, got {self.dtype!r}"
        )
        _check(self.n >= 1, "n", f"must be >= 1, got {self.n}")
        _check(
            not (self.stop_at is not None and self.draft is not None),
            "stop_at",
            "does not work with speculative decoding yet (draft=...)",
        )
        infilling = self.prompt_prefix is not None or self.prompt_suffix is not None
        _check(
            not (infilling and self.infill is not None),
            "infill",
            "give infill=FILE or prompt_prefix/prompt_suffix, not both",
        )
        _check(
            not (
                (infilling or self.infill is not None)
                and (self.prompt is not None or self.prompt_file is not None)
            ),
            "prompt",
            "a fill-in-the-middle prompt is prompt_prefix/prompt_suffix (or infill=FILE), not prompt",
        )
        _check(
            self.prompt_bars is None or self.prompt_bars >= 1,
            "prompt_bars",
            f"must be >= 1, got {self.prompt_bars}",
        )
        _check(self.render in (None, "wav"), "render", f"must be wav or null, got {self.render!r}")
        _check(self.resample_invalid >= 0, "resample_invalid", f"must be >= 0, got {self.resample_invalid}")
        _check(self.rank_by in (None, "ppl"), "rank_by", f"must be ppl or null, got {self.rank_by!r}")
        _check(self.top is None or self.top >= 1, "top", f"must be >= 1, got {self.top}")
        _check(self.top is None or self.rank_by is not None, "top", "needs rank_by=ppl (what to rank by)")
        for key in ("min_len", "max_len"):
            value = getattr(self, key)
            _check(value is None or value >= 1, key, f"must be >= 1, got {value}")
        _check(self.template != "", "template", "is empty: give the sequence to redesign")
        _check(self.speculate_k >= 1, "speculate_k", f"must be >= 1, got {self.speculate_k}")
        _check(self.ngram >= 1, "ngram", f"must be >= 1, got {self.ngram}")
        _check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        _check(self.min_new_tokens >= 0, "min_new_tokens", f"must be >= 0, got {self.min_new_tokens}")
        _check(
            self.min_new_tokens <= self.max_new_tokens,
            "min_new_tokens",
            f"{self.min_new_tokens} exceeds max_new_tokens={self.max_new_tokens}",
        )
        _check(
            self.temperature >= 0 and math.isfinite(self.temperature),
            "temperature",
            f"must be >= 0 (0 is greedy), got {self.temperature}",
        )
        _check(self.top_k >= 0, "top_k", f"must be >= 0 (0 is off), got {self.top_k}")
        _check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1] (1 is off), got {self.top_p}")
        _check(0 <= self.min_p < 1, "min_p", f"must be in [0, 1) (0 is off), got {self.min_p}")
        _check(
            self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty),
            "repetition_penalty",
            f"must be > 0 (1 is off), got {self.repetition_penalty}",
        )
        _check(
            self.repetition_window >= 1, "repetition_window", f"must be >= 1, got {self.repetition_window}"
        )
        _check(self.stop != "", "stop", "is empty: give the text that ends a sample, or stop=null")
        _check(all(len(s) > 0 for s in self.stop_ids), "stop_ids", "holds an empty sequence")
        _check(
            not (self.prompt is not None and self.prompt_file is not None),
            "prompt_file",
            "give prompt or prompt_file, not both",
        )


@dataclass
class QuantizeSchema:
    run: str = "???"
    mode: str = "int8"
    device: str = "cpu"
    eval_batches: int = 20
    batch_size: int = 8

    def __post_init__(self) -> None:
        _check(self.mode in ("int8", "int4"), "mode", f"must be int8 or int4, got {self.mode!r}")
        _check(self.eval_batches >= 1, "eval_batches", f"must be >= 1, got {self.eval_batches}")
        _check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")


@dataclass
class ExportSchema:
    run: str = "???"
    format: str = "hf"
    out: str = "???"
    overwrite: bool = False

    def __post_init__(self) -> None:
        _check(
            self.format == "hf", "format", f"must be hf (transformers LlamaForCausalLM), got {self.format!r}"
        )


@dataclass
class EvalDataSchema:
    paths: list[str] | None = None
    strict: bool = False


@dataclass
class EvalSchema:
    run: str = "???"
    data: EvalDataSchema = field(default_factory=EvalDataSchema)
    out: str | None = None
    n: int = 8
    max_new_tokens: int = 256
    temperature: float = 1.0
    seed: int = 1
    batch_size: int = 16
    device: str = "cpu"
    overwrite: bool = False

    def __post_init__(self) -> None:
        _check(self.n >= 0, "n", f"must be >= 0 (0 is off), got {self.n}")
        _check(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        _check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.temperature >= 0, "temperature", f"must be >= 0, got {self.temperature}")


@dataclass
class ScoreDataSchema:
    paths: list[str] = "???"  # type: ignore[assignment]
    strict: bool = False


@dataclass
class ScoreSchema:
    run: str = "???"
    data: ScoreDataSchema = field(default_factory=ScoreDataSchema)
    out: str | None = None
    batch_size: int = 16
    device: str = "cpu"
    overwrite: bool = False

    def __post_init__(self) -> None:
        _check(bool(self.data.paths), "data.paths", "give the files or folders to score")
        _check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")


@dataclass
class DemoSchema:
    out: str = "outputs/demo"
    runs: str = "runs/demo"
    domains: list[str] = field(default_factory=list)
    train_overrides: dict[str, list[str]] = field(default_factory=dict)
    generate: dict[str, dict[str, Any]] = field(default_factory=dict)


SCHEMAS: dict[str, type] = {
    "train": TrainSchema,
    "generate": GenerateSchema,
    "quantize": QuantizeSchema,
    "export": ExportSchema,
    "demo": DemoSchema,
    "eval": EvalSchema,
    "score": ScoreSchema,
}


def _trainer_keys() -> set[str]:
    import inspect

    import lightning as L

    return set(inspect.signature(L.Trainer.__init__).parameters) - {"self"}


def validate(name: str, cfg: DictConfig) -> DictConfig:
    """cfg checked against the schema of command `name`: the typed DictConfig, or ConfigError."""
    schema = SCHEMAS.get(name)
    if schema is None:
        return cfg
    try:
        typed = OmegaConf.merge(OmegaConf.structured(schema), cfg)
        OmegaConf.to_object(typed)  # runs the range checks in __post_init__
    except MissingMandatoryValue as err:
        raise ConfigError(f"{getattr(err, 'full_key', '') or 'a key'}: missing mandatory value") from None
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"{key}: {message}" if key and not message.startswith(str(key)) else message
        ) from None
    if name == "train":
        unknown = sorted(set(typed.trainer) - _trainer_keys())
        _check(not unknown, "trainer", f"unknown Lightning Trainer argument(s): {', '.join(unknown)}")
    return typed
