"""From a `multiar serve` request to the engine's rows and back: a domain-native request (the generate
command's keys, JSON-typed) is checked and planned by generate's own functions (prompts cut to the
window, tags, length windows, templates, infill, grammar, stops), each sample becomes a row with its own
settings and seed; finished rows become samples with their text or notes, the per-sample columns
generate writes, and (files=true) generate's files. Never touches the model: ppl comes from the
engine's log-probabilities of the sampled ids."""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from omegaconf import DictConfig
from symusic import Score

from multiar.commands import resume
from multiar.commands.generate import (
    Prepared,
    Sample,
    Tally,
    build_report,
    check_filters,
    count,
    decode_sample,
    domain_options,
    finish_samples,
    open_outputs,
    plan_work,
    provenance_for,
    row_stopper,
    sampling_settings,
    stop_rule,
    stop_text,
)
from multiar.commands.progress import Progress
from multiar.commands.serve_engine import Event, Job, SampleSpec, SlotEngine, Stats
from multiar.domain import Assessed, Renderable, TokenErrors
from multiar.engine.model import GPT
from multiar.engine.rows import RowSettings
from multiar.engine.sampling import Sampler
from multiar.engine.speculative import SpeculativeStats
from multiar.errors import ConfigError, first_line
from multiar.run_folder import Run
from multiar.schema import validate_update

# the generate keys a request may set: sampling, conditions, prompts as data (never a path or a folder)
REQUEST_KEYS = frozenset(
    [
        "n",
        "max_new_tokens",
        "min_new_tokens",
        "temperature",
        "top_k",
        "top_p",
        "min_p",
        "repetition_penalty",
        "repetition_window",
        "stop",
        "stop_ids",
        "seed",
        "prompt",
        "include_prompt",
        "constrain",
        "unfinished",
        "min_len",
        "max_len",
        "template",
        "fixed",
        "tags",
        "prompt_prefix",
        "prompt_suffix",
        "stop_at",
        "options",
        "filters",
        "render",
    ]
)
SERVER_KEYS = frozenset({"model", "stream", "files", "prompt_midi", "prompt_image", "ignore_eos"})


