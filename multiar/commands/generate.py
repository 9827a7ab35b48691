"""`multiar generate`: load a run, sample with the KV-cache decoder, decode and write the domain's files.
Linear in n with bounded memory: the work is a function of the sample index (sampling_plan), batches are
drawn (sample_draw), written and counted (sample_batch) one at a time, what the report needs is tallied
(tally), and the files are opened and finished around it (sample_outputs). The names other modules use
are importable from here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from multiar.commands import resume
from multiar.commands.prepared import Prepared
from multiar.commands.progress import Progress
from multiar.commands.sample_batch import count, take_batch
from multiar.commands.sample_draw import (
    Sample,
    batch_ppl,
    cut_at_stop,
    decode_sample,
    draw,
    redraw_invalid,
    row_stopper,
)
from multiar.commands.sample_outputs import (
    LISTING,
    Finished,
    build_report,
    finish_samples,
    open_outputs,
    open_ranks,
    render_files,
)
from multiar.commands.sampling_checks import (
    check_before_sampling,
    check_filters,
    domain_options,
    read_prompt_file,
)
from multiar.commands.sampling_plan import Work, fit_prompt, plan_work, texts_or
from multiar.commands.sampling_setup import (
    load_draft,
    provenance_for,
    same_tokenizer,
    sampling_model,
    sampling_settings,
    stop_rule,
    stop_sequences,
    stop_text,
)
from multiar.commands.tally import RANKS, Tally, keep_best, ranked
from multiar.domain import WindowStarts, counted_median
from multiar.engine.decode import stream
from multiar.engine.precision import cpu_model
from multiar.engine.speculative import SpeculativeStats
from multiar.files import write_new_text
from multiar.run_folder import load_run
from multiar.schema import compile_setting, validate

__all__ = [
    "LISTING", "Finished", "Prepared", "Sample", "Tally", "Work", "batch_ppl", "build_report",
    "check_before_sampling", "check_filters", "count", "counted_median", "cut_at_stop", "decode_sample",
    "domain_options", "draw", "finish_samples", "fit_prompt", "keep_best", "load_draft", "open_outputs", "open_ranks",
    "plan_work", "prepare_sampling", "provenance_for", "ranked", "read_prompt_file", "redraw_invalid",
    "render_files", "row_stopper", "same_tokenizer", "sample_batches", "sample_to_files", "sampling_model",
    "sampling_settings", "stop_rule", "stop_sequences", "stop_text", "stream", "take_batch", "texts_or",
]  # fmt: skip


def prepare_sampling(cfg: DictConfig) -> Prepared:
    """Load the run and prompts and run every check, all before any sampling; the files to fill."""
    cfg = validate("generate", cfg)
    run = load_run(cfg.run, device=cfg.device)
    texts = texts_or(cfg)
    domain = run.domain
    out_dir = Path(cfg.out if cfg.out else Path("outputs") / domain.name).expanduser()
    options = domain_options(cfg, domain)  # passed by name to prompt_ids and prompt_meta
    check_filters(cfg, domain)
    check_before_sampling(cfg, domain, out_dir)
    work, cond = plan_work(cfg, domain, run.model, texts, options)
    # a resumed run decodes as the killed one did (a layout measured anew could change the numbers)
    dtype, layout, kernels, compiled = (
        resume.journaled_decode(out_dir) if cfg.resume else (cfg.dtype, cfg.layout, None, None)
    )
    rows = max(1, min(cfg.batch_size, work.total))  # decoded together
    # the job's most decode steps (compile=auto weighs them); a speculative one's are not single steps
    steps = 0 if cfg.draft is not None else -(-work.total // rows) * cond.max_new_tokens
    gemms = resume.journaled_gemms(out_dir) if cfg.resume else None  # and a compiled step's GEMMs
    model, choice = sampling_model(
        run, cfg.quantize, dtype, compile_setting(cfg.compile), layout=layout, batch_size=rows,
        kernels=kernels, steps=steps, decided=compiled,  # compile=auto: a resume keeps what it decided
        gemms=gemms,
    )  # fmt: skip
    settings, draft = sampling_settings(cfg, run, domain, cond)
    provenance = provenance_for(cfg, run, cond, options)
    files, listing, tally, digest = open_outputs(cfg, domain, out_dir, provenance, choice.as_dict())
    tally.layout = (choice.dtype, choice.layout)  # journaled with it: a resume decodes the same way
    tally.kernels = dict(choice.kernels)  # a quantized run's per shape: pinned by a resume too
    tally.cpu = cpu_model()  # and where: a resume this CPU cannot decode the same way names both
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
        ranks=open_ranks(cfg, out_dir, tally),
        decode=choice,  # read when the report is written: a compile that failed has said so
    )


def sample_batches(p: Prepared) -> SpeculativeStats:
    """Every sample from where the run stands, batch by batch, each batch on disk as it finishes."""
    try:
        for batch in p.work.batches(p.tally.done, p.cfg.batch_size):
            take_batch(p, batch)
    finally:
        p.progress.close()
    return p.tally.spec


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
    for name in (resume.JOURNAL, LISTING, RANKS):  # the run is whole: nothing to resume
        (p.out_dir / name).unlink(missing_ok=True)
    print(f"{p.domain.name}: wrote {len(done.paths)} file(s) for {p.tally.done} samples to {p.out_dir}")
    for key, value in report["metrics"].items():
        print(f"  {key} = {value:.4g}")
    return report
