"""One batch of generate's samples from draw to disk: decoded, judged, written, counted and journaled."""

from __future__ import annotations

from multiar.commands import resume
from multiar.commands.prepared import Prepared
from multiar.commands.sample_draw import Sample, batch_ppl, decode_sample, draw, redraw_invalid
from multiar.commands.sample_outputs import LISTING, compiled_gemms
from multiar.commands.tally import MIDDLES, keep_best, spill_pairs
from multiar.domain import Assessed, TokenErrors


def take_batch(p: Prepared, batch: range) -> None:
    """Draw, decode, score, judge and write one batch of samples, count them, and journal the run."""
    samples = [decode_sample(p, i, ids, end) for i, (ids, end) in zip(batch, draw(p, batch), strict=True)]
    if p.cfg.resample_invalid:
        redraw_invalid(p, batch, samples)
    details = []
    for s, ppl in zip(samples, batch_ppl(p, batch, samples), strict=True):
        d = {"end": s.end, "cut_tokens": s.cut, "tags": p.cond.tags, "kept": p.cond.kept}
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
    if p.ranks is not None:
        p.tally.ranks_size = p.ranks.sync()
    # picked at the compiled step's first call: a resume pins it (compile=true: one pick for every row
    # count, the first batch's; compile=auto compiles one row count)
    if p.tally.gemms is None:
        p.tally.gemms = (compiled_gemms(p.model) or {}).get("gemms")
    resume.save(p.out_dir, p.digest, p.tally)  # a kill from here on loses nothing of this batch
    p.progress.update(p.tally.done, p.tally.tokens)


def count(p: Prepared, batch: range, samples: list[Sample], details: list[dict]) -> None:
    """The batch into the tally: token counts, end reasons, perplexities, ranking (the heap, or the
    spilled pairs), the first middles, the domain's summary."""
    t, domain = p.tally, p.domain
    for i, s, d in zip(batch, samples, details, strict=True):
        t.new_tokens += len(s.ids)
        t.dropped += s.dropped
        t.eos += s.end == "eos"
        t.cut += s.cut > 0
        t.ppl[d["ppl"]] += 1
        if p.cfg.rank_by == "ppl" and p.ranks is None:
            keep_best(t, p.cfg.top, d["ppl"], i, s.artifact, d)
        if s.middle is not None and len(t.middles) < MIDDLES:
            t.middles.append(s.middle)
    if p.ranks is not None:  # ranking every passing sample: 16 bytes each to the spill file
        p.ranks.write_bytes(spill_pairs([d["ppl"] for d in details], batch, details))
    if isinstance(domain, TokenErrors):  # miditok's tokens_errors over the sampled tokens, prompt as context
        for i, s in zip(batch, samples, strict=True):
            head = p.work.prompts[i // p.work.n]
            t.token_errors += max(domain.token_errors(head + s.ids) - domain.token_errors(head), 0)
    t.summary.add(domain, [s.artifact for s in samples], details)
    t.done = batch[-1] + 1
