"""`multiar generate`: load a run, sample with the KV-cache decoder, decode and write the domain's files."""

from __future__ import annotations

import json
import logging
import math
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from multiar.commands.conditioning import Conditions, conditions
from multiar.config import config_dir
from multiar.domain import (
    Assessed,
    Domain,
    PromptMeta,
    Renderable,
    StopRules,
    TokenErrors,
    Validity,
    WindowStarts,
    domain_state_digest,
)
from multiar.engine.decode import compile_for_sampling, stream, window_tail
from multiar.engine.model import GPT
from multiar.engine.packed import decode_layout
from multiar.engine.precision import bf16_is_fast
from multiar.engine.quantize import load_quantized, quantize
from multiar.engine.sampling import ban_tokens, repetition_penalty
from multiar.engine.scoring import document_nats
from multiar.engine.speculative import SpeculativeStats, speculative_generate
from multiar.errors import ConfigError
from multiar.files import write_new_text
from multiar.run_folder import Run, load_run
from multiar.schema import validate
from multiar.tags import Tagged

log = logging.getLogger("multiar")


def fit_prompt(
    prompt: list[int], block_size: int, max_new_tokens: int, starts: Sequence[bool] | None = None
) -> list[int]:
    """The prompt (BOS + ids) as given when it fits before max_new_tokens in block_size; else its end,
    cut as a training window after a document's first is: no BOS, and (starts: per id, the domain's
    window_starts) beginning at such an id (music: a bar line, never inside a note's tokens). Past
    block_size // 2 new tokens the window slides anyway, so the prompt keeps at least half the block."""
    room = block_size - min(max_new_tokens, block_size // 2)  # prompt tokens that fit
    if room < 2:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in block_size={block_size}"
        )
    if len(prompt) <= room:
        return prompt
    # the end of a long prompt: the continuation depends most on what comes just before it
    tail = window_tail(prompt, room, starts)
    if starts is not None and not (0 <= tail[0] < len(starts) and starts[tail[0]]):
        raise ValueError(
            f"prompt: no bar line in its last {room} tokens to cut it at (a bar longer than the room"
            " the model's block leaves): use fewer max_new_tokens or prompt_bars=N"
        )
    log.warning(
        "prompt of %d tokens: the model continues its last %d (block_size %d); files with the prompt"
        " (include_prompt) hold all of it",
        len(prompt) - 1,
        len(tail),
        block_size,
    )
    return tail


def read_prompt_file(path: str | Path) -> list[str]:
    """Prompts, one per line (blank lines skipped); ConfigError naming the file when it can't be read."""
    path = Path(path).expanduser()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"prompt_file: {path}: {getattr(err, 'strerror', None) or err}") from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise ConfigError(f"prompt_file: {path}: holds no prompt")
    return prompts


_ESCAPE = re.compile(r"\\(u[0-9a-fA-F]{4}|u|[ntr\\])")
_ESCAPED = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def stop_text(text: str) -> str:
    r"""cfg.stop as the text it stands for: \n, \t, \r, \\ and \uXXXX are read as escapes (a command
    line cannot hold a newline); any other backslash, and every other character, stays as typed.
    Prompts are never unescaped."""

    def escape(match: re.Match) -> str:
        code = match.group(1)
        if code == "u":
            raise ConfigError(f"stop: {text!r}: \\u needs four hex digits (like \\u000a)")
        return chr(int(code[1:], 16)) if code.startswith("u") else _ESCAPED[code]

    return _ESCAPE.sub(escape, text)


def stop_sequences(cfg: DictConfig, domain: Domain) -> list[list[int]]:
    """Token-id stop sequences: cfg.stop_ids as given, and cfg.stop's text (escapes read) encoded by
    the domain."""
    stops = [list(s) for s in cfg.stop_ids]
    if cfg.stop is not None:
        text = stop_text(cfg.stop)
        try:
            ids = domain.prompt_ids(text)[1:]  # without BOS
        except (ValueError, OSError) as err:
            raise ConfigError(f"stop: the {domain.name} domain cannot encode {text!r} ({err})") from None
        stops.append(ids)
    return stops


def cut_at_stop(artifact: Any, stop: str | None, start: int = 0) -> Any:
    """A text artifact ends before the first stop text at or after start (the end of the prompt), even
    where the tokens that spelled it differ from the stop's own tokens."""
    if stop and isinstance(artifact, str) and (at := artifact.find(stop, start)) >= 0:
        return artifact[:at]
    return artifact


