"""What the protein domain reports about generated sequences: novelty against the training set (a k-mer
index, then Bio.Align on the few best candidates), low-complexity and homopolymer filters, composition
and length distances, and the samples.csv / PNG report beside the FASTA."""

from __future__ import annotations

import csv
import io
import logging
import math
import multiprocessing
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from Bio import Align
from Bio.Align import substitution_matrices

from multiar.domain import counted_median
from multiar.figures import new_figure, write_png
from multiar.files import write_new_text

log = logging.getLogger("multiar")
STANDARD = "ACDEFGHIKLMNPQRSTVWY"
# calibrated on the bundled proteomes: 95% of real proteins have a 12-residue window of at least 1.2
# bits, 98% no run longer than 10
FILTERS = {"min_entropy": 1.2, "entropy_window": 12, "max_homopolymer": 10, "max_identity": 0.95}
FILTER_KEYS = (*FILTERS, "novelty", "candidates", "workers")  # every filters.* key assess reads
CSV_COLUMNS = ("id", "length", "end", "ppl", "identity", "nearest", "tags", "kept", "min_entropy",
               "longest_run", "passes", "rank", "sequence")  # fmt: skip


class KmerIndex:
    """Training sequences indexed by their 4-mers: a query's candidates are the sequences that share
    the most distinct 4-mers with it, so only a handful need a real alignment."""

    K = 4

    def __init__(self, sequences: Sequence[str]) -> None:
        self.sequences = list(sequences)
        codes = [np.unique(self._codes(s)) for s in self.sequences]
        owner = np.repeat(np.arange(len(codes), dtype=np.int32), [len(c) for c in codes])
        flat = np.concatenate(codes) if codes else np.zeros(0, dtype=np.int64)
        order = np.argsort(flat, kind="stable")
        self.postings = owner[order]  # sequence indices grouped by k-mer code
        self.starts = np.searchsorted(flat[order], np.arange(26**self.K + 1))

    @classmethod
    def _codes(cls, seq: str) -> np.ndarray:
        letters = np.frombuffer(seq.encode("ascii", "replace"), dtype=np.uint8)
        digits = (np.clip(letters, 65, 90) - 65).astype(np.int64)  # A..Z -> 0..25
        if len(digits) < cls.K:
            return np.zeros(0, dtype=np.int64)
        codes = np.zeros(len(digits) - cls.K + 1, dtype=np.int64)
        for j in range(cls.K):
            codes = codes * 26 + digits[j : len(digits) - cls.K + 1 + j]
        return codes

    def candidates(self, seq: str, n: int) -> list[int]:
        """Indices of the n training sequences sharing the most distinct k-mers with seq."""
        codes = np.unique(self._codes(seq))
        if not len(codes) or not len(self.sequences):
            return list(range(min(n, len(self.sequences))))
        hits = np.concatenate([self.postings[self.starts[c] : self.starts[c + 1]] for c in codes])
        shared = np.bincount(hits, minlength=len(self.sequences))
        best = np.argpartition(-shared, min(n, len(shared)) - 1)[:n]
        return [int(i) for i in best[np.argsort(-shared[best], kind="stable")]]


def aligner() -> Align.PairwiseAligner:
    """BLOSUM62, gap open 11 / extend 1, free end gaps: a sample inside a longer training protein aligns
    whole (a copied fragment is 100% identical, not diluted by the rest of the protein)."""
    a = Align.PairwiseAligner(mode="global", substitution_matrix=substitution_matrices.load("BLOSUM62"))
    a.open_gap_score, a.extend_gap_score = -11, -1
    a.end_gap_score = 0
    return a


def _blosum_letters(seq: str) -> str:
    return seq.replace("U", "C").replace("O", "K")  # BLOSUM62 has no selenocysteine or pyrrolysine


def nearest(
    samples: Sequence[str], index: KmerIndex, ids: Sequence[str], candidates: int = 8
) -> list[tuple[float, str]]:
    """(identity, training id) of each sample's nearest training sequence: identical aligned residues
    over the sample's length, the highest among the prefilter's candidates (each aligned in full: the
    best-scoring alignment is often not the most identical one, e.g. against a long protein)."""
    align = aligner()
    out = []
    for seq in samples:
        best = (0.0, "")
        query = _blosum_letters(seq)
        for i in index.candidates(seq, candidates) if seq else []:
            alignment = align.align(query, _blosum_letters(index.sequences[i]))[0]
            best = max(best, (alignment.counts().identities / len(seq), ids[i]))
        out.append(best)
    return out


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


class Novelty:
    """The novelty search, set up once per run: the k-mer index of the training sequences, and with
    workers > 1 a pool of that many processes (forked: they share the index) searching a batch's
    samples in parallel. `seconds` sums the time spent searching (the log reports it)."""

    def __init__(self, training: Sequence[tuple[str, str]], candidates: int = 8, workers: int = 1) -> None:
        started = time.perf_counter()
        self.index = KmerIndex([s for _, s in training])
        self.ids = [i for i, _ in training]
        self.candidates, self.workers = candidates, max(int(workers), 1)
        self.built, self.seconds, self.searched = time.perf_counter() - started, 0.0, 0
        self.pool: Any = None

    def search(self, samples: Sequence[str]) -> list[tuple[float, str]]:
        started = time.perf_counter()
        if self.workers > 1 and len(samples) > 1:
            if self.pool is None:
                global _SEARCH
                _SEARCH = self  # what the forked workers find
                context = multiprocessing.get_context("fork")
                self.pool = ProcessPoolExecutor(self.workers, mp_context=context)
            chunks = [samples[i :: self.workers] for i in range(self.workers)]
            parts = list(self.pool.map(_search_part, chunks))
            found = [parts[i % self.workers][i // self.workers] for i in range(len(samples))]
        else:
            found = nearest(samples, self.index, self.ids, self.candidates)
        self.seconds += time.perf_counter() - started
        self.searched += len(samples)
        return found

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None
        log.info(
            "protein: novelty search over %d training proteins: index %.2f s, %.1f ms per sample",
            len(self.ids),
            self.built,
            1000 * self.seconds / max(self.searched, 1),
        )


_SEARCH: Novelty | None = None


def _search_part(samples: Sequence[str]) -> list[tuple[float, str]]:
    assert _SEARCH is not None
    return nearest(samples, _SEARCH.index, _SEARCH.ids, _SEARCH.candidates)


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
