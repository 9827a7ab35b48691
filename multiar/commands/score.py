"""`multiar score`: one CSV row per document (file, or FASTA record): its log-likelihood, perplexity and bits
per natural unit under a run's model, scored as trained (multiar/engine/scoring.py)."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from omegaconf import DictConfig

from multiar.data.reference import (
    read_documents,
)
from multiar.data.source import Source
from multiar.engine.scoring import score_documents
from multiar.files import write_new_text
from multiar.run_folder import load_run
from multiar.schema import validate


def score_run(cfg: DictConfig) -> Path:
    """`multiar score`: one CSV row per document (file, or FASTA record): its log-likelihood, perplexity
    and bits per natural unit under the run's model, scored as trained (with its control tags); a tagged
    run's rows also hold the document's tags and its untagged figures."""
    cfg = validate("score", cfg)
    run = load_run(cfg.run, device=cfg.device)
    domain = run.domain
    docs = read_documents(domain, Source(domain, list(cfg.data.paths)), strict=cfg.data.strict)
    nats = score_documents(run.model, docs, domain.bos_id, domain.eos_id, cfg.batch_size)
    untagged = (
        score_documents(run.model, docs, domain.bos_id, domain.eos_id, cfg.batch_size, conditioned=False)
        if docs.tagged
        else None
    )
    out = Path(cfg.out).expanduser() if cfg.out else run.path / "score.csv"
    buf = io.StringIO()
    writer = csv.writer(buf)
    unit = domain.unit
    header = ["document", "tokens", unit + "s", "log_likelihood", "ppl", f"bits_per_{unit}"]
    if untagged is not None:
        header += ["tags", "untagged_log_likelihood", "untagged_ppl"]
    writer.writerow(header)
    for d, (key, ids, units) in enumerate(zip(docs.keys, docs.ids, docs.units, strict=True)):
        tokens = len(ids) + 1
        row = [
            key,
            tokens,
            units,
            f"{-nats[d]:.4f}",
            f"{math.exp(nats[d] / tokens):.4f}",
            f"{nats[d] / max(units, 1) / math.log(2):.4f}",
        ]
        if untagged is not None:
            tags = ",".join(domain.tags_of_ids(docs.conditions[d]))
            row += [tags, f"{-untagged[d]:.4f}", f"{math.exp(untagged[d] / tokens):.4f}"]
        writer.writerow(row)
    write_new_text(out, buf.getvalue(), overwrite=cfg.overwrite)
    print(f"{domain.name}: scored {len(docs.keys)} documents -> {out}")
    return out