def sampling_model(run: Run, mode: str | None, dtype: str, compile: bool = False) -> GPT:
    """The run's model as sampling should use it: int8 or int4 weights (the run's stored copy when it matches,
    else converted now), or bf16 where asked or where the hardware runs it fast, else fp32; float
    weights on a CPU packed for oneDNN (about 2x nn.Linear's mat-vec speed: benchmarks/README.md), or
    compiled, where inductor packs them itself."""
    model = run.model
    if mode is not None:
        source = run.path / "model.safetensors"
        model = load_quantized(model, run.path, source, mode) or quantize(model, mode)
        return compile_for_sampling(model) if compile else model
    device = model.wte.weight.device
    if dtype == "bf16" or (dtype == "auto" and bf16_is_fast(device)[0]):
        model = model.to(torch.bfloat16)
    return compile_for_sampling(model) if compile else decode_layout(model)


def same_tokenizer(a: Domain, b: Domain) -> bool:
    """Whether two domains map text to the same ids: equal tokenizer files, whatever the pieces each
    was trained on, or for a fixed vocabulary (no trained tokenizer, like protein's alphabet) equal
    size and special ids."""
    tags = [d.tags if isinstance(d, Tagged) else None for d in (a, b)]
    if tags[0] != tags[1] or a.tokenizer_files != b.tokenizer_files:  # control tags are ids too
        return False
    if not a.tokenizer_files:
        return (a.vocab_size, a.pad_id, a.bos_id, a.eos_id) == (b.vocab_size, b.pad_id, b.bos_id, b.eos_id)
    # the tokenizer's files alone: the rest of the saved state is about the training data
    return domain_state_digest(a, a.tokenizer_files) == domain_state_digest(b, b.tokenizer_files)


def load_draft(cfg: DictConfig, run: Run) -> GPT | str | None:
    """The speculative draft: "ngram", or a run whose domain and tokenizer are exactly the target's."""
    if cfg.draft is None or cfg.draft == "ngram":
        return cfg.draft
    draft = load_run(cfg.draft, device=cfg.device)
    if draft.domain.name != run.domain.name:
        raise ConfigError(f"draft: {cfg.draft} is a {draft.domain.name} run; the target is {run.domain.name}")
    if not same_tokenizer(draft.domain, run.domain):
        raise ConfigError(
            f"draft: {cfg.draft} has another tokenizer than {cfg.run}: train it on the same one"
        )
    return sampling_model(draft, cfg.quantize, cfg.dtype, cfg.compile)


def stop_rule(cfg: DictConfig, domain: Domain) -> Callable[[str, int, bool], int | None] | None:
    """The domain's rule for cfg.stop_at (where a sample's text ends), or None; ConfigError when the
    domain has no such rule."""
    if cfg.stop_at is None:
        return None
    if not isinstance(domain, StopRules):
        raise ConfigError(f"stop_at: the {domain.name} domain has no stopping rules")
    try:
        return domain.stop_rule(cfg.stop_at)
    except ValueError as err:  # an unknown rule's name; any other error is a bug in the domain's rule
        raise ConfigError(f"stop_at: {err}") from None


def row_stopper(domain: Domain, rule: Callable, prompts: list[list[int]]) -> Callable[[int, list[int]], bool]:
    """should_stop for `stream`: a row ends once the rule finds its end in the decoded text of its
    prompt (ids without BOS) and new ids."""
    before = [len(domain.decode(p)[0]) for p in prompts]

    def should_stop(row: int, ids: list[int]) -> bool:
        return rule(domain.decode(prompts[row] + ids)[0], before[row], False) is not None

    return should_stop


def redraw_invalid(
    cfg: DictConfig,
    model: GPT,
    domain: Domain,
    rows: list[list[int]],
    writer: SampleWriter,
    max_new_tokens: int,
    rule: Callable | None,
    settings: dict,
) -> dict[str, int]:
    """Draw again every sample the domain judges invalid (code: does not parse), up to
    cfg.resample_invalid times each; how many draws that took and how many stay invalid."""
    redrawn = 0
    for _ in range(cfg.resample_invalid):
        bad = [i for i, artifact in enumerate(writer.artifacts) if not domain.valid(artifact)]
        for start in range(0, len(bad), cfg.batch_size):
            chunk = bad[start : start + cfg.batch_size]
            batch = [rows[i] for i in chunk]
            buffers: list[list[int]] = [[] for _ in chunk]
            heads = [writer.prompts[i] for i in chunk]
            ended = row_stopper(domain, rule, heads) if rule is not None else None
            for event in stream(model, batch, max_new_tokens, should_stop=ended, **settings):
                if event.token is not None:
                    buffers[event.row].append(event.token)
                else:
                    writer.replace(chunk[event.row], buffers[event.row], event.end)
                    redrawn += 1
    invalid = sum(not domain.valid(a) for a in writer.artifacts)
    return {"resampled": redrawn, "invalid_after_resampling": invalid}


