"""Novelty search speed: the k-mer prefilter + the identity programme behind `protein/median_identity`,
per aligner backend (parasail's SIMD score-only kernel, Bio.Align's score-only, and the named baseline:
Bio.Align's first traceback alignment, the search before the score-only form), and against the
exhaustive search (the query aligned with every training protein), side by side in one run.

    .venv/bin/python benchmarks/novelty_speed.py [--queries 50] [--exhaustive 5] [--samples FASTA]
        [--json benchmarks/novelty_speed.json]

Training sets: the bundled proteomes (E. coli + yeast, ~10^4 proteins, real), and that set ten times
over with 5% of residues substituted at random in each copy (~10^5, for the timing only: copies are
not new proteins). Queries: generated proteins when --samples names a samples.fasta of `multiar
generate`, else real proteins held out of the index with 30% of residues substituted. Exhaustive alignment runs on a subset of queries (it takes seconds each) and
says how often the prefilter found the same nearest identity.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

from multiar.domains import build_domain
from multiar.domains.protein.novelty import (
    BLOSUM62,
    EXTEND,
    OPEN,
    IdentityAligner,
    KmerIndex,
    blosum_letters,
    nearest,
)

LETTERS = "ACDEFGHIKLMNPQRSTVWY"


def mutate(seq: str, rate: float, rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) if rng.random() < rate else c for c in seq)


class TracebackIdentity:
    """The baseline: Bio.Align's first optimal alignment, traced back, and its identities (what the search
    did before the score-only form; any one of the best-scoring alignments, so never more identical)."""

    backend = "traceback (baseline)"

    def __init__(self) -> None:
        from Bio import Align

        self.align = Align.PairwiseAligner(mode="global", substitution_matrix=BLOSUM62)
        self.align.open_gap_score, self.align.extend_gap_score = -OPEN, -EXTEND
        self.align.end_gap_score = 0

    def identities(self, query: str, target: str) -> int:
        return self.align.align(query, target)[0].counts().identities


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--exhaustive", type=int, default=5, help="queries also aligned with every protein")
    parser.add_argument("--samples", type=Path, help="a samples.fasta of generated proteins as queries")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rng = random.Random(0)
    domain = build_domain("protein")
    records = [r for p in domain.default_paths("ecoli+yeast") for r in domain.read(p)]
    rng.shuffle(records)
    held, train = records[: args.queries], records[args.queries :]
    if args.samples:
        from Bio import SeqIO

        queries = [str(r.seq) for r in SeqIO.parse(args.samples, "fasta")][: args.queries]
    else:
        queries = [mutate(str(r.seq).rstrip("*"), 0.3, rng) for r in held]
    base = [str(r.seq).rstrip("*") for r in train]
    results = {
        "queries": len(queries),
        "query_source": str(args.samples or "held-out proteins, 30% substituted"),
    }
    backends: list = [IdentityAligner("biopython"), TracebackIdentity()]
    if IdentityAligner().backend == "parasail":
        backends.insert(0, IdentityAligner("parasail"))
    ids = [str(i) for i in range(len(base))]
    t0 = time.perf_counter()
    index = KmerIndex(base)
    results["1x"] = {"training_proteins": len(base), "training_residues": sum(map(len, base)),
                     "index_build_s": round(time.perf_counter() - t0, 2), "backends": {}}  # fmt: skip
    found_by = {}
    for aligner in backends:  # the same index, queries and candidates: only the identity programme differs
        t1 = time.perf_counter()
        found_by[aligner.backend] = found = nearest(queries, index, ids, aligner=aligner)
        results["1x"]["backends"][aligner.backend] = {
            "ms_per_query": round(1000 * (time.perf_counter() - t1) / len(queries), 2),
            "median_identity": round(statistics.median(i for i, _ in found), 3),
        }
        print("1x", aligner.backend, results["1x"]["backends"][aligner.backend], flush=True)
    exact = [f for b, f in found_by.items() if b != TracebackIdentity.backend]
    results["1x"]["score_only_backends_agree"] = all(f == exact[0] for f in exact)
    results["1x"]["traceback_never_more_identical"] = all(
        t[0] <= e[0] + 1e-12 for t, e in zip(found_by[TracebackIdentity.backend], exact[0], strict=True)
    )
    tenfold = [mutate(s, 0.05, rng) for _ in range(10) for s in base]
    t0 = time.perf_counter()
    index10 = KmerIndex(tenfold)
    t1 = time.perf_counter()
    found = nearest(queries, index10, [str(i) for i in range(len(tenfold))], aligner=backends[0])
    results["10x"] = {
        "training_proteins": len(tenfold),
        "training_residues": sum(map(len, tenfold)),
        "index_build_s": round(t1 - t0, 2),
        "backend": backends[0].backend,
        "ms_per_query": round(1000 * (time.perf_counter() - t1) / len(queries), 2),
        "median_identity": round(statistics.median(i for i, _ in found), 3),
    }
    print("10x", results["10x"], flush=True)
    del index10, tenfold
    # exhaustive: every training protein aligned with the fastest backend; the prefilter's identity is
    # a lower bound of this one (the same programme on fewer targets)
    aligner, letters = backends[0], index.letters
    agree, times, pairs = 0, [], []
    for q, (identity, _) in zip(queries[: args.exhaustive], found_by[aligner.backend], strict=False):
        t0 = time.perf_counter()
        query = blosum_letters(q)
        best = max(aligner.identities(query, t) for t in letters) / len(q)
        times.append(time.perf_counter() - t0)
        agree += abs(best - identity) < 1e-9
        pairs.append((round(identity, 3), round(best, 3)))
    results["exhaustive"] = {
        "backend": aligner.backend,
        "queries": len(times),
        "s_per_query": round(statistics.mean(times), 2),
        "prefilter_found_the_same_identity": f"{agree}/{len(times)}",
        "prefilter_vs_exhaustive_identity": pairs,
    }
    # near copies: training proteins with 10% of residues substituted must find their source
    sources = rng.sample(range(len(base)), 50)
    near = [mutate(base[i], 0.1, rng) for i in sources]
    t0 = time.perf_counter()
    found = nearest(near, index, ids, aligner=backends[0])
    results["near_copies"] = {
        "queries": len(near),
        "source_found": sum(int(f[1]) == i for f, i in zip(found, sources, strict=True)),
        "median_identity": round(statistics.median(f[0] for f in found), 3),
        "s": round(time.perf_counter() - t0, 1),
    }
    print("near copies", results["near_copies"])
    print("exhaustive", results["exhaustive"])
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
