"""Novelty search speed: the k-mer prefilter + Bio.Align search behind `protein/median_identity`, against
the exhaustive baseline (align the query with every training protein), side by side in one run.

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
from multiar.domains.protein.analysis import KmerIndex, _blosum_letters, aligner, nearest

LETTERS = "ACDEFGHIKLMNPQRSTVWY"


def mutate(seq: str, rate: float, rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) if rng.random() < rate else c for c in seq)


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
    for label, seqs in (("1x", base), ("10x", [mutate(s, 0.05, rng) for _ in range(10) for s in base])):
        ids = [str(i) for i in range(len(seqs))]
        t0 = time.perf_counter()
        index = KmerIndex(seqs)
        t1 = time.perf_counter()
        found = nearest(queries, index, ids)
        t2 = time.perf_counter()
        results[label] = {
            "training_proteins": len(seqs),
            "training_residues": sum(map(len, seqs)),
            "index_build_s": round(t1 - t0, 2),
            "ms_per_query": round(1000 * (t2 - t1) / len(queries), 1),
            "median_identity": round(statistics.median(i for i, _ in found), 3),
        }
        print(label, results[label], flush=True)
    # the baseline: every training protein aligned (score only, then the best one's identity)
    align = aligner()
    agree, times, pairs = 0, [], []
    for q, (identity, _) in zip(
        queries[: args.exhaustive],
        nearest(queries[: args.exhaustive], KmerIndex(base), [str(i) for i in range(len(base))]),
        strict=True,
    ):
        t0 = time.perf_counter()
        best = max(
            (align.align(_blosum_letters(q), _blosum_letters(s))[0].counts().identities / len(q), i)
            for i, s in enumerate(base)
            if abs(len(s) - len(q)) < 10 * len(q)
        )
        times.append(time.perf_counter() - t0)
        agree += abs(best[0] - identity) < 1e-9
        pairs.append((round(identity, 3), round(best[0], 3)))
    results["exhaustive"] = {
        "queries": len(times),
        "s_per_query": round(statistics.mean(times), 2),
        "prefilter_found_the_same_identity": f"{agree}/{len(times)}",
        "prefilter_vs_exhaustive_identity": pairs,
    }
    # near copies: training proteins with 10% of residues substituted must find their source
    sources = rng.sample(range(len(base)), 50)
    near = [mutate(base[i], 0.1, rng) for i in sources]
    t0 = time.perf_counter()
    found = nearest(near, KmerIndex(base), [str(i) for i in range(len(base))])
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