def rank_samples(details: list[dict], top: int | None) -> list[int]:
    """Indices of the samples that pass the domain's filters (all, where it has none), lowest
    perplexity first, at most top; each gets its 1-based `rank` in details."""
    eligible = [i for i, d in enumerate(details) if d.get("passes", True)]
    order = sorted(eligible, key=lambda i: details[i]["ppl"])[: top or len(eligible)]
    for rank, i in enumerate(order, start=1):
        details[i]["rank"] = rank
    return order


class SampleWriter:
    """Decodes each finished sample and writes it at once, in sample order (a sample waits only for
    those before it), so an interrupted run keeps every sample that was complete."""

    def __init__(
        self,
        domain: Domain,
        out_dir: Path,
        provenance: dict,
        overwrite: bool,
        include_prompt: bool,
        stop: str | None,
        rows: list[list[int]],
        conditions: Conditions | None = None,
        stop_rule: Callable[[str, int, bool], int | None] | None = None,
        prompts: list[list[int]] | None = None,
        metas: list[Any] | None = None,
    ) -> None:
        """rows: what the model continues (BOS, tags, prompt; or a long prompt's tail alone); prompts:
        each row's whole prompt without BOS, as the files hold it (default: the row's ids after BOS);
        metas: per row, what the domain carries from its prompt into the file (prompt_meta)."""
        self.domain, self.out_dir, self.provenance, self.overwrite = domain, out_dir, provenance, overwrite
        self.rows = rows
        self.prompts = prompts if prompts is not None else [p[1:] for p in rows]
        self.heads = [p if include_prompt else [] for p in self.prompts]  # what a file holds before a sample
        self.include_prompt = include_prompt
        self.metas = metas
        self.stop_rule = stop_rule  # where a text artifact ends (code's stop_at=block), or None
        self.stop = stop
        self.conditions = conditions or Conditions(rows, caps=[None] * len(rows))
        self.pending: dict[int, tuple[list[int], str | None]] = {}
        self.new_ids: list[list[int]] = []
        self.details: list[dict] = []  # per sample: how it ended, its tags and kept positions
        self.middles: list[Any] = []  # fill-in-the-middle: each sample's middle alone
        self.written: set[int] = set()
        self.decoded: list[tuple[Any, int]] = []
        self.artifacts: list[Any] = []
        self.paths: list[Path] = []

    @property
    def done(self) -> int:
        return len(self.artifacts)

    @property
    def annotated(self) -> bool:
        """Whether the domain writes per-sample details (protein's FASTA descriptions, samples.csv)."""
        return isinstance(self.domain, Assessed)

    def scores(self, model: GPT, batch_size: int) -> list[float]:
        """Each sample's perplexity per token under the model: its sampled ids (EOS included when it
        ended there) given everything the model was given before them (its row: BOS, tags, prompt),
        whether or not the files hold the prompt."""
        ended = [d.get("end") == "eos" for d in self.details]
        nats = [0.0] * len(self.rows)
        # document_nats puts one first id before each row's prefix: BOS, or a cut prompt's first id
        for first in {r[0] for r in self.rows}:
            group = [i for i, r in enumerate(self.rows) if r[0] == first]
            scored = document_nats(
                model,
                [self.new_ids[i] for i in group],
                first,
                self.domain.eos_id,
                batch_size,
                [self.rows[i][1:] for i in group],
                [ended[i] for i in group],
            )
            for i, n in zip(group, scored, strict=True):
                nats[i] = n
        return [math.exp(n / max(len(d) + e, 1)) for n, d, e in zip(nats, self.new_ids, ended, strict=True)]

    def finish(self, index: int, ids: list[int], end: str | None = None) -> None:
        self.pending[index] = (ids, end)
        while self.done in self.pending:
            i = self.done
            ids, end = self.pending.pop(i)
            self.new_ids.append([])
            self.decoded.append((None, 0))
            self.artifacts.append(None)
            self.details.append({})
            if self.conditions.infill is not None:
                self.middles.append(None)
            self.replace(i, ids, end)

    def replace(self, i: int, ids: list[int], end: str | None) -> None:
        """Decode sample i from its new ids and write it (again, for a re-drawn sample)."""
        cap = self.conditions.caps[i]
        if cap is not None and len(ids) >= cap:  # reached max_len: cut there, no EOS forced
            ids, end = ids[:cap], "max_len"
        head, ids_out = self.heads[i], ids
        if self.conditions.infill is not None:  # the file around the gap: prefix + middle + suffix
            self.middles[i] = self.domain.decode(ids)[0]
            prefix, suffix = self.conditions.infill
            head, ids_out = prefix, ids + suffix
        artifact, dropped = self.domain.decode(head + ids_out)
        if self.metas is not None:  # what the file keeps from its own prompt (music: tempos)
            artifact = self.domain.with_prompt_meta(artifact, self.metas[i], whole=self.include_prompt)
        prompt_text = self.domain.decode(head)[0] if isinstance(artifact, str) else None
        artifact = cut_at_stop(artifact, self.stop, len(prompt_text) if prompt_text is not None else 0)
        if self.stop_rule is not None:  # the rule sees the prompt even when it is not written
            full, before = (
                self.domain.decode(self.prompts[i] + ids)[0],
                self.domain.decode(self.prompts[i])[0],
            )
            cut = self.stop_rule(full, len(before), True)
            full = full[:cut] if cut is not None else full
            artifact = full if head else full[len(before) :]
        self.new_ids[i], self.decoded[i], self.artifacts[i] = ids, (artifact, dropped), artifact
        details = {"end": end, "tags": self.conditions.tags, "kept": self.conditions.kept}
        self.details[i] = {k: v for k, v in details.items() if v}
        extra = {"details": self.details[i : i + 1]} if self.annotated else {}
        overwrite = self.overwrite or i in self.written  # a re-drawn sample replaces its own file
        for p in self.domain.write([artifact], self.out_dir, self.provenance, overwrite, start=i, **extra):
            if p not in self.paths:
                self.paths.append(p)
        self.written.add(i)


