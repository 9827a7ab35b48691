"""`multiar eval` and `multiar score`: how good is a trained model, in tokens and in the domain's own unit.

eval: per-token loss and perplexity on files (default: the run's own validation split, from
run_dir/reference/), bits per byte / residue / note, the same for the validation split, two baselines on
the same documents (the training split's add-one unigram model, the model at initialization), the domain
metrics of fresh samples; eval.json, eval.md and curves.png. score: the same per document, as a CSV.

Each document is scored on its own ([BOS] ids [EOS], in windows of block_size + 1 like training's packing),
so a document's figure never depends on which others are evaluated with it.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from multiar.data import is_validation
from multiar.domain import Domain, Skips, write_new_file, write_new_text
from multiar.figures import new_figure, png_bytes
from multiar.generate_files import unprompted_samples
from multiar.model import GPT, ModelConfig
from multiar.reference import read_reference, unigram_log_probs, unigram_nats
from multiar.run_folder import Run, load_run
from multiar.schema import validate
from multiar.scoring import document_nats
from multiar.source import Source

log = logging.getLogger("multiar")


@dataclass
class Documents:
    keys: list[str]
    ids: list[list[int]]
    units: list[int]
    files_skipped: int = 0
    records_skipped: int = 0


def read_documents(
    domain: Domain, source: Source, wanted: Callable[[str], bool] | None = None, strict: bool = False
) -> Documents:
    """Encoded documents of source (those whose key is wanted, when given); unreadable files and
    records the tokenizer cannot encode are skipped and counted, as in training."""
    skips, bad = Skips(), Skips()
    docs = Documents([], [], [])
    for key, record in source.records(skips, strict):
        if wanted is not None and not wanted(key):
            continue
        bad.seen += 1
        try:
            ids, units = domain.encode(record), domain.units(record)
        except Exception as err:  # a tokenizer library's failure on one record is that record's
            if strict:
                raise ValueError(f"{key}: cannot encode: {err} (data.strict=true)") from err
            bad.skip(key, f"{type(err).__name__}: {err}")
            continue
        docs.keys.append(key)
        docs.ids.append(ids)
        docs.units.append(units)
    if skips.count or bad.count:
        log.info("%s: %s; %s", domain.name, skips.summary(source.unit), bad.summary("records"))
    docs.files_skipped, docs.records_skipped = skips.count, bad.count
    if not docs.ids:
        raise ValueError(f"{domain.name}: no document to evaluate in {source.root}")
    return docs


def summary(nats: list[float], docs: Documents, unit: str) -> dict[str, Any]:
    """Loss per token, perplexity, bits and perplexity per natural unit of a set of documents."""
    total, tokens, units = sum(nats), sum(len(i) + 1 for i in docs.ids), sum(docs.units)
    return {
        "loss": total / tokens,
        "ppl": math.exp(total / tokens),
        "bits_per_unit": total / max(units, 1) / math.log(2),
        "ppl_per_unit": math.exp(total / max(units, 1)),
        "unit": unit,
        "tokens": tokens,
        "units": units,
        "documents": len(docs.ids),
    }


def validation_documents(run: Run, strict: bool = False) -> Documents:
    """The run's own validation split: the documents it stored the keys of at training time (or, for a
    streamed run, those of its input whose key hashes into validation)."""
    ref = read_reference(run.path)["validation"]
    if "hf_dataset" in ref:
        hf = ref["hf_dataset"]
        source = Source(run.domain, hf_dataset=hf["name"], hf_column=hf["column"], hf_split=hf["split"])
    else:
        root = Path(ref["root"])
        missing = [f for f in ref["files"] if not (root / f).exists()]
        if missing:
            raise FileNotFoundError(
                f"{root / missing[0]}: a validation file of {run.path} is gone ({len(missing)} missing)"
            )
        source = Source(run.domain, [str(root / f) for f in ref["files"]])
        source.root = str(root)  # keys relative to the training input's folder, as stored
    if ref["keys"] is None:
        fraction = float(ref["val_fraction"])
        docs = read_documents(run.domain, source, lambda k: is_validation(k, fraction), strict)
    else:
        keys = set(ref["keys"])
        docs = read_documents(run.domain, source, keys.__contains__, strict)
        if len(docs.keys) != len(keys):
            log.warning(
                "%s: %d of %d validation documents found (files changed since training?)",
                run.path,
                len(docs.keys),
                len(keys),
            )
    return docs


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


def eval_run(cfg: DictConfig) -> dict[str, Any]:
    """`multiar eval`: eval.json, eval.md and curves.png in cfg.out (default run_dir/eval/)."""
    cfg = validate("eval", cfg)
    run = load_run(cfg.run, device=cfg.device)
    domain, unit = run.domain, run.domain.unit
    out = Path(cfg.out).expanduser() if cfg.out else run.path / "eval"
    if (out / "eval.json").exists() and not cfg.overwrite:
        raise FileExistsError(f"{out / 'eval.json'}: already exists (overwrite=true replaces it)")
    val_docs = validation_documents(run, cfg.data.strict)
    if cfg.data.paths:
        docs = read_documents(domain, Source(domain, list(cfg.data.paths)), strict=cfg.data.strict)
        source = [str(p) for p in cfg.data.paths]
    else:
        docs, source = val_docs, "the run's validation split"
    nats = document_nats(run.model, docs.ids, domain.bos_id, domain.eos_id, cfg.batch_size)
    result = summary(nats, docs, unit) | {
        "data": source,
        "files_skipped": docs.files_skipped,
        "records_skipped": docs.records_skipped,
    }
    log_probs = unigram_log_probs(np.asarray(read_reference(run.path)["unigram"]["counts"]))
    result["unigram"] = summary([unigram_nats(log_probs, ids, domain.eos_id) for ids in docs.ids], docs, unit)
    result["init"] = summary(
        document_nats(init_model(run), docs.ids, domain.bos_id, domain.eos_id, cfg.batch_size), docs, unit
    )
    result["val"] = (
        summary(
            document_nats(run.model, val_docs.ids, domain.bos_id, domain.eos_id, cfg.batch_size),
            val_docs,
            unit,
        )
        if cfg.data.paths
        else {
            k: result[k]
            for k in ("loss", "ppl", "bits_per_unit", "ppl_per_unit", "unit", "tokens", "units", "documents")
        }
    )
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
    print(
        f"{domain.name}: ppl {result['ppl']:.3f}/token, {result['bits_per_unit']:.3f} bits/{unit} on "
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
    for name, row in (
        ("this run", r),
        ("unigram (training split, add-one)", r["unigram"]),
        ("at initialization", r["init"]),
        ("this run on its validation split", r["val"]),
    ):
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


def score_run(cfg: DictConfig) -> Path:
    """`multiar score`: one CSV row per document (file, or FASTA record): its log-likelihood, perplexity
    and bits per natural unit under the run's model."""
    cfg = validate("score", cfg)
    run = load_run(cfg.run, device=cfg.device)
    domain = run.domain
    docs = read_documents(domain, Source(domain, list(cfg.data.paths)), strict=cfg.data.strict)
    nats = document_nats(run.model, docs.ids, domain.bos_id, domain.eos_id, cfg.batch_size)
    out = Path(cfg.out).expanduser() if cfg.out else run.path / "score.csv"
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(
        ["document", "tokens", domain.unit + "s", "log_likelihood", "ppl", f"bits_per_{domain.unit}"]
    )
    for key, ids, units, value in zip(docs.keys, docs.ids, docs.units, nats, strict=True):
        tokens = len(ids) + 1
        writer.writerow(
            [
                key,
                tokens,
                units,
                f"{-value:.4f}",
                f"{math.exp(value / tokens):.4f}",
                f"{value / max(units, 1) / math.log(2):.4f}",
            ]
        )
    write_new_text(out, buf.getvalue(), overwrite=cfg.overwrite)
    print(f"{domain.name}: scored {len(docs.keys)} documents -> {out}")
    return out
