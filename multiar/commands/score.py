"""`multiar score`: one CSV row per document (file, or FASTA record): its log-likelihood, perplexity and bits
per natural unit under a run's model, scored as trained (multiar/engine/scoring.py). Streams: documents
are read, encoded and scored a chunk at a time and their rows appended to the CSV (on disk after every
chunk), so any number of records takes memory of one chunk (and of the largest input file, which is read
whole) and time linear in their number."""

from __future__ import annotations

import csv
import io
import itertools
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from multiar.data.reference import encoded_chunks
from multiar.data.source import Source
from multiar.domain import Domain
from multiar.engine.model import GPT
from multiar.engine.scoring import Documents, score_documents
from multiar.files import Appender
from multiar.run_folder import load_run
from multiar.schema import validate
from multiar.tags import Tagged

log = logging.getLogger("multiar")

CHUNK = 512  # documents read, scored and appended together


def header(domain: Domain, tagged: bool) -> list[str]:
    unit = domain.unit
    head = ["document", "tokens", unit + "s", "log_likelihood", "ppl", f"bits_per_{unit}"]
    return head + (["tags", "untagged_log_likelihood", "untagged_ppl"] if tagged else [])


@dataclass
class Running:
    """What the summary line says: documents scored, tokens and nats over them."""

    documents: int = 0
    tokens: int = 0
    nats: float = 0.0

    def line(self) -> str:
        ppl = math.exp(self.nats / max(self.tokens, 1))
        return f"{self.documents:,} documents, {self.tokens:,} tokens, ppl over all tokens {ppl:.4f}"


def score_chunk(
    model: GPT, domain: Domain, docs: Documents, batch_size: int, tagged: bool, running: Running
) -> str:
    """One chunk's CSV rows (tagged: also the tags and the untagged figures), counted in running."""
    nats = score_documents(model, docs, domain.bos_id, domain.eos_id, batch_size)
    untagged = (
        score_documents(model, docs, domain.bos_id, domain.eos_id, batch_size, conditioned=False)
        if tagged
        else None
    )
    buf = io.StringIO()
    writer = csv.writer(buf)
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
            tags = ",".join(domain.tags_of_ids(docs.conditions[d])) if isinstance(domain, Tagged) else ""
            row += [tags, f"{-untagged[d]:.4f}", f"{math.exp(untagged[d] / tokens):.4f}"]
        writer.writerow(row)
        running.documents, running.tokens, running.nats = (
            running.documents + 1,
            running.tokens + tokens,
            running.nats + nats[d],
        )
    return buf.getvalue()


def score_run(cfg: DictConfig) -> Path:
    """`multiar score`: one CSV row per document (file, or FASTA record): its log-likelihood, perplexity
    and bits per natural unit under the run's model, scored as trained (with its control tags); a tagged
    run's rows also hold the document's tags and its untagged figures. The rows are appended a chunk at
    a time (fsynced), with a running summary on stderr for a run of more than one chunk."""
    cfg = validate("score", cfg)
    run = load_run(cfg.run, device=cfg.device)
    domain = run.domain
    out = Path(cfg.out).expanduser() if cfg.out else run.path / "score.csv"
    source = Source(domain, list(cfg.data.paths))
    chunks = encoded_chunks(domain, source, size=CHUNK, strict=cfg.data.strict)
    first = next(chunks, None)  # nothing is written when there is nothing to score
    if first is None:
        raise ValueError(f"{domain.name}: no document to evaluate in {source.root}")
    if out.exists() and not cfg.overwrite:
        raise FileExistsError(f"{out}: already exists (pass overwrite=true to replace it)")
    # rows grow in out.partial (fsynced per chunk); it replaces out only when every chunk is scored,
    # so a failed run never leaves a short score.csv nor loses the previous one
    partial = out.with_name(out.name + ".partial")
    csv_out, running = Appender(partial, overwrite=True), Running()
    head = io.StringIO()
    tagged = first.tagged  # tags read from the documents: every chunk has them, or none
    csv.writer(head).writerow(header(domain, tagged))
    csv_out.write(head.getvalue())
    for n, docs in enumerate(itertools.chain([first], chunks)):
        csv_out.write(score_chunk(run.model, domain, docs, cfg.batch_size, tagged, running))
        csv_out.sync()  # the rows so far are on disk
        if n:
            print(f"score: {running.line()}", file=sys.stderr, flush=True)
    csv_out.close()
    os.replace(partial, out)
    print(f"{domain.name}: scored {running.documents} documents -> {out} ({running.line()})")
    return out