def check_filters(cfg: DictConfig, domain: Domain) -> None:
    """ConfigError, before any sampling, for a filters.* key the domain does not know (its
    `filter_keys`), or any filter set (a value other than the default) for a domain without filters."""
    known = tuple(domain.filter_keys) if isinstance(domain, Assessed) else ()
    if known:
        unknown = [k for k in cfg.filters if k not in known]
        if unknown:
            raise ConfigError(f"filters.{unknown[0]}: no such filter; known: {', '.join(known)}")
        return
    # what filters hold when the user sets none; read without Hydra, which a multirun job already holds
    defaults = OmegaConf.load(config_dir() / "generate.yaml").filters
    given = [k for k, v in cfg.filters.items() if k not in defaults or defaults[k] != v]
    if given:
        raise ConfigError(f"filters.{given[0]}: the {domain.name} domain has no sample filters")


def check_before_sampling(cfg: DictConfig, domain: Domain, out_dir: Path) -> None:
    """ConfigError or FileExistsError, before any sampling, for a key the domain cannot honour (render,
    resample_invalid) or an output folder that already holds a run's report (overwrite=false)."""
    if cfg.render is not None and not isinstance(domain, Renderable):
        raise ConfigError(f"render: the {domain.name} domain has nothing to render (music only)")
    if cfg.resample_invalid and not isinstance(domain, Validity):
        raise ConfigError(f"resample_invalid: the {domain.name} domain has no validity check")
    if (out_dir / "generate.json").exists() and not cfg.overwrite:
        raise FileExistsError(
            f"{out_dir / 'generate.json'}: already exists (pass overwrite=true to replace it)"
        )


