"""generate's outputs around the sampling: the files opened (or a killed run's reopened), and after the
last batch the ranks, figures, ranked copies and renders, and the report."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from multiar.commands import resume
from multiar.commands.prepared import Prepared
from multiar.commands.tally import RANKS, RankMap, Tally, ranked
from multiar.domain import (
    Assessed,
    Domain,
    SampleFiles,
    TokenErrors,
    counted_median,
)
from multiar.engine import cpu_matvec
from multiar.engine.speculative import SpeculativeStats
from multiar.files import Appender, remove_partial_writes

log = logging.getLogger("multiar")


LISTING = "generate.resume.files"


def open_outputs(
    cfg: DictConfig, domain: Domain, out_dir: Path, provenance: dict, decode: dict | None = None
) -> tuple[SampleFiles, Appender, Tally, str]:
    """The domain's sample files, the file list and the tally: new ones, or (resume=true, a journal in
    out_dir) the killed run's, its appended files cut back to the last batch it finished."""
    digest = resume.settings_digest(cfg, decode)
    journal = (out_dir / resume.JOURNAL).exists()
    if journal and not (cfg.resume or cfg.overwrite):
        raise FileExistsError(
            f"{out_dir}: holds a run that was interrupted: resume=true goes on with it, overwrite=true starts again"
        )
    files = domain.sample_files(out_dir, provenance, cfg.overwrite)
    listing = Appender(out_dir / LISTING, cfg.overwrite)
    if not (cfg.resume and journal):
        return files, listing, Tally(domain.metric_summary()), digest
    tally = resume.load(out_dir, digest, decode)
    if stale := remove_partial_writes(out_dir):  # a write the kill cut short (the journal's, a sample's)
        log.info("resume: removed %d partly written temporary file(s)", stale)
    sizes = dict(tally.sizes)
    listing.resume(sizes.pop(LISTING))
    files.resume(sizes)
    tally.tokens = 0
    log.info("resume: %d samples were done; going on from there", tally.done)
    return files, listing, tally, digest


def open_ranks(cfg: DictConfig, out_dir: Path, tally: Tally) -> Appender | None:
    """rank_by=ppl without top: the file every passing sample's (ppl, index) spills to (a resumed
    run's cut back to its last batch), instead of a heap of every sample; else None."""
    if cfg.rank_by != "ppl" or cfg.top is not None:
        return None
    ranks = Appender(out_dir / RANKS, overwrite=True)
    if tally.done:  # a resumed run: the pairs of the batches it finished
        ranks.resume(tally.ranks_size)
    return ranks


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
class Finished:
    """What the steps after sampling add to the report: the files, ranking and extra metrics."""

    paths: list[Path]
    ranked: int
    extra_metrics: dict[str, Any]
    redrawn: dict[str, int]
    rendered: dict[str, Any]


def finish_samples(p: Prepared) -> Finished:
    """After sampling: the ranks into the files, the figures from the summary, the ranked copies under
    top/ (top=K), token errors and renders, in that order."""
    cfg, domain, t = p.cfg, p.domain, p.tally
    best = ranked(t) if cfg.rank_by == "ppl" and p.ranks is None else []
    ranks: Mapping[int, int] = {i: d["rank"] for _, d, i in best}
    if p.ranks is not None:  # every passing sample ranked: from the spilled pairs, no copies under top/
        p.ranks.close()
        ranks = RankMap(p.ranks.path)
    closing = p.files.close(ranks)
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
    return Finished(paths, len(ranks), {"summary": summary, **extra_metrics}, redrawn, rendered)


def compiled_gemms(model: object) -> dict[str, Any] | None:
    """The GEMMs a compiled CPU step picked at its first step (engine.ahead_of_time: {"gemms": name, and
    "step_ms" where measured}), or None: not compiled, torch.compile's step, or no step run yet."""
    return getattr(getattr(model, "compiled_step", None), "gemms", None)


def decode_provenance(p: Prepared) -> dict[str, Any]:
    """How the model was laid out, where a compiled CPU step picked its GEMMs (after the files were
    opened) that pick and its timings, and where engine.cpu_matvec's fp32 operator ran, how far its
    measure of the prefetch hint got in this process (cpu_matvec.fp32_ahead: it changes no sum)."""
    decode = p.decode.as_dict() if p.decode else {}
    gemms = compiled_gemms(p.model)
    decode |= {"compiled_gemms": gemms} if gemms else {}
    hint = cpu_matvec.fp32_ahead() if cpu_matvec.loaded() else None
    return decode | ({"fp32_prefetch": hint} if hint and hint["hint"] != "not started" else {})


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
        "provenance": {**p.provenance, "decode": decode_provenance(p)},  # decode: the files' lack it
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
            f"{domain.name}/cut_unfinished_share": t.cut / n,
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
