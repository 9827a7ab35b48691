"""`multiar eval` and `multiar score`: how good is a trained model, in tokens and in the domain's own unit.

eval: per-token loss and perplexity on files (default: the run's own validation split, from
run_dir/reference/), bits per byte / residue / note, the same for the validation split, two baselines on
the same documents (the training split's add-one unigram model, the model at initialization), the domain
metrics of fresh samples; eval.json, eval.md and curves.png. score: the same per document, as a CSV.

Each document is scored on its own, as it was trained ([BOS] tags ids [EOS], the tags as context, in
windows of block_size + 1 like training's packing: multiar/scoring.py), so a document's figure never
depends on which others are evaluated with it. A tagged run also reports each figure `untagged`.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from multiar.data.reference import (
    read_documents,
    read_reference,
    reference_documents,
    unigram_log_probs,
    unigram_nats,
)
from multiar.data.source import Source
from multiar.engine.model import GPT, ModelConfig
from multiar.engine.scoring import Documents, score_documents, summary
from multiar.figures import new_figure, png_bytes
from multiar.files import write_new_file, write_new_text
from multiar.run_folder import Run, load_run
from multiar.samples import unprompted_samples
from multiar.schema import validate

log = logging.getLogger("multiar")


def init_model(run: Run) -> GPT:
    """The model as training started it: the run's architecture, initialized with the run's seed."""
    torch.manual_seed(int(run.config.get("seed", 0)))
    return GPT(ModelConfig(**run.config["model_config"])).to(run.model.wte.weight.device)


def curves_png(metrics_csv: Path) -> bytes | None:
    """Training and validation loss against step from metrics.csv, as PNG bytes (None without rows)."""
    if not metrics_csv.exists():
        return None
    with open(metrics_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    fig, ax = new_figure()
    plotted = False
    for key in ("train/loss", "val/loss"):
        points = [(int(r["step"]), float(r[key])) for r in rows if r.get(key) and r.get("step")]
        if points:
            ax.plot(
                *zip(*points, strict=True), label=key, marker="o" if key == "val/loss" else None, markersize=3
            )
            plotted = True
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    png = png_bytes(fig)  # closes the figure
    return png if plotted else None


FIGURES = ("loss", "ppl", "bits_per_unit", "ppl_per_unit", "unit", "tokens", "units", "documents")


def scored(model: GPT, run: Run, docs: Documents, batch_size: int) -> dict[str, Any]:
    """The summary of docs under model as the run trained them (control tags as context); for a tagged
    run also `untagged`: the same documents without their tags."""
    d = run.domain
    result = summary(score_documents(model, docs, d.bos_id, d.eos_id, batch_size), docs, d.unit)
    if docs.tagged:
        nats = score_documents(model, docs, d.bos_id, d.eos_id, batch_size, conditioned=False)
        result["untagged"] = summary(nats, docs, d.unit)
    return result


def eval_run(cfg: DictConfig) -> dict[str, Any]:
    """`multiar eval`: eval.json, eval.md and curves.png in cfg.out (default run_dir/eval/)."""
    cfg = validate("eval", cfg)
    run = load_run(cfg.run, device=cfg.device)
    domain, unit = run.domain, run.domain.unit
    out = Path(cfg.out).expanduser() if cfg.out else run.path / "eval"
    if (out / "eval.json").exists() and not cfg.overwrite:
        raise FileExistsError(f"{out / 'eval.json'}: already exists (overwrite=true replaces it)")
    val_docs = reference_documents(run.path, domain, cfg.data.strict)
    if cfg.data.paths:
        docs = read_documents(domain, Source(domain, list(cfg.data.paths)), strict=cfg.data.strict)
        source = [str(p) for p in cfg.data.paths]
    else:
        docs, source = val_docs, "the run's validation split"
    result = scored(run.model, run, docs, cfg.batch_size) | {
        "data": source,
        "files_skipped": docs.files_skipped,
        "records_skipped": docs.records_skipped,
    }
    log_probs = unigram_log_probs(np.asarray(read_reference(run.path)["unigram"]["counts"]))
    result["unigram"] = summary([unigram_nats(log_probs, ids, domain.eos_id) for ids in docs.ids], docs, unit)
    result["init"] = summary(
        score_documents(init_model(run), docs, domain.bos_id, domain.eos_id, cfg.batch_size), docs, unit
    )
    if cfg.data.paths:
        result["val"] = scored(run.model, run, val_docs, cfg.batch_size)
    else:
        result["val"] = {k: result[k] for k in (*FIGURES, "untagged") if k in result}
    result["metrics"] = (
        unprompted_samples(run.model, domain, cfg.n, cfg.max_new_tokens, cfg.temperature, cfg.seed)[1]
        if cfg.n
        else {}
    )
    result["run"] = str(run.path)
    result["final_train_metrics"] = run.config.get("final", {})
    out.mkdir(parents=True, exist_ok=True)
    png = curves_png(run.path / "metrics.csv")
    if png is not None:
        write_new_file(out / "curves.png", lambda tmp: tmp.write_bytes(png), overwrite=cfg.overwrite)
    write_new_text(out / "eval.md", report_markdown(result, png is not None), overwrite=cfg.overwrite)
    write_new_text(out / "eval.json", json.dumps(result, indent=1) + "\n", overwrite=cfg.overwrite)
    untagged = f" (untagged {result['untagged']['ppl']:.3f})" if "untagged" in result else ""
    print(
        f"{domain.name}: ppl {result['ppl']:.3f}/token{untagged}, {result['bits_per_unit']:.3f} bits/{unit} on "
        f"{result['documents']} documents; unigram {result['unigram']['ppl']:.3f}, init "
        f"{result['init']['ppl']:.3f}, val {result['val']['ppl']:.3f} -> {out}"
    )
    return result


def report_markdown(r: dict[str, Any], curves: bool) -> str:
    unit = r["unit"]
    lines = [
        f"# multiar eval: {r['run']}",
        "",
        f"Data: {r['data'] if isinstance(r['data'], str) else ', '.join(r['data'])} — {r['documents']} documents, "
        f"{r['tokens']:,} target tokens, {r['units']:,} {unit}s"
        + (
            f"; skipped {r['files_skipped']} file(s), {r['records_skipped']} record(s)"
            if r["files_skipped"] or r["records_skipped"]
            else ""
        ),
        "",
        f"| model | loss (nats/token) | ppl/token | bits/{unit} | ppl/{unit} |",
        "|---|---|---|---|---|",
    ]
    rows = [("this run" + (" (with each document's tags, as trained)" if "untagged" in r else ""), r)]
    if "untagged" in r:
        rows.append(("this run, documents untagged", r["untagged"]))
    rows += [
        ("unigram (training split, add-one)", r["unigram"]),
        ("at initialization", r["init"]),
        ("this run on its validation split", r["val"]),
    ]
    for name, row in rows:
        lines.append(
            f"| {name} | {row['loss']:.4f} | {row['ppl']:.3f} | {row['bits_per_unit']:.4f} | "
            f"{row['ppl_per_unit']:.4g} |"
        )
    gain = 1 - r["ppl"] / r["unigram"]["ppl"]
    lines += ["", f"Perplexity {abs(gain):.1%} {'below' if gain >= 0 else 'above'} the unigram baseline.", ""]
    if r["metrics"]:
        lines += ["## Fresh samples", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in r["metrics"].items()]
        lines.append("")
    if curves:
        lines += ["## Training curves", "", "![curves](curves.png)", ""]
    return "\n".join(lines)