def domain_options(cfg: DictConfig, domain: Domain) -> dict[str, Any]:
    """The domain's own generate options that cfg sets (cfg.options.NAME; the CLI also takes a declared
    option as a top-level key, `prompt_bars=2`), checked against its `generate_options`: ConfigError,
    before any sampling, for an option the domain does not declare or a value of another type."""
    declared = domain.generate_options
    given = dict(cfg.get("options") or {})
    options = {}
    for key, value in given.items():
        where = f"options.{key}"
        if key not in declared:
            known = f"; it has {', '.join(declared)}" if declared else ""
            raise ConfigError(f"{where}: the {domain.name} domain has no such generate option{known}")
        kind = declared[key].type
        if value is None:
            continue
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise ConfigError(f"{where}: expected {kind.__name__}, got {value!r} ({declared[key].help})")
        least = declared[key].minimum
        if least is not None and value < least:
            raise ConfigError(f"{where}: must be >= {least}, got {value!r}")
        options[key] = value
    return options


def render_files(cfg: DictConfig, domain: Domain, paths: list[Path]) -> dict[str, Any]:
    """render=wav: a WAV beside each written .mid; when the tools are missing, one line says which and
    the MIDI files stay (report key `render`)."""
    done: list[Path] = []
    try:
        for p in [p for p in paths if p.suffix == ".mid"]:
            done.append(domain.render(p, p.with_suffix(".wav"), cfg.soundfont, overwrite=cfg.overwrite))
    except (RuntimeError, OSError) as err:
        log.warning("render=wav: %s", err)
        return {"files": done, "render": f"skipped: {err}"}
    return {"files": done, "render": f"{len(done)} wav file(s)"}


@dataclass
class Prepared:
    """What sampling needs once every check has passed: the model, its rows and settings, the writer."""

    cfg: DictConfig
    domain: Domain
    model: GPT
    out_dir: Path
    prompts: list[list[int]]  # per prompt, as the model continues it (fit_prompt)
    rows: list[list[int]]  # per sample: what the model continues
    heads: list[list[int]]  # per sample: its whole prompt, as the files hold it
    cond: Conditions
    settings: dict[str, Any]
    streaming: dict[str, Any]  # settings plus window_starts, for stream
    draft: GPT | str | None
    rule: Callable[[str, int, bool], int | None] | None
    provenance: dict[str, Any]
    writer: SampleWriter


@dataclass
class Finished:
    """What the steps after sampling add to the report: the files, ranking and extra metrics."""

    paths: list[Path]
    ranked: list[int]
    extra_metrics: dict[str, Any]
    redrawn: dict[str, int]
    rendered: dict[str, Any]


def sampling_settings(
    cfg: DictConfig, run: Run, domain: Domain, cond: Conditions
) -> tuple[dict[str, Any], GPT | str | None]:
    """The keyword settings every decoder call gets (processors, stops, generator) and the draft."""
    stops = stop_sequences(cfg, domain)
    processors = [ban_tokens([domain.pad_id, domain.bos_id])]
    if cfg.constrain and (constraint := domain.constraint()) is not None:
        processors.append(constraint)
    elif isinstance(domain, Tagged):  # unconstrained, tags are still never sampled
        processors.append(ban_tokens(range(domain.first_tag_id, domain.vocab_size)))
    processors += cond.processors  # length window, then forced positions: they have the last word
    generator = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
    draft = load_draft(cfg, run)
    if cfg.repetition_penalty != 1.0:
        processors.insert(0, repetition_penalty(cfg.repetition_penalty, cfg.repetition_window))
    settings = dict(
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        min_p=cfg.min_p,
        eos_id=domain.eos_id,
        stop=stops,
        min_new_tokens=cfg.min_new_tokens,
        processors=processors,
        generator=generator,
    )
    return settings, draft


def provenance_for(cfg: DictConfig, run: Run, cond: Conditions, options: dict[str, Any]) -> dict[str, Any]:
    """What every written file records about how it was sampled, in a fixed key order."""
    provenance = {
        "run": str(run.path),
        "seed": cfg.seed,
        "temperature": cfg.temperature,
        "top_k": cfg.top_k,
        "top_p": cfg.top_p,
        "max_new_tokens": cond.max_new_tokens,
    }
    for key, off in (
        ("min_p", 0.0),
        ("repetition_penalty", 1.0),
        ("quantize", None),
        ("draft", None),
        ("min_len", None),
        ("max_len", None),
        ("constrain", True),
    ):
        if cfg[key] != off:  # settings that are on go into every file's provenance
            provenance[key] = cfg[key]
    provenance.update(options)  # the domain's own options that are set (music: prompt_bars)
    return provenance


