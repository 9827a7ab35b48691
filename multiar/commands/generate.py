"""`multiar generate`: load a run, sample with the KV-cache decoder, decode and write the domain's files."""

from __future__ import annotations

import heapq
import json
import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from multiar.commands import resume
from multiar.commands.conditioning import Conditions, conditions
from multiar.commands.progress import Progress
from multiar.config import config_dir
from multiar.domain import (
    Assessed,
    Domain,
    MetricSummary,
    PromptMeta,
    Renderable,
    SampleFiles,
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
from multiar.files import Appender, write_new_text
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
    if (out_dir / "generate.json").exists() and cfg.resume:
        raise ConfigError(f"resume: {out_dir} holds a finished run (generate.json): nothing to resume")
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
class Work:
    """The samples to draw, as a function of their index (nothing is built per sample): sample i
    continues prompt i // n."""

    rows: list[list[int]]  # per prompt: what the model continues (BOS, tags, prompt; or a long one's tail)
    heads: list[list[int]]  # per prompt: its whole prompt without BOS, as the files hold it
    prompts: list[list[int]]  # per prompt: what stop rules and token errors see before the sample
    caps: list[int | None]  # per prompt: most new tokens to keep (max_len)
    metas: list[Any] | None  # per prompt: what the domain carries from it into the file (prompt_meta)
    n: int

    @property
    def total(self) -> int:
        return len(self.rows) * self.n

    def batches(self, start: int, size: int) -> Iterator[range]:
        """The queue of work from sample start on, batch by batch: an iterator, however large n is."""
        for first in range(start, self.total, size):
            yield range(first, min(first + size, self.total))


@dataclass
class Sample:
    """One finished sample: its new ids, why it ended, what the files hold, what decoding dropped."""

    ids: list[int]
    end: str | None
    artifact: Any
    dropped: int
    middle: Any = None


def decode_sample(p: Prepared, i: int, ids: list[int], end: str | None) -> Sample:
    """Sample i as its files hold it: cut at its length cap, around a fill-in-the-middle gap, with its
    prompt's meta, cut at the stop text and at the domain's stop rule."""
    work, domain, k = p.work, p.domain, i // p.work.n
    cap = work.caps[k]
    if cap is not None and len(ids) >= cap:  # reached max_len: cut there, no EOS forced
        ids, end = ids[:cap], "max_len"
    head, ids_out, middle = (work.heads[k] if p.cfg.include_prompt else []), ids, None
    if p.cond.infill is not None:  # the file around the gap: prefix + middle + suffix
        middle = domain.decode(ids)[0]
        prefix, suffix = p.cond.infill
        head, ids_out = prefix, ids + suffix
    artifact, dropped = domain.decode(head + ids_out)
    if work.metas is not None:  # what the file keeps from its own prompt (music: tempos)
        artifact = domain.with_prompt_meta(artifact, work.metas[k], whole=p.cfg.include_prompt)
    prompt_text = domain.decode(head)[0] if isinstance(artifact, str) else None
    artifact = cut_at_stop(artifact, p.stop, len(prompt_text) if prompt_text is not None else 0)
    if p.rule is not None:  # the rule sees the prompt even when it is not written
        full, before = domain.decode(work.prompts[k] + ids)[0], domain.decode(work.prompts[k])[0]
        cut = p.rule(full, len(before), True)
        full = full[:cut] if cut is not None else full
        end = p.cfg.stop_at if end == "stop" and cut is not None else end  # e.g. "block": the rule ended it
        artifact = full if head else full[len(before) :]
    return Sample(ids, end, artifact, dropped, middle)


def draw(p: Prepared, indices: Sequence[int], attempt: int = 0) -> list[tuple[list[int], str | None]]:
    """New ids and end reason of each sample index, drawn together as one batch with the generator
    of (seed, first index, attempt): the same samples whatever ran before."""
    work, cfg = p.work, p.cfg
    rows = [work.rows[i // work.n] for i in indices]
    generator = torch.Generator(device=p.device).manual_seed(resume.batch_seed(cfg.seed, indices[0], attempt))
    if p.draft is not None and attempt == 0:
        out, stats = speculative_generate(
            p.model, rows, p.cond.max_new_tokens, draft=p.draft, k=cfg.speculate_k, ngram=cfg.ngram,
            **dict(p.settings, generator=generator),
        )  # fmt: skip
        p.tally.spec.merge(stats)
        return list(zip(out, stats.ends, strict=True))
    buffers: list[list[int]] = [[] for _ in rows]
    ends: list[str | None] = [None] * len(rows)
    heads = [work.prompts[i // work.n] for i in indices]
    ended = row_stopper(p.domain, p.rule, heads) if p.rule is not None else None
    settings, finished = dict(p.streaming, generator=generator), 0
    for event in stream(p.model, rows, p.cond.max_new_tokens, should_stop=ended, **settings):
        if event.token is not None:
            buffers[event.row].append(event.token)
        else:
            ends[event.row], finished = event.end, finished + 1
            p.progress.update(p.tally.done + finished, p.tally.tokens)
    p.tally.tokens += sum(map(len, buffers))
    return list(zip(buffers, ends, strict=True))


def redraw_invalid(p: Prepared, batch: range, samples: list[Sample]) -> None:
    """Draw again every sample of the batch the domain judges invalid (code: does not parse), up to
    cfg.resample_invalid times each (counted in the tally)."""
    assert isinstance(p.domain, Validity)
    for attempt in range(1, p.cfg.resample_invalid + 1):
        bad = [j for j, s in enumerate(samples) if not p.domain.valid(s.artifact)]
        if not bad:
            break
        for j, (ids, end) in zip(bad, draw(p, [batch[j] for j in bad], attempt), strict=True):
            samples[j] = decode_sample(p, batch[j], ids, end)
        p.tally.redrawn += len(bad)
    p.tally.invalid += sum(not p.domain.valid(s.artifact) for s in samples)


def batch_ppl(p: Prepared, batch: range, samples: list[Sample]) -> list[float]:
    """Each sample's perplexity per token under the model: its sampled ids (EOS included when it ended
    there) given everything the model was given before them (its row: BOS, tags, prompt), whether or
    not the files hold the prompt."""
    rows = [p.work.rows[i // p.work.n] for i in batch]
    ended = [s.end == "eos" for s in samples]
    nats = [0.0] * len(samples)
    # document_nats puts one first id before each row's prefix: BOS, or a cut prompt's first id
    for first in {r[0] for r in rows}:
        group = [j for j, r in enumerate(rows) if r[0] == first]
        scored = document_nats(
            p.model,
            [samples[j].ids for j in group],
            first,
            p.domain.eos_id,
            p.cfg.batch_size,
            [rows[j][1:] for j in group],
            [ended[j] for j in group],
        )
        for j, n in zip(group, scored, strict=True):
            nats[j] = n
    return [math.exp(n / max(len(s.ids) + e, 1)) for n, s, e in zip(nats, samples, ended, strict=True)]


@dataclass
class Tally:
    """What generate accumulates over the samples instead of keeping them: counts for the report's
    metrics, the domain's summary, the best samples for ranking (a bounded heap with top=K). Pickled
    into the journal after every batch."""

    summary: MetricSummary
    done: int = 0
    tokens: int = 0  # sampled by this process (the progress line's rate)
    new_tokens: int = 0
    dropped: int = 0
    eos: int = 0
    ppl: Counter = field(default_factory=Counter)  # ppl (3 decimals, as written) -> samples
    token_errors: int = 0
    assessed: dict[str, float] = field(default_factory=dict)  # assess metrics x batch size, summed
    best: list[tuple] = field(default_factory=list)  # heap of (-ppl, -index, artifact, details)
    redrawn: int = 0
    invalid: int = 0
    middles: list[Any] = field(default_factory=list)
    spec: SpeculativeStats = field(default_factory=SpeculativeStats)
    sizes: dict[str, int] = field(default_factory=dict)  # appended files' sizes at the last sync
    last_paths: list[str] = field(default_factory=list)  # the files the last batch wrote


def keep_best(tally: Tally, top: int | None, ppl: float, i: int, artifact: Any, details: dict) -> None:
    """Ranking's candidates: the top lowest-perplexity samples that pass the filters (all with top unset)."""
    if not details.get("passes", True):
        return
    entry = (-ppl, -i, artifact, details)
    if top is None or len(tally.best) < top:
        heapq.heappush(tally.best, entry)
    elif entry[:2] > tally.best[0][:2]:
        heapq.heapreplace(tally.best, entry)


@dataclass
class Prepared:
    """What sampling needs once every check has passed: the model, the work, the settings, the files
    to fill and the tally (a resumed run's, where it goes on)."""

    cfg: DictConfig
    domain: Domain
    model: GPT
    out_dir: Path
    prompts: list[list[int]]  # per prompt, as the model continues it (fit_prompt)
    work: Work
    cond: Conditions
    settings: dict[str, Any]
    streaming: dict[str, Any]  # settings plus window_starts, for stream
    draft: GPT | str | None
    rule: Callable[[str, int, bool], int | None] | None
    stop: str | None
    provenance: dict[str, Any]
    device: torch.device
    files: SampleFiles
    listing: Appender  # every file written, a line each (the report's list, read once at the end)
    tally: Tally
    digest: str
    progress: Progress


@dataclass
class Finished:
    """What the steps after sampling add to the report: the files, ranking and extra metrics."""

    paths: list[Path]
    ranked: int
    extra_metrics: dict[str, Any]
    redrawn: dict[str, int]
    rendered: dict[str, Any]


LISTING = "generate.resume.files"


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
    generator = torch.Generator(device=cfg.device).manual_seed(cfg.seed)  # each batch gets its own
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


def plan_work(
    cfg: DictConfig, domain: Domain, model: GPT, texts: list, options: dict
) -> tuple[Work, Conditions]:
    """The prompts as the model continues them and the files hold them, their conditions: the work."""
    starts = domain.window_starts if isinstance(domain, WindowStarts) else None
    whole = [domain.prompt_ids(t, **options) for t in texts]
    prompts = [fit_prompt(p, model.config.block_size, cfg.max_new_tokens, starts) for p in whole]
    # what each sample keeps from its own prompt beyond the tokens (music: tempos), per prompt
    metas = [domain.prompt_meta(t, **options) for t in texts] if isinstance(domain, PromptMeta) else None
    cond = conditions(cfg, domain, prompts)
    heads = [p[1:] for p in whole]  # each prompt whole, as the files hold it
    seen = [r[1:] for r in cond.rows] if cond.infill is not None else heads
    return Work(cond.rows, heads, seen, list(cond.caps), metas, cfg.n), cond


def open_outputs(
    cfg: DictConfig, domain: Domain, out_dir: Path, provenance: dict
) -> tuple[SampleFiles, Appender, Tally, str]:
    """The domain's sample files, the file list and the tally: new ones, or (resume=true, a journal in
    out_dir) the killed run's, its appended files cut back to the last batch it finished."""
    digest = resume.settings_digest(cfg)
    journal = (out_dir / resume.JOURNAL).exists()
    if journal and not (cfg.resume or cfg.overwrite):
        raise FileExistsError(
            f"{out_dir}: holds a run that was interrupted: resume=true goes on with it, overwrite=true starts again"
        )
    files = domain.sample_files(out_dir, provenance, cfg.overwrite)
    listing = Appender(out_dir / LISTING, cfg.overwrite)
    if not (cfg.resume and journal):
        return files, listing, Tally(domain.metric_summary()), digest
    tally = resume.load(out_dir, digest)
    sizes = dict(tally.sizes)
    listing.resume(sizes.pop(LISTING))
    files.resume(sizes)
    tally.tokens = 0
    log.info("resume: %d samples were done; going on from there", tally.done)
    return files, listing, tally, digest


def texts_or(cfg: DictConfig) -> list[str | None]:
    return read_prompt_file(cfg.prompt_file) if cfg.prompt_file else [cfg.prompt]


def prepare_sampling(cfg: DictConfig) -> Prepared:
    """Load the run and prompts and run every check, all before any sampling; the files to fill."""
    cfg = validate("generate", cfg)
    run = load_run(cfg.run, device=cfg.device)
    texts = texts_or(cfg)
    model, domain = sampling_model(run, cfg.quantize, cfg.dtype, cfg.compile), run.domain
    out_dir = Path(cfg.out if cfg.out else Path("outputs") / domain.name).expanduser()
    options = domain_options(cfg, domain)  # passed by name to prompt_ids and prompt_meta
    check_filters(cfg, domain)
    check_before_sampling(cfg, domain, out_dir)
    work, cond = plan_work(cfg, domain, model, texts, options)
    settings, draft = sampling_settings(cfg, run, domain, cond)
    provenance = provenance_for(cfg, run, cond, options)
    files, listing, tally, digest = open_outputs(cfg, domain, out_dir, provenance)
    return Prepared(
        cfg=cfg,
        domain=domain,
        model=model,
        out_dir=out_dir,
        prompts=list(cond.rows),
        work=work,
        cond=cond,
        settings=settings,
        # past block_size the window slides to a tail that starts where a training window could
        streaming=dict(
            settings, window_starts=domain.window_starts if isinstance(domain, WindowStarts) else None
        ),
        draft=draft,
        rule=stop_rule(cfg, domain),
        stop=stop_text(cfg.stop) if cfg.stop is not None else None,
        provenance=provenance,
        device=settings["generator"].device,
        files=files,
        listing=listing,
        tally=tally,
        digest=digest,
        progress=Progress(work.total, f"{domain.name} samples", cfg.progress, done=tally.done),
    )


def take_batch(p: Prepared, batch: range) -> None:
    """Draw, decode, score, judge and write one batch of samples, count them, and journal the run."""
    samples = [decode_sample(p, i, ids, end) for i, (ids, end) in zip(batch, draw(p, batch), strict=True)]
    if p.cfg.resample_invalid:
        redraw_invalid(p, batch, samples)
    details = []
    for s, ppl in zip(samples, batch_ppl(p, batch, samples), strict=True):
        d = {"end": s.end, "tags": p.cond.tags, "kept": p.cond.kept}
        details.append({k: v for k, v in d.items() if v} | {"ppl": round(ppl, 3)})
    artifacts = [s.artifact for s in samples]
    if isinstance(p.domain, Assessed):
        for key, value in p.domain.assess(artifacts, details, dict(p.cfg.filters), start=batch[0]).items():
            p.tally.assessed[key] = p.tally.assessed.get(key, 0.0) + value * len(batch)
    paths = [str(x) for x in p.files.add(artifacts, batch[0], details)]
    p.listing.write("".join(f"{x}\n" for x in paths if x not in p.tally.last_paths))
    p.tally.last_paths = paths
    count(p, batch, samples, details)
    p.tally.sizes = p.files.sync() | {LISTING: p.listing.sync()}
    resume.save(p.out_dir, p.digest, p.tally)  # a kill from here on loses nothing of this batch
    p.progress.update(p.tally.done, p.tally.tokens)


def count(p: Prepared, batch: range, samples: list[Sample], details: list[dict]) -> None:
    """The batch into the tally: token counts, end reasons, perplexities, ranking, the domain's summary."""
    t, domain = p.tally, p.domain
    for i, s, d in zip(batch, samples, details, strict=True):
        t.new_tokens += len(s.ids)
        t.dropped += s.dropped
        t.eos += s.end == "eos"
        t.ppl[d["ppl"]] += 1
        if p.cfg.rank_by == "ppl":
            keep_best(t, p.cfg.top, d["ppl"], i, s.artifact, d)
        if s.middle is not None:
            t.middles.append(s.middle)
    if isinstance(domain, TokenErrors):  # miditok's tokens_errors over the sampled tokens, prompt as context
        for i, s in zip(batch, samples, strict=True):
            head = p.work.prompts[i // p.work.n]
            t.token_errors += max(domain.token_errors(head + s.ids) - domain.token_errors(head), 0)
    t.summary.add(domain, [s.artifact for s in samples], details)
    t.done = batch[-1] + 1


def sample_batches(p: Prepared) -> SpeculativeStats:
    """Every sample from where the run stands, batch by batch, each batch on disk as it finishes."""
    try:
        for batch in p.work.batches(p.tally.done, p.cfg.batch_size):
            take_batch(p, batch)
    finally:
        p.progress.close()
    return p.tally.spec


def ranked(tally: Tally) -> list[tuple]:
    """The ranking's (artifact, details, index), lowest perplexity first (ties: the earlier sample);
    each details gets its 1-based `rank`."""
    order = sorted(tally.best, key=lambda e: (-e[0], -e[1]))
    for rank, entry in enumerate(order, start=1):
        entry[3]["rank"] = rank
    return [(e[2], e[3], -e[1]) for e in order]


def finish_samples(p: Prepared) -> Finished:
    """After sampling: the ranks into the files, the figures from the summary, the ranked copies under
    top/, token errors and renders, in that order."""
    cfg, domain, t = p.cfg, p.domain, p.tally
    best = ranked(t) if cfg.rank_by == "ppl" else []
    closing = p.files.close({i: d["rank"] for _, d, i in best})
    p.listing.close()
    listed = p.listing.path.read_text(encoding="utf-8").splitlines()
    paths = [Path(x) for x in dict.fromkeys([*listed, *map(str, closing)])]
    paths += t.summary.files(domain, p.out_dir, True, p.provenance)
    if best:
        extra = {"details": [d for _, d, _ in best]} if isinstance(domain, Assessed) else {}
        top = p.out_dir / "top"
        paths += domain.write(
            [a for a, _, _ in best], top, p.provenance, overwrite=cfg.overwrite or cfg.resume, **extra
        )
    summary = t.summary.metrics(domain)
    extra_metrics = {k: summary.pop(k, v / max(t.done, 1)) for k, v in t.assessed.items()}
    if isinstance(domain, TokenErrors):
        extra_metrics[f"{domain.name}/token_error_rate"] = t.token_errors / max(t.new_tokens, 1)
    rendered = render_files(cfg, domain, paths) if cfg.render else {}
    paths += rendered.pop("files", [])
    redrawn = {"resampled": t.redrawn, "invalid_after_resampling": t.invalid} if cfg.resample_invalid else {}
    return Finished(paths, len(best), {"summary": summary, **extra_metrics}, redrawn, rendered)


def build_report(p: Prepared, done: Finished, spec: SpeculativeStats) -> dict[str, Any]:
    """The report generate.json holds and sample_to_files returns, keys in a fixed order."""
    cfg, domain, t, cond = p.cfg, p.domain, p.tally, p.cond
    extra = dict(done.extra_metrics)
    summary = extra.pop("summary")
    n = max(t.done, 1)
    return {
        "domain": domain.name,
        "files": [str(f) for f in done.paths],
        "samples": t.done,
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
            f"{domain.name}/new_tokens_mean": t.new_tokens / n,
            f"{domain.name}/dropped_tokens": t.dropped,
            f"{domain.name}/eos_rate": t.eos / n,
            f"{domain.name}/ppl_median": counted_median(t.ppl) if t.ppl else 0.0,
            **summary,
            **extra,
        },
        **({"ranked": done.ranked, "rank_by": cfg.rank_by} if cfg.rank_by else {}),
        **({"tags": cond.tags} if cond.tags else {}),
        **({"kept": cond.kept} if cond.kept else {}),
        **done.redrawn,
        **done.rendered,
        **({"middles": t.middles} if t.middles and isinstance(t.middles[0], str) else {}),
    }


def counted_median(counts: Counter) -> float:
    """statistics.median of the values counted (value -> how many), without listing them."""
    n, seen, low = sum(counts.values()), 0, None
    for value in sorted(counts):
        seen += counts[value]
        if low is None and seen >= (n + 1) // 2:
            low = value
        if seen >= n // 2 + 1:
            return low if n % 2 else (low + value) / 2
    return 0.0


def sample_to_files(cfg: DictConfig) -> dict[str, Any]:
    """Sample cfg.n continuations of each prompt (cfg.prompt, or every line of cfg.prompt_file) from
    run cfg.run; write files; return a report. Linear in n, memory bounded: the samples go to disk
    batch by batch, and a killed run goes on with resume=true."""
    p = prepare_sampling(cfg)  # every check before the first token is sampled
    spec = sample_batches(p)
    done = finish_samples(p)
    report = build_report(p, done, spec)
    cfg = p.cfg  # validated: defaults filled in
    write_new_text(
        p.out_dir / "generate.json",
        json.dumps(report, indent=1) + "\n",
        overwrite=cfg.overwrite or cfg.resume,
    )
    for name in (resume.JOURNAL, LISTING):  # the run is whole: nothing to resume
        (p.out_dir / name).unlink(missing_ok=True)
    print(f"{p.domain.name}: wrote {len(done.paths)} file(s) for {p.tally.done} samples to {p.out_dir}")
    for key, value in report["metrics"].items():
        print(f"  {key} = {value:.4g}")
    return report
