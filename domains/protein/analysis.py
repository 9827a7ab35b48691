"""What the protein domain reports about generated sequences: novelty against the training set (the search
is novelty.py's), low-complexity and homopolymer filters, composition and length distances, and the
samples.csv / PNG report beside the FASTA."""

from __future__ import annotations

import csv
import io
import logging
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from multiar.domain import counted_median
from multiar.figures import new_figure, write_png
from multiar.files import write_new_text

from .novelty import Novelty

log = logging.getLogger("multiar")
STANDARD = "ACDEFGHIKLMNPQRSTVWY"
# calibrated on the bundled proteomes: 95% of real proteins have a 12-residue window of at least 1.2
# bits, 98% no run longer than 10
FILTERS = {"min_entropy": 1.2, "entropy_window": 12, "max_homopolymer": 10, "max_identity": 0.95}
FILTER_KEYS = (*FILTERS, "novelty", "candidates", "workers")  # every filters.* key assess reads
CSV_COLUMNS = ("id", "length", "end", "ppl", "identity", "nearest", "tags", "kept", "min_entropy",
               "longest_run", "passes", "rank", "sequence")  # fmt: skip


def min_window_entropy(seq: str, window: int) -> float:
    """The lowest Shannon entropy (bits) of the residues in any window of the sequence (the whole
    sequence when shorter): low values mark low-complexity stretches such as QQQQPQQQ."""
    if not seq:
        return 0.0
    lowest, counts = math.inf, Counter(seq[:window])
    for start in range(max(len(seq) - window, 0) + 1):
        if start:
            counts[seq[start - 1]] -= 1
            counts[seq[start + window - 1]] += 1
        n = min(window, len(seq))
        lowest = min(lowest, -sum(c / n * math.log2(c / n) for c in counts.values() if c))
    return lowest


def longest_run(seq: str) -> int:
    """The length of the longest run of one residue."""
    best = run = 0
    for i, c in enumerate(seq):
        run = run + 1 if i and seq[i - 1] == c else 1
        best = max(best, run)
    return best


def composition_kl(samples: Sequence[str], background: dict[str, float]) -> float | None:
    """KL(generated || training composition) over the 20 standard residues, smoothed; None when empty."""
    return counts_kl(Counter("".join(samples)), background)


def counts_kl(counts: Counter, background: dict[str, float]) -> float | None:
    """composition_kl from the samples' residue counts."""
    total = sum(counts[a] for a in STANDARD)
    if not total:
        return None
    eps = 1e-6
    return sum(
        (counts[a] / total) * math.log((counts[a] / total + eps) / (background.get(a, 0.0) + eps))
        for a in STANDARD
        if counts[a]
    )