def prepare_sampling(cfg: DictConfig) -> Prepared:
    """Load the run and prompts and run every check, all before any sampling; the writer to fill."""
    cfg = validate("generate", cfg)
    run = load_run(cfg.run, device=cfg.device)
    texts = read_prompt_file(cfg.prompt_file) if cfg.prompt_file else [cfg.prompt]
    model, domain = sampling_model(run, cfg.quantize, cfg.dtype, cfg.compile), run.domain
    out_dir = Path(cfg.out if cfg.out else Path("outputs") / domain.name).expanduser()
    options = domain_options(cfg, domain)  # passed by name to prompt_ids and prompt_meta
    check_filters(cfg, domain)
    check_before_sampling(cfg, domain, out_dir)
    starts = domain.window_starts if isinstance(domain, WindowStarts) else None
    whole = [domain.prompt_ids(t, **options) for t in texts]
    prompts = [fit_prompt(p, model.config.block_size, cfg.max_new_tokens, starts) for p in whole]
    # what each sample keeps from its own prompt beyond the tokens (music: tempos), per prompt
    metas = [domain.prompt_meta(t, **options) for t in texts] if isinstance(domain, PromptMeta) else None
    cond = conditions(cfg, domain, prompts)
    settings, draft = sampling_settings(cfg, run, domain, cond)
    rows = [p for p in cond.rows for _ in range(cfg.n)]  # n samples of each prompt, in prompt order
    heads = [p[1:] for p in whole for _ in range(cfg.n)]  # each row's whole prompt, as the files hold it
    cond.caps = [c for c in cond.caps for _ in range(cfg.n)]
    provenance = provenance_for(cfg, run, cond, options)
    rule = stop_rule(cfg, domain)
    stop = stop_text(cfg.stop) if cfg.stop is not None else None
    writer = SampleWriter(
        domain,
        out_dir,
        provenance,
        cfg.overwrite,
        cfg.include_prompt,
        stop,
        rows,
        cond,
        rule,
        prompts=None if cond.infill is not None else heads,
        metas=[m for m in metas for _ in range(cfg.n)] if metas is not None else None,
    )
    # past block_size the window slides to a tail that starts where a training window could
    streaming = dict(settings, window_starts=starts)
    return Prepared(
        cfg=cfg,
        domain=domain,
        model=model,
        out_dir=out_dir,
        prompts=prompts,
        rows=rows,
        heads=heads,
        cond=cond,
        settings=settings,
        streaming=streaming,
        draft=draft,
        rule=rule,
        provenance=provenance,
        writer=writer,
    )


def sample_batches(p: Prepared) -> SpeculativeStats:
    """Sample every row, batch by batch, handing each finished sample to the writer at once."""
    cfg, rows, writer = p.cfg, p.rows, p.writer
    spec = SpeculativeStats()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:.0f} tok/s"),
        TimeElapsedColumn(),
        disable=not sys.stderr.isatty(),
        transient=True,
    ) as bar:
        task = bar.add_task(f"{p.domain.name} samples", total=len(rows), rate=0.0)
        started, tokens = time.perf_counter(), 0
        for start in range(0, len(rows), cfg.batch_size):
            batch = rows[start : start + cfg.batch_size]
            if p.draft is not None:
                out, stats = speculative_generate(
                    p.model,
                    batch,
                    p.cond.max_new_tokens,
                    draft=p.draft,
                    k=cfg.speculate_k,
                    ngram=cfg.ngram,
                    **p.settings,
                )
                spec.merge(stats)
                for i, (ids, end) in enumerate(zip(out, stats.ends, strict=True)):
                    writer.finish(start + i, ids, end)
                tokens += sum(map(len, out))
                bar.update(task, completed=writer.done, rate=tokens / (time.perf_counter() - started))
                continue
            buffers: list[list[int]] = [[] for _ in batch]
            heads = p.heads[start : start + len(batch)]
            ended = row_stopper(p.domain, p.rule, heads) if p.rule is not None else None
            for event in stream(p.model, batch, p.cond.max_new_tokens, should_stop=ended, **p.streaming):
                if event.token is not None:
                    buffers[event.row].append(event.token)
                    tokens += 1
                    continue
                # on disk as soon as it is complete
                writer.finish(start + event.row, buffers[event.row], event.end)
                bar.update(task, completed=writer.done, rate=tokens / (time.perf_counter() - started))
    return spec


