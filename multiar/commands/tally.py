"""What generate accumulates over its samples instead of keeping them (Tally): counts for the report's
metrics, the domain's summary, and the ranking: a bounded heap of the best with top=K, else (perplexity,
index) pairs spilled to a file beside the samples, ranked once at the end."""

from __future__ import annotations

import heapq
import struct
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from multiar.domain import MetricSummary
from multiar.engine.speculative import SpeculativeStats


@dataclass
class Tally:
    """What generate accumulates over the samples instead of keeping them: counts for the report's
    metrics, the domain's summary, the best samples for ranking (a bounded heap with top=K; without
    top, generate spills (ppl, index) pairs to the RANKS file instead). Pickled into the journal after
    every batch: nothing in it grows with the number of samples but the ppl counts (3 decimals)."""

    summary: MetricSummary
    done: int = 0
    tokens: int = 0  # sampled by this process (the progress line's rate)
    new_tokens: int = 0
    dropped: int = 0
    eos: int = 0
    cut: int = 0  # unfinished samples cut back to a valid prefix (unfinished=cut)
    ppl: Counter = field(default_factory=Counter)  # ppl (3 decimals, as written) -> samples
    token_errors: int = 0
    assessed: dict[str, float] = field(default_factory=dict)  # assess metrics x batch size, summed
    best: list[tuple] = field(default_factory=list)  # heap of (-ppl, -index, artifact, details)
    redrawn: int = 0
    invalid: int = 0
    middles: list[Any] = field(default_factory=list)  # fill-in-the-middle: the first MIDDLES, for the report
    ranks_size: int = 0  # the spilled (ppl, index) pairs' file size at the last sync (rank_by without top)
    spec: SpeculativeStats = field(default_factory=SpeculativeStats)
    sizes: dict[str, int] = field(default_factory=dict)  # appended files' sizes at the last sync
    last_paths: list[str] = field(default_factory=list)  # the files the last batch wrote
    layout: tuple[str, str] | None = None  # (dtype, layout) the run decodes with: a resume pins them
    kernels: dict[str, str] | None = None  # a quantized run's kernel per layer shape: pinned too
    cpu: str | None = None  # the CPU it decoded on (precision.cpu_model): named when a resume is refused
    gemms: str | None = None  # a compiled CPU step's GEMMs (engine.ahead_of_time, at its first step): pinned


MIDDLES = 100  # middles the report lists; every one is in the files
RANKS = "generate.resume.ranks"  # the spilled pairs, removed when the run ends
PAIR = struct.Struct("<dq")  # ppl, index: 16 bytes a passing sample
PAIRS = np.dtype([("ppl", "<f8"), ("index", "<i8")])


def spill_pairs(ppls: Sequence[float], indices: Sequence[int], details: Sequence[dict]) -> bytes:
    """The (ppl, index) pairs of the samples that pass the filters, packed to append to the RANKS file."""
    return b"".join(
        PAIR.pack(ppl, i) for ppl, i, d in zip(ppls, indices, details, strict=True) if d.get("passes", True)
    )


class RankMap(Mapping[int, int]):
    """Sample index -> rank (1 = lowest perplexity, ties: the earlier sample) of the pairs in a RANKS
    file: 4 bytes per sample index up to the largest ranked (no dict of n entries)."""

    def __init__(self, path: Path) -> None:
        pairs = np.fromfile(path, dtype=PAIRS) if path.exists() else np.zeros(0, PAIRS)
        order = np.lexsort((pairs["index"], pairs["ppl"]))
        self.rank = np.zeros(int(pairs["index"].max()) + 1 if len(pairs) else 0, dtype=np.int32)
        self.rank[pairs["index"][order]] = np.arange(1, len(pairs) + 1, dtype=np.int32)
        self.count = len(pairs)

    def __getitem__(self, index: int) -> int:
        if not (0 <= index < len(self.rank) and self.rank[index]):
            raise KeyError(index)
        return int(self.rank[index])

    def __contains__(self, index: object) -> bool:
        return isinstance(index, int) and 0 <= index < len(self.rank) and bool(self.rank[index])

    def __iter__(self) -> Iterator[int]:
        return iter(np.flatnonzero(self.rank).tolist())

    def __len__(self) -> int:
        return self.count


def keep_best(tally: Tally, top: int | None, ppl: float, i: int, artifact: Any, details: dict) -> None:
    """Ranking's candidates: the top lowest-perplexity samples that pass the filters (all with top unset)."""
    if not details.get("passes", True):
        return
    entry = (-ppl, -i, artifact, details)
    if top is None or len(tally.best) < top:
        heapq.heappush(tally.best, entry)
    elif entry[:2] > tally.best[0][:2]:
        heapq.heapreplace(tally.best, entry)


def ranked(tally: Tally) -> list[tuple]:
    """The ranking's (artifact, details, index), lowest perplexity first (ties: the earlier sample);
    each details gets its 1-based `rank`."""
    order = sorted(tally.best, key=lambda e: (-e[0], -e[1]))
    for rank, entry in enumerate(order, start=1):
        entry[3]["rank"] = rank
    return [(e[2], e[3], -e[1]) for e in order]