def ks_distance(a: Sequence[float], b: Sequence[float]) -> float:
    """The two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs."""
    a, b = np.sort(np.asarray(a, dtype=float)), np.sort(np.asarray(b, dtype=float))
    points = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, points, side="right") / len(a)
    cdf_b = np.searchsorted(b, points, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def counts_ks(a: Counter, b: Counter) -> float:
    """ks_distance of two samples given as value -> count (the same number, without the values)."""
    points = np.array(sorted(set(a) | set(b)), dtype=float)
    cdfs = []
    for counts in (a, b):
        values = np.array(sorted(counts), dtype=float)
        cumulative = np.cumsum([counts[v] for v in sorted(counts)])
        at = np.searchsorted(values, points, side="right")
        cdfs.append(np.where(at > 0, cumulative[np.maximum(at - 1, 0)], 0) / cumulative[-1])
    return float(np.abs(cdfs[0] - cdfs[1]).max())


def check_filters(settings: dict) -> dict:
    """The filter settings with defaults; ValueError naming an unknown key."""
    unknown = sorted(set(settings) - set(FILTER_KEYS))
    if unknown:
        raise ValueError(f"filters: unknown key(s) {', '.join(unknown)}; known: {', '.join(FILTER_KEYS)}")
    return {**FILTERS, "novelty": True, "candidates": 8, "workers": 1, **settings}


def assess(
    samples: Sequence[str],
    details: list[dict],
    settings: dict,
    training: Sequence[tuple[str, str]],
    start: int = 0,
    novelty: Novelty | None = None,
) -> dict[str, float]:
    """Per sample: nearest training identity, lowest window entropy, longest run, whether it passes the
    filters (columns added to details); the share passing and the median novelty as metrics. start:
    the first sample's index (its id); novelty: the search to use (built here when None)."""
    settings = check_filters(dict(settings))
    metrics: dict[str, float] = {}
    if settings["novelty"] and training:
        search = novelty or Novelty(training, settings["candidates"], settings["workers"])
        found = search.search(samples)
        if novelty is None:
            search.close()  # timings go to the log, not generate.json: the same settings write the same files
        for d, (identity, nearest_id) in zip(details, found, strict=True):
            d["identity"], d["nearest"] = round(identity, 4), nearest_id
        metrics["protein/median_identity"] = float(np.median([i for i, _ in found])) if found else 0.0
    for i, (seq, d) in enumerate(zip(samples, details, strict=True), start=start):
        d.setdefault("id", f"multiar_{i:04d}")  # a ranked copy keeps the sample's own id
        d["min_entropy"] = round(min_window_entropy(seq, settings["entropy_window"]), 3)
        d["longest_run"] = longest_run(seq)
        d["passes"] = bool(
            seq
            and d["min_entropy"] >= settings["min_entropy"]
            and d["longest_run"] <= settings["max_homopolymer"]
            and d.get("identity", 0.0) <= settings["max_identity"]
        )
    metrics["protein/pass_rate"] = sum(d["passes"] for d in details) / max(len(details), 1)
    return metrics


def describe(seq: str, details: dict, settings: str) -> str:
    """A FASTA description: length, the sample's details (end, ppl, identity, tags, kept positions,
    filters), 'truncated' when cut at the length cap, then the sampling settings."""
    words = [f"length={len(seq)}"]
    for key in ("end", "ppl", "identity", "nearest", "tags", "kept", "passes", "rank"):
        if details.get(key) not in (None, ""):
            value = details[key]
            words.append(f"{key}={'yes' if value is True else 'no' if value is False else value}")
    if details.get("end") == "max_len" and not details.get("kept"):
        words.append("truncated")
    return " ".join(words + ([settings] if settings else []))


def report(
    samples: Sequence[str],
    details: Sequence[dict],
    out_dir: Path,
    overwrite: bool,
    background: dict[str, float] | None,
    training: Sequence[tuple[str, str]],
    provenance: dict | None = None,
) -> list[Path]:
    """samples.csv (the FASTA descriptions' columns, the sampling settings, the sequence),
    composition.png (residue frequencies, samples vs training), lengths.png and novelty.png."""
    provenance = provenance or {}
    buf = io.StringIO()
    columns = [*CSV_COLUMNS[:-1], *provenance, CSV_COLUMNS[-1]]
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for i, (seq, d) in enumerate(zip(samples, details, strict=True)):
        row = {"id": f"multiar_{i:04d}", "length": len(seq), "sequence": seq, **provenance, **d}
        writer.writerow(row)
    paths = [write_new_text(out_dir / "samples.csv", buf.getvalue(), overwrite)]
    identities = Counter(d["identity"] for d in details if "identity" in d)
    counts = (Counter("".join(samples)), len(samples), Counter(len(s) for s in samples), identities)
    return paths + figures(*counts, background, Counter(len(s) for _, s in training), out_dir, overwrite)


def figures(
    residues: Counter,
    samples: int,
    lengths: Counter,
    identities: Counter,
    background: dict[str, float] | None,
    train_lengths: Counter,
    out_dir: Path,
    overwrite: bool,
) -> list[Path]:
    """composition.png, lengths.png and novelty.png (where any sample was searched), drawn from counts:
    residue -> count, length -> samples, identity -> samples."""
    total = sum(residues[a] for a in STANDARD) or 1
    fig, ax = new_figure(7, 3.2)
    x = np.arange(len(STANDARD))
    ax.bar(x - 0.2, [residues[a] / total for a in STANDARD], 0.4, label=f"samples ({samples})")
    if background:
        ax.bar(x + 0.2, [background.get(a, 0.0) for a in STANDARD], 0.4, label="training")
    ax.set_xticks(x, list(STANDARD))
    ax.set_ylabel("frequency")
    ax.set_title("amino-acid composition")
    ax.legend()
    paths = [write_png(out_dir / "composition.png", fig, overwrite)]

    fig, ax = new_figure(6, 3.2)
    top = max([*lengths, *train_lengths, 1])
    bins = np.linspace(0, min(top, 2000), 41)
    for counts, label in ((train_lengths, "training"), (lengths, "samples")):
        if counts:
            values = np.clip(np.array(list(counts), dtype=float), 0, bins[-1])
            ax.hist(values, bins, weights=list(counts.values()), density=True, alpha=0.5, label=label)
    ax.set_xlabel("length (residues; longer ones in the last bin)")
    ax.set_ylabel("density")
    ax.legend()
    paths.append(write_png(out_dir / "lengths.png", fig, overwrite))

    if identities:
        fig, ax = new_figure(6, 3.2)
        ax.hist(list(identities), np.linspace(0, 1, 21), weights=list(identities.values()))
        ax.axvline(counted_median(identities), color="k", linestyle="--", label="median")
        ax.set_xlabel("identity to the nearest training protein")
        ax.set_ylabel("samples")
        ax.legend()
        paths.append(write_png(out_dir / "novelty.png", fig, overwrite))
    return paths