def finish_samples(p: Prepared) -> Finished:
    """After sampling: redraws, scores, the domain's assessment, ranking, report files, token errors
    and renders, in that order (each may rewrite files the one before wrote)."""
    cfg, domain, writer, provenance = p.cfg, p.domain, p.writer, p.provenance
    redrawn = (
        redraw_invalid(cfg, p.model, domain, p.rows, writer, p.cond.max_new_tokens, p.rule, p.streaming)
        if cfg.resample_invalid
        else {}
    )
    artifacts, paths, details = writer.artifacts, writer.paths, writer.details
    for d, ppl in zip(details, writer.scores(p.model, cfg.batch_size), strict=True):
        d["ppl"] = round(ppl, 3)
    extra_metrics = (
        domain.assess(artifacts, details, dict(cfg.filters)) if isinstance(domain, Assessed) else {}
    )
    ranked = rank_samples(details, cfg.top) if cfg.rank_by == "ppl" else []
    if writer.annotated:  # the files again, now with every sample's score, novelty and filters
        paths = domain.write(artifacts, p.out_dir, provenance, overwrite=True, details=details)
        paths += domain.report(artifacts, details, p.out_dir, overwrite=True, provenance=provenance)
    if ranked:
        best = [artifacts[i] for i in ranked]
        extra = {"details": [details[i] for i in ranked]} if writer.annotated else {}
        paths += domain.write(best, p.out_dir / "top", provenance, overwrite=cfg.overwrite, **extra)
    if isinstance(domain, TokenErrors):  # miditok's tokens_errors over the sampled tokens, prompt as context
        errors = sum(
            max(domain.token_errors(h + ids) - domain.token_errors(h), 0)
            for h, ids in zip(writer.prompts, writer.new_ids, strict=True)
        )
        extra_metrics[f"{domain.name}/token_error_rate"] = errors / max(sum(map(len, writer.new_ids)), 1)
    rendered = render_files(cfg, domain, paths) if cfg.render else {}
    paths += rendered.pop("files", [])
    return Finished(paths, ranked, extra_metrics, redrawn, rendered)


def build_report(p: Prepared, done: Finished, spec: SpeculativeStats) -> dict[str, Any]:
    """The report generate.json holds and sample_to_files returns, keys in a fixed order."""
    cfg, domain, writer, cond = p.cfg, p.domain, p.writer, p.cond
    new_ids, decoded, artifacts, details = writer.new_ids, writer.decoded, writer.artifacts, writer.details
    return {
        "domain": domain.name,
        "files": [str(f) for f in done.paths],
        "samples": len(artifacts),
        "prompt": cfg.prompt,
        "prompts": len(p.prompts),
        "provenance": p.provenance,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),  # the only time stamp written
        **(
            {"speculative": spec.as_dict() | {"draft": cfg.draft, "k": cfg.speculate_k}}
            if p.draft is not None
            else {}
        ),
        "metrics": {
            f"{domain.name}/new_tokens_mean": sum(map(len, new_ids)) / max(len(new_ids), 1),
            f"{domain.name}/dropped_tokens": sum(d for _, d in decoded),
            f"{domain.name}/eos_rate": sum(d.get("end") == "eos" for d in details) / max(len(details), 1),
            f"{domain.name}/ppl_median": statistics.median(d["ppl"] for d in details) if details else 0.0,
            **domain.metrics(artifacts),
            **done.extra_metrics,
        },
        **({"ranked": len(done.ranked), "rank_by": cfg.rank_by} if cfg.rank_by else {}),
        **({"tags": cond.tags} if cond.tags else {}),
        **({"kept": cond.kept} if cond.kept else {}),
        **done.redrawn,
        **done.rendered,
        **({"middles": writer.middles} if writer.middles and isinstance(writer.middles[0], str) else {}),
    }


def sample_to_files(cfg: DictConfig) -> dict[str, Any]:
    """Sample cfg.n continuations of each prompt (cfg.prompt, or every line of cfg.prompt_file) from
    run cfg.run; write files; return a report."""
    p = prepare_sampling(cfg)  # every check before the first token is sampled
    spec = sample_batches(p)
    done = finish_samples(p)
    report = build_report(p, done, spec)
    cfg = p.cfg  # validated: defaults filled in
    write_new_text(p.out_dir / "generate.json", json.dumps(report, indent=1) + "\n", overwrite=cfg.overwrite)
    print(
        f"{p.domain.name}: wrote {len(done.paths)} file(s) for {len(p.writer.artifacts)} samples to {p.out_dir}"
    )
    for key, value in report["metrics"].items():
        print(f"  {key} = {value:.4g}")
    return report
