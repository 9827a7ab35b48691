"""The novelty search: each generated protein's nearest training protein and their identity. A k-mer index
picks a handful of candidates, and one score-only dynamic programme per candidate gives the identity:
parasail's SIMD kernel where its wheel exists (x86_64), Bio.Align's elsewhere, the same number from both."""

from __future__ import annotations

import logging
import multiprocessing
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
from Bio import Align
from Bio.Align import substitution_matrices

log = logging.getLogger("multiar")
BLOSUM62 = substitution_matrices.load("BLOSUM62")
# BLOSUM62 has no selenocysteine or pyrrolysine; any other letter outside its alphabet counts as X
_LETTERS = {c: "X" for c in range(128) if chr(c) not in BLOSUM62.alphabet} | {ord("U"): "C", ord("O"): "K"}
OPEN, EXTEND = 11, 1  # a gap of k residues scores -(11 + (k - 1)) (Bio.Align's open/extend convention)
PARASAIL_LIMIT = 2**30  # past this a scaled score could leave parasail's 32-bit cells


def blosum_letters(seq: str) -> str:
    return seq.upper().translate(_LETTERS)


class KmerIndex:
    """Training sequences indexed by their 4-mers: a query's candidates are the sequences that share
    the most distinct 4-mers with it, so only a handful need a real alignment."""

    K = 4

    def __init__(self, sequences: Sequence[str]) -> None:
        self.sequences = list(sequences)
        self.letters = [blosum_letters(s) for s in self.sequences]  # translated once, aligned many times
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


class IdentityAligner:
    """Identical residues in the best alignment of a query with a target: BLOSUM62, gaps 11 + (k - 1), free
    end gaps (a sample inside a longer training protein aligns whole: a copied fragment is 100% identical),
    and among the alignments with that best score, the most identical one (one alignment picked by a
    traceback could be any of them). One score-only programme gives it: with every score multiplied by a
    scale above the query's length and 1 added per identical pair, the optimum is scale x (best BLOSUM
    score) + (most identities at that score), so the identities are the optimum modulo the scale.
    backend: "parasail" (SIMD, its wheels are x86_64 only), "biopython", or "auto" (parasail if installed)."""

    def __init__(self, backend: str = "auto") -> None:
        try:
            import parasail
        except ImportError:
            parasail = None
        if backend == "auto":
            backend = "biopython" if parasail is None else "parasail"
        if backend not in ("parasail", "biopython"):
            raise ValueError(f"novelty aligner: unknown backend {backend!r} (parasail, biopython, auto)")
        self.backend, self._parasail = backend, parasail  # the module: not imported again per alignment
        self._scaled: dict[tuple[str, int], Any] = {}  # (backend, scale) -> matrix or aligner

    def identities(self, query: str, target: str) -> int:
        """query, target: in BLOSUM62's letters (`blosum_letters`)."""
        scale = 1 << max(7, len(query).bit_length())  # > len(query) >= identities
        if self.backend == "parasail" and scale * OPEN * (len(query) + len(target)) < PARASAIL_LIMIT:
            matrix = self._scaled.get(("parasail", scale)) or self._parasail_matrix(scale)
            # parasail's best has at least one aligned pair; Bio.Align's may align none (score 0, every
            # residue against a free end gap): the same optimum once a negative one is taken as that
            score = max(
                self._parasail.sg_scan_32(query, target, OPEN * scale, EXTEND * scale, matrix).score, 0
            )
        else:
            align = self._scaled.get(("biopython", scale)) or self._biopython_aligner(scale)
            score = int(round(align.score(query, target)))  # integers well inside a double's 53 bits
        return score % scale  # the optimum is >= 0 and scale > len(query) >= identities

    def _parasail_matrix(self, scale: int) -> Any:
        base = np.asarray(self._parasail.blosum62.matrix)  # parasail's BLOSUM62, the same 24 letters
        matrix = self._parasail.blosum62.copy()
        for i in range(base.shape[0]):
            for j in range(base.shape[1]):
                matrix.set_value(i, j, int(base[i, j]) * scale + (i == j))
        self._scaled["parasail", scale] = matrix
        return matrix

    def _biopython_aligner(self, scale: int) -> Align.PairwiseAligner:
        matrix = BLOSUM62 * scale + np.eye(len(BLOSUM62.alphabet))
        align = Align.PairwiseAligner(mode="global", substitution_matrix=matrix)
        align.open_gap_score, align.extend_gap_score = -OPEN * scale, -EXTEND * scale
        align.end_gap_score = 0
        self._scaled["biopython", scale] = align
        return align


def nearest(
    samples: Sequence[str],
    index: KmerIndex,
    ids: Sequence[str],
    candidates: int = 8,
    aligner: IdentityAligner | None = None,
) -> list[tuple[float, str]]:
    """(identity, training id) of each sample's nearest training sequence: identical aligned residues
    over the sample's length, the highest among the prefilter's candidates (each aligned in full: the
    best-scoring candidate is often not the most identical one, e.g. a long protein)."""
    align = aligner or IdentityAligner()
    out = []
    for seq in samples:
        best = (0.0, "")
        query = blosum_letters(seq)
        for i in index.candidates(seq, candidates) if seq else []:
            best = max(best, (align.identities(query, index.letters[i]) / len(seq), ids[i]))
        out.append(best)
    return out


class Novelty:
    """The novelty search, set up once per run: the k-mer index of the training sequences, and with
    workers > 1 a pool of that many processes (forked: they share the index) searching a batch's
    samples in parallel. `seconds` sums the time spent searching (the log reports it)."""

    def __init__(self, training: Sequence[tuple[str, str]], candidates: int = 8, workers: int = 1) -> None:
        started = time.perf_counter()
        self.index = KmerIndex([s for _, s in training])
        self.ids = [i for i, _ in training]
        self.aligner = IdentityAligner()
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
            found = nearest(samples, self.index, self.ids, self.candidates, self.aligner)
        self.seconds += time.perf_counter() - started
        self.searched += len(samples)
        return found

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None
        log.info(
            "protein: novelty search over %d training proteins (%s): index %.2f s, %.1f ms per sample",
            len(self.ids),
            self.aligner.backend,
            self.built,
            1000 * self.seconds / max(self.searched, 1),
        )


_SEARCH: Novelty | None = None


def _search_part(samples: Sequence[str]) -> list[tuple[float, str]]:
    assert _SEARCH is not None
    return nearest(samples, _SEARCH.index, _SEARCH.ids, _SEARCH.candidates, _SEARCH.aligner)
