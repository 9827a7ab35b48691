"""The typed schema of multiar's configs: wrong types, out-of-range values and unknown keys are caught
when a config is composed, before any heavy work, as one `ConfigError` line that says what to change.

The schema is the one source of defaults: multiar.config registers each command's dataclass with Hydra's
ConfigStore as the base of conf/<name>.yaml, whose YAML files hold only what differs (config-group
choices, model presets, trainer and logger groups, recipes). The composed config is typed by the schema
(types and unknown keys), then instantiated once so the dataclasses' `__post_init__` checks ranges. Every
field carries its help text (`doc`): `multiar <command> --help` prints each key, its value and that text.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any, get_type_hints

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from multiar.errors import ConfigError, first_line


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def doc(
    help: str,
    default: Any = MISSING,
    *,
    factory: Callable[[], Any] | Any = MISSING,
    each: str | dict[str, str] = "",
) -> Any:
    """A dataclass field with its help text; `each` documents the entries of a free-form dict field (one
    text for all, or one per entry's name)."""
    return field(default=default, default_factory=factory, metadata={"help": help, "each": each})


DEVICE_HELP = "auto: cuda when a GPU answers, else cpu; or cpu, cuda, cuda:N"


def resolve_device(device: str) -> str:
    """A real torch device for `device`: auto is cuda when a GPU answers, else cpu; others as given."""
    if device != "auto":
        return device
    import torch  # only here: composing a config does not need torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_decode(quantize: str | None, dtype: str, layout: str) -> None:
    """generate's and serve's weight format: quantize, dtype and layout."""
    _check(quantize in (None, "int8", "int4"), "quantize", f"must be int8, int4 or null, got {quantize!r}")
    _check(dtype in ("auto", "fp32", "bf16"), "dtype", f"must be auto, fp32 or bf16, got {dtype!r}")
    _check(
        layout in ("auto", "linear", "packed"), "layout", f"must be auto, linear or packed, got {layout!r}"
    )


COMPILE_SETTINGS = {"auto": "auto", "true": True, "false": False}
ATTENTION_SETTINGS = ("auto", "sdpa", "matmul")  # engine.attention_choice.SETTINGS
ROWS_ATTENTION_SETTINGS = ("auto", "sdpa", "compiled", "operator")  # "auto" and engine.rows_attention.WAYS


def compile_setting(value: str | bool) -> bool | str:
    """generate's compile= as prepare_for_decoding takes it: True, False or "auto" (the config holds a
    string: a command line's compile=true arrives as "True")."""
    return COMPILE_SETTINGS[str(value).lower()]


def _check_device(device: str) -> None:
    _check(
        re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", device) is not None,
        "device",
        f"must be auto, cpu, cuda or cuda:N, got {device!r}",
    )


@dataclass
class DomainSchema:
    name: str = doc("the domain: music, code or protein (domain=NAME picks conf/domain/NAME.yaml)", "protein")
    settings: dict[str, Any] = doc(
        "the domain's own settings (the domain class checks them)",
        factory=dict,
        each="a domain setting (conf/domain/<domain>.yaml says what it does)",
    )


@dataclass
class ModelSchema:
    name: str = doc("the preset's name (model=tiny|small|base picks conf/model/NAME.yaml)", "tiny")
    block_size: int = doc("context length in tokens (the training window)", 512)
    n_layer: int = doc("transformer blocks", 4)
    n_head: int = doc("attention heads per block", 4)
    n_embd: int = doc("embedding width (n_embd / n_head: an even head size, for rotary positions)", 128)
    dropout: float = doc("dropout rate while training", 0.0)

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
    paths: list[str] | None = doc("files or folders to train on; null: the domain's bundled data", None)
    corpus: str | None = doc(
        "a bundled corpus: protein ecoli (default), yeast, ecoli+yeast; music chorales (default), "
        "pop909; code stdlib (default), site-packages",
        None,
    )
    tags: str | None = doc("control tags: header:FIELD (protein header:OX), folder, file or tsv:PATH", None)
    tag_dropout: float = doc(
        "share of training documents packed without their tags (so untagged sampling works too)", 0.2
    )
    max_tags: int = doc("the most frequent training tags get a token", 256)
    augment: dict[str, Any] | None = doc(
        "music: shifted copies of each training piece, {pitch: [-2, 2], velocity: [-4], duration: [0.25]}; "
        "empty: none",
        factory=dict,  # not None: OmegaConf cannot merge a {...} override into a None-valued typed dict
        each="music augmentation offsets",
    )
    max_documents: int | None = doc(
        "keep the first N documents (files, or FASTA records) in sorted file order; null: all", None
    )
    val_fraction: float = doc("share of documents (by a hash of their key) held out for validation", 0.05)
    batch_size: int = doc("training windows per batch (per rank)", 16)
    num_workers: int = doc("DataLoader worker processes", 0)
    cache_dir: str = doc(
        "the token cache ($MULTIAR_CACHE, else ~/.cache/multiar)",
        "${oc.env:MULTIAR_CACHE,'~/.cache/multiar'}",
    )
    strict: bool = doc("the first unreadable file or record is an error instead of skipped", False)
    hf_dataset: str | None = doc(
        "an HF dataset instead of files: a save_to_disk folder, or a hub name (network)", None
    )
    hf_column: str | None = doc(
        "the HF dataset's column holding the documents: text (code), sequences (protein), MIDI bytes or paths",
        None,
    )
    hf_split: str = doc("the HF dataset's split", "train")
    streaming: bool = doc(
        "tokenize and pack on the fly, for corpora larger than memory (no cache, no duplicate removal)", False
    )
    fit_documents: int = doc("streaming: the tokenizer is fitted on the first N training documents", 10000)
    shuffle_buffer: int = doc("streaming: blocks are shuffled within a buffer of this many", 1000)

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
    lr: float = doc("peak learning rate (AdamW) after warmup; each model preset sets its own", 3e-3)
    weight_decay: float = doc(
        "AdamW weight decay of the matrices (linears, embedding); norm gains get none", 0.1
    )
    betas: list[float] = doc("AdamW betas", factory=lambda: [0.9, 0.95])
    warmup_steps: int = doc(
        "linear warmup steps, then a cosine decay to lr x min_lr_ratio at trainer.max_steps", 50
    )
    min_lr_ratio: float = doc("the cosine schedule ends at lr x this", 0.1)

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
    patience: int | None = doc("stop after this many validations without a better val/loss; null: off", None)
    min_delta: float = doc("the least val/loss improvement that counts", 0.0)

    def __post_init__(self) -> None:
        _check(
            self.patience is None or self.patience >= 1,
            "early_stop.patience",
            f"must be >= 1 or null (off), got {self.patience}",
        )
        _check(self.min_delta >= 0, "early_stop.min_delta", f"must be >= 0, got {self.min_delta}")


@dataclass
class SamplesSchema:
    every_n_steps: int = doc(
        "samples under run_dir/samples/step_N/ every N steps and at the end, their metrics logged; 0: off",
        500,
    )
    n: int = doc("samples each time", 2)
    max_new_tokens: int = doc("new tokens per sample", 64)
    temperature: float = doc("sampling temperature (0: greedy)", 1.0)

    def __post_init__(self) -> None:
        _check(
            self.every_n_steps >= 0,
            "samples.every_n_steps",
            f"must be >= 0 (0 is off), got {self.every_n_steps}",
        )
        _check(self.n >= 1, "samples.n", f"must be >= 1, got {self.n}")
        _check(self.max_new_tokens >= 1, "samples.max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        _check(
            self.temperature >= 0 and math.isfinite(self.temperature),
            "samples.temperature",
            f"must be a finite number >= 0, got {self.temperature}",
        )


LOGGERS = ("csv", "tensorboard", "wandb", "mlflow")
PRECISIONS = ("auto", "32-true", "32", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true")


@dataclass
class TrainSchema:
    domain: DomainSchema = doc("the domain", factory=DomainSchema)
    model: ModelSchema = doc("the transformer's shape", factory=ModelSchema)
    trainer: dict[str, Any] = doc(
        "Lightning Trainer arguments (trainer=cpu|gpu|ddp|fsdp picks conf/trainer/NAME.yaml)",
        factory=dict,
        each="a Lightning Trainer argument (any one passes through)",
    )
    run_dir: str = doc("the run folder written", "runs/${domain.name}-${model.name}")
    seed: int = doc("random seed (weights, data order)", 1337)
    overwrite: bool = doc("replace a finished run in run_dir (false: refuse to)", False)
    ckpt_path: str | None = doc("last: resume from run_dir/checkpoints/last.ckpt", None)
    data: DataSchema = doc("the training data", factory=DataSchema)
    optim: OptimSchema = doc("the optimizer (AdamW)", factory=OptimSchema)
    init_from: str | None = doc("a finished run: start from its weights and tokenizer, fresh optimizer", None)
    weights: str = doc("what model.safetensors holds: best (lowest val/loss) or last", "best")
    precision: str = doc(
        "auto: bf16-mixed where bf16 matmuls are faster here (GPU, AMX CPU), else 32-true; an explicit "
        "trainer.precision wins",
        "auto",
    )
    compile: str = doc(
        "auto: the first steps run eager and are timed, then the training step is compiled when the steps "
        "left repay the compile (as measured here before; a first compile only for a run of more than 12 "
        "(bf16) or 36 (fp32) x 30 s eager: multiar/training/compile_when_it_pays.py); true: torch.compile "
        "the model's blocks for training and validation; false: never",
        "auto",
    )
    attention: str = doc(
        "auto: the faster of sdpa and matmul for training, timed at the batch's shape and dtype once per "
        "machine (multiar/engine/attention_choice.py); sdpa: F.scaled_dot_product_attention; matmul: "
        "batched matmuls (faster on a CPU in bf16 at a few hundred tokens)",
        "auto",
    )
    early_stop: EarlyStopSchema = doc("early stopping on val/loss", factory=EarlyStopSchema)
    samples: SamplesSchema = doc("samples while training", factory=SamplesSchema)
    logger: dict[str, Any] = doc(
        "where metrics go besides metrics.csv (logger=csv|tensorboard|wandb|mlflow)",
        factory=lambda: {"name": "csv"},
        each={
            "name": "csv (metrics.csv only), tensorboard, wandb or mlflow (logger=NAME picks conf/logger/NAME.yaml)",
            "project": "wandb: the project",
            "offline": "wandb: true writes files under run_dir/wandb/ (`wandb sync` uploads them later); "
            "false logs live (needs a login and network)",
            "experiment_name": "mlflow: the experiment",
            "tracking_uri": "mlflow: where runs are tracked; null: a local store in run_dir/mlruns",
        },
    )

    def __post_init__(self) -> None:
        _check(self.weights in ("best", "last"), "weights", f"must be best or last, got {self.weights!r}")
        _check(
            str(self.compile).lower() in COMPILE_SETTINGS,
            "compile",
            f"must be auto, true or false, got {self.compile!r}",
        )
        _check(
            self.attention in ATTENTION_SETTINGS,
            "attention",
            f"must be one of {', '.join(ATTENTION_SETTINGS)}, got {self.attention!r}",
        )
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
    run: str = doc("the run folder to sample from (multiar train's run_dir)", "???")
    out: str | None = doc("folder for the files; null: outputs/<domain>/", None)
    n: int = doc("samples (per prompt with prompt_file)", 8)
    batch_size: int = doc("samples decoded together", 8)
    max_new_tokens: int = doc(
        "new tokens per sample; past block_size each row's window slides to its latest block_size/2 "
        "tokens, cut as a training window (no BOS)",
        256,
    )
    min_new_tokens: int = doc("EOS is not sampled before this many new tokens: no empty samples", 1)
    temperature: float = doc("sampling temperature; 0 is greedy", 1.0)
    top_k: int = doc("keep the k most likely tokens; 0 is off", 0)
    top_p: float = doc("nucleus sampling: keep the most likely tokens up to this mass; 1.0 is off", 1.0)
    min_p: float = doc("keep tokens with probability >= min_p x the most likely one; 0 is off", 0.0)
    repetition_penalty: float = doc(
        "> 1 discourages ids seen in the last repetition_window tokens; 1 is off", 1.0
    )
    repetition_window: int = doc("how many recent tokens repetition_penalty looks at", 64)
    stop: str | None = doc("free text: a row ends when its output reaches it (not written)", None)
    stop_ids: list[list[int]] = doc("token-id sequences that end a row, e.g. [[12,7],[3]]", factory=list)
    seed: int = doc("random seed: the same seed and settings write the same files", 1)
    prompt: str | None = doc("music: a .mid file to continue; code: text; protein: a residue prefix", None)
    prompt_file: str | None = doc("one prompt per line (music: MIDI paths); n samples of each, batched", None)
    include_prompt: bool = doc("written files hold prompt + continuation", True)
    overwrite: bool = doc("replace existing output files", False)
    device: str = doc(DEVICE_HELP, "auto")
    quantize: str | None = doc(
        "int8 or int4 (group-wise) weight-only; a stored model.<mode>.safetensors is reused", None
    )
    dtype: str = doc(
        "auto (fp32 or bf16, whichever decodes faster here: measured once, cached), fp32 or bf16", "auto"
    )
    layout: str = doc(
        "auto (nn.Linear or oneDNN-packed weights, whichever decodes faster here), linear or packed", "auto"
    )
    compile: str = doc(
        "auto: torch.compile the one-token decode step when that pays for this job (its decode steps, "
        "batches x max_new_tokens, against the compile's seconds and the step it saves, as measured here "
        "before; a first compile only for a long job: multiar/engine/compile_choice.py); true: always "
        "(static shapes; on a CPU frozen weights and a C++ wrapper: ~25-45 s to compile on 2 cores, ~7 s "
        "again from inductor's cache, then ~1.5-2x the eager step of a small model at batch 1 and 8; on "
        "CUDA one CUDA graph a step: 6x eager at 85M batch 1 on an H200: benchmarks/README.md); false: never",
        "auto",
    )
    draft: str | None = doc(
        "speculative decoding: a smaller run with the same tokenizer, or ngram (prompt lookup)", None
    )
    speculate_k: int = doc("draft tokens checked per target step", 4)
    ngram: int = doc("draft=ngram: match the last this-many tokens", 3)
    tags: str | None = doc(
        "control tags, comma-separated (a run trained with data.tags): tags=OX=83333", None
    )
    min_len: int | None = doc("protein: EOS is masked before this many residues (prompt included)", None)
    max_len: int | None = doc(
        "protein: a sample reaching this many residues is cut there, marked truncated", None
    )
    template: str | None = doc("protein: a sequence to redesign, sampled from BOS at its length", None)
    fixed: str | None = doc("the template's 1-based positions kept: 1-20,45,60-70", None)
    rank_by: str | None = doc("ppl: score every sample with the model, rank those passing the filters", None)
    top: int | None = doc("with rank_by: the best `top` samples are also written under <out>/top/", None)
    filters: dict[str, Any] = doc(
        "protein: which samples pass (rank_by ranks only those); reported per sample",
        factory=dict,
        each={
            "min_entropy": "lowest Shannon entropy (bits) of any entropy_window residues: low complexity "
            "below (95% of the bundled proteomes reach 1.2)",
            "entropy_window": "the residues min_entropy looks at together",
            "max_homopolymer": "longest run of one residue (98% of the bundled proteomes: 10 or less)",
            "max_identity": "identity to the nearest training sequence (a near copy above)",
            "novelty": "search the nearest training sequence (k-mer prefilter, then Bio.Align); false: "
            "off (no identity column, the fastest large runs)",
            "candidates": "training sequences aligned per sample, best by shared 4-mers",
            "workers": "processes the novelty search of each batch is spread over (1: in the sampling one)",
        },
    )
    constrain: bool = doc(
        "sample under the domain's grammar: music's token types, code's lexical soundness", True
    )
    unfinished: str = doc(
        "a sample the length cap (or no valid token) cut before it ended, where the domain judges "
        "validity (code: the file "
        "parses): cut — it ends after the most of its new tokens that make a valid sample (its "
        "cut_tokens column counts the rest); keep — as drawn; auto — cut under constrain=true",
        "auto",
    )
    resample_invalid: int = doc(
        "code: re-draw a sample that does not parse, up to this many times (counted)", 0
    )
    stop_at: str | None = doc("code: block ends a sample at the end of its top-level definition", None)
    prompt_prefix: str | None = doc(
        "fill in the middle (a run trained with domain.settings.fim_rate > 0): the text before the gap; "
        "the written file is prefix + middle + suffix",
        None,
    )
    prompt_suffix: str | None = doc("fill in the middle: the text after the gap", None)
    infill: str | None = doc("fill in the middle: a file whose text <FILL> marks the gap", None)
    options: dict[str, Any] = doc(
        "the domain's own generate options, +options.NAME=VALUE (its generate_options say which)",
        factory=dict,
        each="a generate option of the run's domain (checked by the domain before sampling)",
    )
    render: str | None = doc("music: wav also writes sample_NNN.wav (fluidsynth and a GM SoundFont)", None)
    soundfont: str | None = doc(
        "render=wav: the .sf2; null: Debian's GM SoundFont (FluidR3_GM, TimGM6mb, default-GM)", None
    )
    progress: bool = doc(
        "a progress line on stderr for runs past a few seconds (samples, tok/s, ETA; a plain line per 10% "
        "when stderr is no terminal)",
        True,
    )
    resume: bool = doc(
        "go on with the interrupted run in `out` (its generate.resume journal) after its last whole batch, "
        "to the files an uninterrupted run writes; the other settings must be the same",
        False,
    )

    def __post_init__(self) -> None:
        self._check_engine()
        self._check_prompts()
        self._check_sampling()
        self._check_outputs()

    def _check_engine(self) -> None:
        _check_device(self.device)
        _check_decode(self.quantize, self.dtype, self.layout)
        _check(
            str(self.compile).lower() in COMPILE_SETTINGS,
            "compile",
            f"must be auto, true or false, got {self.compile!r}",
        )
        _check(
            not (compile_setting(self.compile) is True and self.layout == "packed"),
            "layout",
            "packed does not compile: use auto",
        )
        _check(
            not (self.stop_at is not None and self.draft is not None),
            "stop_at",
            "does not work with speculative decoding yet (draft=...)",
        )
        _check(self.speculate_k >= 1, "speculate_k", f"must be >= 1, got {self.speculate_k}")
        _check(self.ngram >= 1, "ngram", f"must be >= 1, got {self.ngram}")
        _check(
            self.unfinished in ("auto", "cut", "keep"),
            "unfinished",
            f"must be auto, cut or keep, got {self.unfinished!r}",
        )
        _check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")

    def _check_prompts(self) -> None:
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
            not (self.prompt is not None and self.prompt_file is not None),
            "prompt_file",
            "give prompt or prompt_file, not both",
        )
        for key in ("min_len", "max_len"):
            value = getattr(self, key)
            _check(value is None or value >= 1, key, f"must be >= 1, got {value}")
        _check(self.template != "", "template", "is empty: give the sequence to redesign")

    def _check_sampling(self) -> None:
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

    def _check_outputs(self) -> None:
        _check(self.n >= 1, "n", f"must be >= 1, got {self.n}")
        _check(self.render in (None, "wav"), "render", f"must be wav or null, got {self.render!r}")
        _check(self.resample_invalid >= 0, "resample_invalid", f"must be >= 0, got {self.resample_invalid}")
        _check(self.rank_by in (None, "ppl"), "rank_by", f"must be ppl or null, got {self.rank_by!r}")
        _check(self.top is None or self.top >= 1, "top", f"must be >= 1, got {self.top}")
        _check(self.top is None or self.rank_by is not None, "top", "needs rank_by=ppl (what to rank by)")


@dataclass
class QuantizeSchema:
    run: str = doc("the run folder whose weights are quantized", "???")
    mode: str = doc(
        "int8 (per output channel) or int4 (4-bit, a scale and zero point per 32 input channels; "
        "a layer the int4 kernel cannot take stays int8): writes model.<mode>.safetensors",
        "int8",
    )
    device: str = doc(DEVICE_HELP, "auto")
    eval_batches: int | None = doc(
        "score the first eval_batches x batch_size validation documents of reference/ (fp32 and the "
        "quantized model side by side, in quantize.json); null: every one, the documents and figure "
        "`multiar eval` reports",
        None,
    )
    batch_size: int = doc("documents' windows scored together", 8)

    def __post_init__(self) -> None:
        _check_device(self.device)
        _check(self.mode in ("int8", "int4"), "mode", f"must be int8 or int4, got {self.mode!r}")
        _check(
            self.eval_batches is None or self.eval_batches >= 1,
            "eval_batches",
            f"must be >= 1 or null (all), got {self.eval_batches}",
        )
        _check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")


@dataclass
class ExportSchema:
    run: str = doc("the run folder to export", "???")
    format: str = doc("hf: a transformers LlamaForCausalLM folder; gguf: one llama.cpp GGUF file", "hf")
    out: str = doc("the folder (hf) or file (gguf) written", "???")
    overwrite: bool = doc("replace an existing folder or file", False)
    gguf_type: str = doc("format=gguf: the weights' type, f32, f16, bf16 or q8_0 (norms stay f32)", "f16")

    def __post_init__(self) -> None:
        _check(
            self.format in ("hf", "gguf"),
            "format",
            f"must be hf (transformers LlamaForCausalLM) or gguf (llama.cpp), got {self.format!r}",
        )
        _check(
            self.gguf_type in ("f32", "f16", "bf16", "q8_0"),
            "gguf_type",
            f"must be f32, f16, bf16 or q8_0, got {self.gguf_type!r}",
        )


@dataclass
class EvalDataSchema:
    paths: list[str] | None = doc("files or folders to evaluate; null: the run's own validation split", None)
    strict: bool = doc("the first unreadable file or record is an error instead of skipped", False)


@dataclass
class EvalSchema:
    run: str = doc("the run folder to evaluate", "???")
    data: EvalDataSchema = doc("the documents scored", factory=EvalDataSchema)
    out: str | None = doc("folder for eval.json, eval.md, curves.png; null: <run>/eval/", None)
    n: int = doc("fresh samples whose domain metrics are reported; 0 is off", 8)
    max_new_tokens: int = doc("new tokens per fresh sample", 256)
    temperature: float = doc("the fresh samples' temperature", 1.0)
    seed: int = doc("random seed of the fresh samples", 1)
    batch_size: int = doc("windows scored together", 16)
    device: str = doc(DEVICE_HELP, "auto")
    overwrite: bool = doc("replace an existing report", False)

    def __post_init__(self) -> None:
        _check_device(self.device)
        _check(self.n >= 0, "n", f"must be >= 0 (0 is off), got {self.n}")
        _check(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        _check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        _check(
            self.temperature >= 0 and math.isfinite(self.temperature),
            "temperature",
            f"must be a finite number >= 0, got {self.temperature}",
        )


@dataclass
class ScoreDataSchema:
    paths: list[str] = doc("files or folders to score: one CSV row per document", "???")
    strict: bool = doc("the first unreadable file or record is an error instead of skipped", False)


@dataclass
class ScoreSchema:
    run: str = doc("the run folder whose model scores", "???")
    data: ScoreDataSchema = doc("the documents scored", factory=ScoreDataSchema)
    out: str | None = doc("the CSV; null: <run>/score.csv", None)
    batch_size: int = doc("windows scored together", 16)
    device: str = doc(DEVICE_HELP, "auto")
    overwrite: bool = doc("replace an existing CSV", False)

    def __post_init__(self) -> None:
        _check_device(self.device)
        _check(bool(self.data.paths), "data.paths", "give the files or folders to score")
        _check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")


@dataclass
class ServeSchema:
    runs: list[str] = doc("run folders to serve; each folder's name is the model name in requests", "???")
    host: str = doc(
        "address to bind; any other than loopback needs an API key (MULTIAR_API_KEY)", "127.0.0.1"
    )
    port: int = doc("TCP port", 8000)
    slots: int = doc("rows of KV cache per model: requests decoded together", 8)
    max_queue: int = doc("requests waiting per model beyond the slots; more get 429 with Retry-After", 64)
    prefill_chunk: int = doc("most prompt tokens prefilled per decode step (running rows keep streaming)", 64)
    stream_interval: float = doc(
        "seconds at least between a stream's token events; the tokens drawn meanwhile go in the next "
        "(0: an event per decode step). 50 updates a second read and draw smoothly, and a server that "
        "sends fewer events has more of its cores for decoding",
        0.02,
    )
    max_tokens: int = doc("cap on a request's max_new_tokens", 1024)
    max_n: int = doc("most samples one request may ask for", 16)
    request_timeout: float = doc("seconds a request may run before its rows end (end reason timeout)", 600.0)
    drain_timeout: float = doc("seconds running requests get to finish at SIGTERM / Ctrl-C", 30.0)
    max_body_bytes: int = doc("largest request body (a music prompt's MIDI included)", 1048576)
    keep_files: int = doc("files the server keeps for /v1/files (oldest removed first)", 1000)
    files_dir: str | None = doc("where request files are written; null: a temporary folder", None)
    api_key_file: str | None = doc(
        "a file holding the API key (else MULTIAR_API_KEY); never on the command line", None
    )
    cors_origins: list[str] = doc("origins allowed by CORS; empty: CORS off", factory=list)
    quantize: str | None = doc("int8 or int4 weight-only, as generate", None)
    dtype: str = doc("auto, fp32 or bf16, as generate", "auto")
    layout: str = doc("auto, linear or packed, as generate (measured at batch `slots`)", "auto")
    attention: str = doc(
        "the decoding rows' attention: sdpa (torch's, fp32 keys/values on a CPU without AMX), compiled (inductor, "
        "keys/values in the weights' dtype), operator (multiar's C++ operator on a CPU, keys/values in the weights' "
        "dtype) or auto (the fastest at `slots` rows, measured once here)",
        "auto",
    )
    step: str = doc(
        "eager; captured: each step (decoding rows and prompt chunks) runs as one compiled graph "
        "(inductor: frozen "
        "nn.Linear weights, so layout=auto or linear; 1-2 minutes of compiling at every start on 2 cores); "
        "auto: both built and timed at `slots` rows, the faster kept (cached per machine and model shape)",
        "auto",
    )
    checks: str = doc(
        "where a grammar-constrained row's per-token checks run: overlap — a worker thread beside the "
        "batch (the row sits out steps until its token is drawn); inline — the engine thread between "
        "steps (three checks in a row slower than a forward move its row to the worker); wait — the worker, the "
        "engine waiting up to one forward for it; auto — overlap where a core is left beside torch's "
        "intra-op threads (or off the CPU), else inline",
        "auto",
    )
    device: str = doc(DEVICE_HELP, "auto")

    def __post_init__(self) -> None:
        _check_device(self.device)
        _check(bool(self.runs), "runs", "give at least one run folder: runs=[runs/protein]")
        _check(
            self.checks in ("auto", "inline", "wait", "overlap"),
            "checks",
            f"must be auto, inline, wait or overlap, got {self.checks!r}",
        )
        _check(
            self.step in ("auto", "eager", "captured"),
            "step",
            f"must be auto, eager or captured, got {self.step!r}",
        )
        _check(
            not (self.step == "captured" and self.layout == "packed"),
            "layout",
            "step=captured takes layout=auto or linear: inductor cannot lower oneDNN's packed Linear",
        )
        _check(
            self.attention in ROWS_ATTENTION_SETTINGS,
            "attention",
            f"must be {', '.join(ROWS_ATTENTION_SETTINGS[:-1])} or {ROWS_ATTENTION_SETTINGS[-1]}, got {self.attention!r}",
        )
        _check(1 <= self.port <= 65535, "port", f"must be 1-65535, got {self.port}")
        for key in (
            "slots",
            "max_queue",
            "prefill_chunk",
            "max_tokens",
            "max_n",
            "max_body_bytes",
            "keep_files",
        ):
            _check(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        _check(self.request_timeout > 0, "request_timeout", f"must be > 0, got {self.request_timeout}")
        _check(self.drain_timeout >= 0, "drain_timeout", f"must be >= 0, got {self.drain_timeout}")
        _check(
            0 <= self.stream_interval <= 10, "stream_interval", f"must be 0-10 s, got {self.stream_interval}"
        )
        _check_decode(self.quantize, self.dtype, self.layout)


@dataclass
class DemoSchema:
    out: str = doc("samples are written under out/<domain>/", "outputs/demo")
    runs: str = doc("run folders are written under runs/<domain>/", "runs/demo")
    domains: list[str] = doc("the domains trained, one tiny model each", factory=list)
    train_overrides: dict[str, list[str]] = doc(
        "per domain: train overrides on top of conf/train.yaml", factory=dict, each="train overrides"
    )
    generate: dict[str, dict[str, Any]] = doc(
        "per domain: generate settings", factory=dict, each="a generate setting (multiar generate --help)"
    )


SCHEMAS: dict[str, type] = {
    "train": TrainSchema,
    "generate": GenerateSchema,
    "quantize": QuantizeSchema,
    "export": ExportSchema,
    "demo": DemoSchema,
    "eval": EvalSchema,
    "score": ScoreSchema,
    "serve": ServeSchema,
}


def _trainer_keys() -> set[str]:
    import inspect

    import lightning as L

    return set(inspect.signature(L.Trainer.__init__).parameters) - {"self"}


def _typed(schema: type, cfg: DictConfig) -> DictConfig:
    """cfg merged into the schema's structured config: types and unknown keys checked, or ConfigError."""
    try:
        # as a plain container: a config Hydra composed on the schema already carries its type, and
        # OmegaConf would take a key added with +key=value along with it instead of rejecting it
        return OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.to_container(cfg))
    except OmegaConfBaseException as err:
        raise config_error(err) from None


def config_error(err: OmegaConfBaseException) -> ConfigError:
    """OmegaConf's error as one ConfigError line that starts with the key."""
    key = getattr(err, "full_key", None)
    message = first_line(err)
    return ConfigError(f"{key}: {message}" if key and not message.startswith(str(key)) else message)


def validate(name: str, cfg: DictConfig) -> DictConfig:
    """cfg checked against the schema of command `name`: the typed DictConfig, or ConfigError.
    `device: auto` becomes the device it stands for, so later code gets a real one."""
    schema = SCHEMAS.get(name)
    if schema is None:
        return cfg
    typed = _typed(schema, cfg)
    try:
        OmegaConf.to_object(typed)  # runs the range checks in __post_init__
    except MissingMandatoryValue as err:
        raise ConfigError(f"{getattr(err, 'full_key', '') or 'a key'}: missing mandatory value") from None
    except OmegaConfBaseException as err:
        raise config_error(err) from None
    if name == "train":
        unknown = sorted(set(typed.trainer) - _trainer_keys())
        _check(not unknown, "trainer", f"unknown Lightning Trainer argument(s): {', '.join(unknown)}")
    if "device" in typed:
        typed.device = resolve_device(typed.device)
    return typed


def validate_update(typed: DictConfig, keys: dict[str, Any]) -> DictConfig:
    """keys merged onto `typed`, a config validate() returned: the same checks (types and unknown keys
    by the typed nodes, the range checks by __post_init__), a ConfigError, or the new typed config. At
    1.4 ms where validate takes 8 (no schema rebuilt, no second merge): the server plans every request
    this way, on a base checked once."""
    try:
        cfg = OmegaConf.merge(typed, keys)
        OmegaConf.to_object(cfg)
    except MissingMandatoryValue as err:
        raise ConfigError(f"{getattr(err, 'full_key', '') or 'a key'}: missing mandatory value") from None
    except OmegaConfBaseException as err:
        raise config_error(err) from None
    if "device" in keys:
        cfg.device = resolve_device(cfg.device)
    return cfg


def describe(name: str, cfg: DictConfig) -> list[tuple[str, Any, str]]:
    """(key, value, help) for every key of command `name`'s config, the help from the schema's fields;
    types are checked, mandatory values may still be missing (???)."""
    schema = SCHEMAS[name]
    values = OmegaConf.to_container(_typed(schema, cfg), resolve=True, throw_on_missing=False)
    rows: list[tuple[str, Any, str]] = []

    def walk(node: dict[str, Any], schema: type, prefix: str) -> None:
        hints, docs = get_type_hints(schema), {f.name: f.metadata for f in fields(schema)}
        for key, value in node.items():
            meta, kind = docs[key], hints[key]
            if is_dataclass(kind) and isinstance(value, dict):
                walk(value, kind, f"{prefix}{key}.")
            elif isinstance(value, dict) and value and meta["each"]:
                rows.extend((f"{prefix}{key}.{k}", v, _entry_help(meta, k)) for k, v in _leaves(value))
            else:
                rows.append((f"{prefix}{key}", value, meta["help"]))

    walk(values, schema, "")
    return rows


def _entry_help(meta: Any, key: str) -> str:
    """The help of one entry of a free-form dict field: its own text where `each` names it."""
    each = meta["each"]
    return each if isinstance(each, str) else each.get(key.split(".")[0], meta["help"])


def _leaves(node: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """A nested dict's leaves as (dotted key, value)."""
    out: list[tuple[str, Any]] = []
    for key, value in node.items():
        if isinstance(value, dict) and value:
            out += _leaves(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out