class RequestError(Exception):
    """What a client sent cannot be served: HTTP `status` with a one-line message."""

    def __init__(self, message: str, status: int = 422, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.kind = status, kind


@dataclass
class Served:
    """One model the server holds: the run, its sampling model, the generate config requests start
    from, its engine, and where its requests' files go."""

    name: str
    run: Run
    model: GPT
    base: DictConfig
    engine: SlotEngine
    files_dir: Path
    max_tokens: int
    max_n: int
    finishing: threading.Lock = field(default_factory=threading.Lock)  # the domain's post-processing

    def __post_init__(self) -> None:
        self.text = isinstance(self.run.domain.decode([])[0], str)  # code, protein: samples are text


@dataclass
class Plan:
    """A checked request: the engine's rows and what turns their results into samples."""

    prepared: Prepared
    specs: list[SampleSpec]
    write: bool
    head_texts: list[Any]


def request_config(served: Served, body: dict[str, Any], out_dir: Path, max_prompt_bytes: int) -> DictConfig:
    """The generate config of a request: its keys on the server's base, capped, checked."""
    domain = served.run.domain
    declared = domain.generate_options  # music: prompt_bars, a top-level key as in generate
    unknown = sorted(set(body) - REQUEST_KEYS - SERVER_KEYS - set(declared))
    if unknown:
        known = sorted(REQUEST_KEYS | SERVER_KEYS | set(declared))
        raise RequestError(f"{unknown[0]}: not a request key; known: {', '.join(known)}")
    keys = {k: v for k, v in body.items() if k in REQUEST_KEYS}
    keys["options"] = dict(keys.get("options") or {}) | {k: body[k] for k in body if k in declared}
    file_prompt(domain, body, keys, out_dir, max_prompt_bytes)
    if keys.get("seed") is None:  # unseeded: a fresh seed (reported back), not the base's fixed one
        keys["seed"] = secrets.randbits(53)  # exact as a JSON number in any client
    if not isinstance(keys.get("max_new_tokens", 1), int) or not isinstance(keys.get("n", 1), int):
        raise RequestError("max_new_tokens and n must be integers")
    keys["max_new_tokens"] = min(keys.get("max_new_tokens", served.base.max_new_tokens), served.max_tokens)
    if isinstance(keys.get("min_new_tokens"), int):  # min = max (exactly N) stays so under the cap
        keys["min_new_tokens"] = min(keys["min_new_tokens"], served.max_tokens)
    if body.get("ignore_eos"):
        keys["min_new_tokens"] = keys["max_new_tokens"]
    if not 1 <= keys.get("n", served.base.n) <= served.max_n:
        raise RequestError(f"n: must be 1 to {served.max_n} (the server's max_n)")
    server_filters(served, keys.get("filters"))
    try:
        return validate_update(served.base, literal(keys))  # served.base: validate("generate", ...) at start
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 (OmegaConf's other errors on odd values: the client's)
        raise RequestError(first_line(err)) from None


def literal(value: Any) -> Any:
    """A request's values as OmegaConf keeps them literally: every `${` escaped (with the backslashes
    before it doubled), so `"prompt": "${oc.env:MULTIAR_API_KEY}"` is that text, never the server's
    secret or another config value."""
    if isinstance(value, str):
        value = re.sub(r"(\\+)(?=\$\{)", lambda m: m.group(1) * 2, value)
        return value.replace("${", "\\${")
    if isinstance(value, dict):
        return {k: literal(v) for k, v in value.items()}
    if isinstance(value, list):
        return [literal(v) for v in value]
    return value


def server_filters(served: Served, filters: Any) -> None:
    """The filters a request may not set: `workers` (processes forked from the server, never ended)
    and a `candidates` other than the server's (the novelty index, built once, is shared)."""
    if not isinstance(filters, dict):
        return  # none, or not a mapping: the merge refuses it
    if filters.get("workers", 1) != 1:
        raise RequestError("filters.workers: the server searches novelty in its own process (1 only)")
    base = served.base.get("filters") or {}
    if "candidates" in filters and filters["candidates"] != base.get("candidates", 8):
        fixed = base.get("candidates", 8)
        raise RequestError(f"filters.candidates: set by the server ({fixed}); its novelty index is shared")


def file_prompt(domain: Any, body: dict[str, Any], keys: dict[str, Any], out_dir: Path, limit: int) -> None:
    """Music and image prompts are files: sent as bytes (prompt_midi, prompt_image: base64), written by
    the server as the request's own file; a `prompt` naming a path is refused (no server paths)."""
    kind = "prompt_midi" if isinstance(domain, Renderable) else None
    if domain.name == "image":
        kind = "prompt_image"
    if kind is not None and "prompt" in keys:
        raise RequestError(f"prompt: a {domain.name} prompt is file bytes, sent as {kind} (base64)")
    for other in {"prompt_midi", "prompt_image"} - {kind}:
        if body.get(other) is not None:
            raise RequestError(f"{other}: the {domain.name} domain does not take it")
    if kind is not None and body.get(kind) is not None:
        write = midi_prompt if kind == "prompt_midi" else image_prompt
        keys["prompt"] = str(write(body[kind], out_dir, limit))


def image_prompt(data: Any, out_dir: Path, limit: int) -> Path:
    """prompt_image (base64 PNG or JPEG) written as the request's own prompt.png / .jpg."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(data, str) or len(data) > limit * 4 // 3 + 4:
        raise RequestError(
            f"prompt_image: base64 PNG or JPEG bytes of at most {limit} bytes",
            413 if isinstance(data, str) else 422,
        )
    try:
        raw = base64.b64decode(data, validate=True)
        with Image.open(io.BytesIO(raw)) as image:
            kind = image.format
            image.verify()
    except (binascii.Error, ValueError, OSError, UnidentifiedImageError) as err:
        raise RequestError(f"prompt_image: not base64 PNG or JPEG bytes ({type(err).__name__})") from None
    if kind not in ("PNG", "JPEG"):
        raise RequestError(f"prompt_image: PNG or JPEG, got {kind}")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ("prompt.png" if kind == "PNG" else "prompt.jpg")
    path.write_bytes(raw)
    return path


def midi_prompt(data: Any, out_dir: Path, limit: int) -> Path:
    """prompt_midi (base64) written as the request's own prompt.mid; RequestError for bad bytes."""
    if not isinstance(data, str) or len(data) > limit * 4 // 3 + 4:
        raise RequestError(
            f"prompt_midi: base64 MIDI bytes of at most {limit} bytes", 413 if isinstance(data, str) else 422
        )
    try:
        raw = base64.b64decode(data, validate=True)
        Score.from_midi(raw)
    except (binascii.Error, ValueError, RuntimeError) as err:
        raise RequestError(f"prompt_midi: not base64 MIDI bytes ({type(err).__name__})") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "prompt.mid"
    path.write_bytes(raw)
    return path


def plan(served: Served, body: dict[str, Any], out_dir: Path, max_prompt_bytes: int) -> Plan:
    """Check and plan a request with generate's functions: its rows, settings, seeds, stop rule."""
    cfg = request_config(served, body, out_dir, max_prompt_bytes)
    run, domain, model = served.run, served.run.domain, served.model
    options = domain_options(cfg, domain)
    check_filters(cfg, domain)
    work, cond = plan_work(cfg, domain, model, [cfg.prompt], options)
    settings, _ = sampling_settings(cfg, run, domain, cond)
    provenance = provenance_for(cfg, run, cond, options) | {"run": served.name}
    rule = stop_rule(cfg, domain)
    stopper = row_stopper(domain, rule, work.prompts) if rule is not None else None
    write = bool(body.get("files", True))
    if write:
        cfg.out, cfg.overwrite, cfg.progress = str(out_dir), True, False
        files, listing, tally, digest = open_outputs(cfg, domain, out_dir, provenance)
    else:
        files, listing, tally, digest = None, None, Tally(domain.metric_summary()), ""
    prepared = Prepared(
        cfg=cfg, domain=domain, model=model, out_dir=out_dir, prompts=list(cond.rows), work=work, cond=cond,
        settings=settings, streaming=settings, draft=None, rule=rule,
        stop=stop_text(cfg.stop) if cfg.stop is not None else None, provenance=provenance,
        device=model.wte.weight.device, files=cast(Any, files), listing=cast(Any, listing), tally=tally,
        digest=digest, progress=Progress(work.total, domain.name, False),
    )  # fmt: skip
    specs = []
    for i in range(work.total):
        k = i // work.n
        stop_k = (lambda ids, k=k: stopper(k, ids)) if stopper is not None else None
        row = RowSettings(
            cond.max_new_tokens, cfg.min_new_tokens, settings["stop"], settings["processors"], stop_k
        )
        seed = torch.Generator(device=prepared.device).manual_seed(resume.batch_seed(cfg.seed, i))
        sampler = Sampler(cfg.temperature, cfg.top_k, cfg.top_p, cfg.min_p, seed)
        specs.append(SampleSpec(list(work.rows[k]), row, sampler))
    return Plan(prepared, specs, write, [work.heads[k] for k in range(len(work.rows))])


def finish(
    served: Served, plan_: Plan, results: list[tuple[list[int], str | None, list[float]]]
) -> dict[str, Any]:
    """The samples of a finished request: decoded as generate decodes them, their columns (ppl, the
    domain's assessment, token errors), and with files=true generate's files and report."""
    p = plan_.prepared
    domain, batch = p.domain, range(len(results))
    samples = [decode_sample(p, i, ids, end) for i, (ids, end, _) in enumerate(results)]
    details = []
    for s, (_, _, logps) in zip(samples, results, strict=True):
        d = {"end": s.end, "cut_tokens": s.cut, "tags": p.cond.tags, "kept": p.cond.kept}
        logps = logps[: len(s.ids) + (s.end == "eos")]  # a sample cut back: the tokens it kept
        nats = -sum(logps) / max(len(logps), 1)
        ppl = round(math.exp(nats), 3) if nats < 700 else None  # JSON has no inf: past e^700, none
        details.append({k: v for k, v in d.items() if v} | {"ppl": ppl})
    artifacts = [s.artifact for s in samples]
    with served.finishing:
        metrics = (
            domain.assess(artifacts, details, dict(p.cfg.filters), start=0)
            if isinstance(domain, Assessed)
            else {}
        )
        errors = token_errors(p, samples)
        report = None
        if plan_.write:
            paths = p.files.add(artifacts, 0, details)  # each sample's end reason reaches the files too
            p.listing.write("".join(f"{x}\n" for x in paths))
            p.files.sync()
            p.listing.sync()
            count(p, batch, samples, details)
            report = build_report(p, finish_samples(p), SpeculativeStats())
    out = [
        sample_view(i, s, d, errors[i] if errors else None)
        for i, (s, d) in enumerate(zip(samples, details, strict=True))
    ]
    return {"samples": out, "metrics": metrics, "report": report, "seed": p.cfg.seed}


def token_errors(p: Prepared, samples: list[Sample]) -> list[int] | None:
    """miditok's token errors of each sample's ids, its prompt as context (music); None elsewhere."""
    if not isinstance(p.domain, TokenErrors):
        return None
    heads = [p.work.prompts[i // p.work.n] for i in range(len(samples))]
    base = [p.domain.token_errors(h) for h in heads]
    return [
        max(p.domain.token_errors(h + s.ids) - b, 0) for h, s, b in zip(heads, samples, base, strict=True)
    ]


def sample_view(i: int, s: Sample, details: dict[str, Any], errors: int | None) -> dict[str, Any]:
    """One sample as JSON: its text (code, protein) or notes (music), end, new tokens and columns."""
    out: dict[str, Any] = {"index": i, "end": s.end, "new_tokens": len(s.ids)}
    if isinstance(s.artifact, str):
        out["text"] = s.artifact
    elif isinstance(s.artifact, Score):
        out |= notes_view(s.artifact)
    if s.middle is not None:
        out["middle"] = s.middle
    if errors is not None:
        out["token_errors"] = errors
    return out | {k: v for k, v in details.items() if k != "end" and is_json(v)}


def notes_view(score: Score, since: int = 0) -> dict[str, Any]:
    """A score's notes as events (beats = ticks / ticks_per_quarter), from the `since`-th on."""
    notes = sorted(
        ((n.time, n.duration, n.pitch, n.velocity, k) for k, t in enumerate(score.tracks) for n in t.notes)
    )
    tpq = score.ticks_per_quarter
    events = [
        {"start": a / tpq, "duration": d / tpq, "pitch": p, "velocity": v, "track": k}
        for a, d, p, v, k in notes[since:]
    ]
    return {"notes": events, "note_count": len(notes)}


def is_json(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool, list, dict))


def warm_up(served: Served, scratch: Path) -> None:
    """One small request through the whole path (plan, the engine, finish) before the server says ready:
    what a first request loads lazily (modules, the domain's indexes, kernels) is loaded now, so it can
    be frozen out of the cyclic GC with the rest (serve.start_loading) and no user's request waits."""
    done = threading.Event()
    results: dict[int, tuple[list[int], str | None, list[float]]] = {}

    def emit(event: Event) -> None:
        if event.kind == "end":
            results[event.sample] = (event.ids, event.end, event.logps)
        if event.kind == "error" or len(results) == len(checked.specs):
            done.set()

    checked = plan(
        served,
        {"max_new_tokens": 4, "min_new_tokens": 0, "n": 1, "seed": 0, "files": False},
        scratch,
        1 << 20,
    )
    served.engine.submit(Job(checked.specs, emit))
    if not done.wait(120):
        raise RuntimeError(f"{served.name}: the warm-up request did not finish in 120 s")
    if len(results) != len(checked.specs):
        raise RuntimeError(f"{served.name}: the warm-up request failed")
    finish(served, checked, [results[i] for i in range(len(checked.specs))])
    served.engine.stats = Stats()  # /metrics counts users' requests only
