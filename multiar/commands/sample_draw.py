"""Drawing and decoding generate's samples: each sample's ids from its own generator (seed, index), decoded
as its files hold them (caps, fill-in-the-middle, stop text and rule), redrawn when invalid, and scored
(perplexity under the model)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from multiar.commands import resume
from multiar.commands.prepared import Prepared
from multiar.domain import (
    Domain,
    Validity,
)
from multiar.engine.decode import stream
from multiar.engine.scoring import document_nats
from multiar.engine.speculative import speculative_generate


@dataclass
class Sample:
    """One finished sample: its new ids, why it ended, what the files hold, what decoding dropped."""

    ids: list[int]
    end: str | None
    artifact: Any
    dropped: int
    middle: Any = None
    cut: int = 0  # new tokens dropped to end on a valid prefix (unfinished=cut)


def cut_at_stop(artifact: Any, stop: str | None, start: int = 0) -> Any:
    """A text artifact ends before the first stop text at or after start (the end of the prompt), even
    where the tokens that spelled it differ from the stop's own tokens."""
    if stop and isinstance(artifact, str) and (at := artifact.find(stop, start)) >= 0:
        return artifact[:at]
    return artifact


def row_stopper(domain: Domain, rule: Callable, prompts: list[list[int]]) -> Callable[[int, list[int]], bool]:
    """should_stop for `stream`: a row ends once the rule finds its end in the decoded text of its
    prompt (ids without BOS) and new ids."""
    before = [len(domain.decode(p)[0]) for p in prompts]

    def should_stop(row: int, ids: list[int]) -> bool:
        return rule(domain.decode(prompts[row] + ids)[0], before[row], False) is not None

    return should_stop


def decode_sample(p: Prepared, i: int, ids: list[int], end: str | None) -> Sample:
    """Sample i as its files hold it (`as_written`); one the length cap cut before it ended (or that found
    no valid token to go on with) and that is not valid, under unfinished=cut (auto: with the constraint on, unless exactly max_new_tokens were
    asked for) where the domain judges validity, ends instead after the most new tokens that make a valid
    sample (code: prompt and new text parse, whether or not the file holds the prompt), if any do: what
    the model wrote, up to its last complete statement rather than into an unfinished one."""
    sample, domain = as_written(p, i, ids, end), p.domain
    if end not in UNFINISHED or not isinstance(domain, Validity) or not cuts_unfinished(p):
        return sample

    def valid(k: int) -> bool:
        return domain.valid(as_written(p, i, ids[:k], end, whole=True).artifact)

    if valid(len(ids)):
        return sample
    keep = longest_valid(len(ids), valid, lambda k: line_end(p, i, ids[:k]))
    if keep is None:
        return sample
    shorter = as_written(p, i, ids[:keep], end)
    shorter.cut = len(ids) - keep
    return shorter


UNFINISHED = ("length", "no_valid_token")  # the end reasons of a sample cut short of its own end


def longest_valid(n: int, valid: Callable[[int], bool], at_line_end: Callable[[int], bool]) -> int | None:
    """A large 0 < k < n (a cut keeps at least one new token: an empty sample is no sample) with valid(k)
    in about (lines + one line's length) checks of validity instead of n:
    line ends first, from the last; then the positions inside the line after the one found (a statement
    can end mid-line, before what no continuation could make valid). A valid position further on, inside
    a later line whose end is not valid, is not looked for; with no valid line end, every position is."""
    ends = [k for k in range(n - 1, 0, -1) if at_line_end(k)]
    found = next((k for k in ends if valid(k)), None)
    if found is None:  # no line end is valid: every position, from the last
        return next((k for k in range(n - 1, 0, -1) if valid(k)), None)
    upto = min((k for k in ends if k > found), default=n)  # the next line end after it, or the end
    return next((k for k in range(upto - 1, found, -1) if valid(k)), found)


def line_end(p: Prepared, i: int, ids: list[int]) -> bool:
    """Whether the prompt and ids decode to a text ending a line (non-text artifacts: every k is one)."""
    text = p.domain.decode(p.work.prompts[i // p.work.n] + ids)[0]
    return not isinstance(text, str) or not text or text.endswith("\n")


def cuts_unfinished(p: Prepared) -> bool:
    """unfinished=cut; or auto with the constraint on, unless the request asked for exactly
    max_new_tokens (min_new_tokens as large: a client counting on N tokens gets N)."""
    cfg = p.cfg
    exact = cfg.min_new_tokens >= p.cond.max_new_tokens
    return cfg.unfinished == "cut" or (cfg.unfinished == "auto" and bool(cfg.constrain) and not exact)


def as_written(p: Prepared, i: int, ids: list[int], end: str | None, whole: bool = False) -> Sample:
    """Sample i as its files hold it: cut at its length cap, around a fill-in-the-middle gap, with its
    prompt's meta, cut at the stop text and at the domain's stop rule. whole: with its prompt, whatever
    include_prompt says (the sample as a program, for its validity)."""
    work, domain, k = p.work, p.domain, i // p.work.n
    cap = work.caps[k]
    if cap is not None and len(ids) >= cap:  # reached max_len: cut there, no EOS forced
        ids, end = ids[:cap], "max_len"
    head, ids_out, middle = (work.heads[k] if p.cfg.include_prompt or whole else []), ids, None
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
    """New ids and end reason of each sample index, drawn together as one batch, each row with its own
    generator of (seed, its index, attempt): sample i is the same whatever the batch size, its
    neighbours or what ran before. Speculative decoding (a draft) draws the batch with one generator
    of (seed, first index): its samples depend on the batch."""
    work, cfg = p.work, p.cfg
    rows = [work.rows[i // work.n] for i in indices]
    if p.draft is not None and attempt == 0:
        batch_seed = resume.sample_seed(cfg.seed, indices[0])
        out, stats = speculative_generate(
            p.model, rows, p.cond.max_new_tokens, draft=p.draft, k=cfg.speculate_k, ngram=cfg.ngram,
            **dict(p.settings, generator=torch.Generator(device=p.device).manual_seed(batch_seed)),
        )  # fmt: skip
        p.tally.spec.merge(stats)
        return list(zip(out, stats.ends, strict=True))
    buffers: list[list[int]] = [[] for _ in rows]
    ends: list[str | None] = [None] * len(rows)
    heads = [work.prompts[i // work.n] for i in indices]
    ended = row_stopper(p.domain, p.rule, heads) if p.rule is not None else None
    seeds = [resume.sample_seed(cfg.seed, i, attempt) for i in indices]
    generators = [torch.Generator(device=p.device).manual_seed(s) for s in seeds]
    settings, finished = dict(p.streaming, generator=None, generators=generators), 0
    for event in stream(p.model, rows, p.cond.max_new_tokens, should_stop=ended, **settings):
        if event.token is not None:
            buffers[event.row].append(event.token)
        else:
            ends[event.row], finished = event.end, finished + 1
            # this batch's tokens so far count too: the tally takes them only when the batch ends
            p.progress.update(p.tally.done + finished, p.tally.tokens + sum(map(len, buffers)))
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
