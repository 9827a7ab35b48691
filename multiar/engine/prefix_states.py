"""Per-row state for a logits processor, kept per ids prefix so that rolled-back tokens roll it back.

A grammar that needs more than the last token (code's open brackets, music's bar position) keeps a
state per row. Processors are functions of the ids they are given: speculative decoding hands them
draft tokens that may be rejected, and rows come and go between batches. So the state is cached by the
ids it was built from; a row's call finds the longest cached prefix of its ids and extends that
state by the new ids, or builds it from scratch when nothing cached is a prefix (a rollback past the
cache, a new row).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

S = TypeVar("S")


class PrefixStates(Generic[S]):
    """state_of(ids): build(ids) the first time, then extend(copy of a cached state, new ids)."""

    def __init__(
        self,
        build: Callable[[list[int]], S],
        extend: Callable[[S, list[int]], S],
        keep: int = 64,
    ) -> None:
        self.build, self.extend, self.keep = build, extend, keep
        self.cache: list[tuple[list[int], S]] = []  # recent (ids, state) of every row, newest last

    def state_of(self, ids: list[int]) -> S:
        best = None
        for c in reversed(self.cache):  # newest first; a decode step extends its row's entry by one id
            n = len(c[0])
            # the last id is compared first: the full comparison only where it already matches
            if n <= len(ids) and (best is None or n > len(best[0])) and c[0][-1:] == ids[n - 1 : n]:
                if ids[:n] != c[0]:
                    continue
                best = c
                if n >= len(ids) - 1:
                    break
        if best is None:
            state = self.build(ids)
        else:
            state = self.extend(best[1], ids[len(best[0]) :]) if len(best[0]) < len(ids) else best[1]
            self.cache.remove(best)
        self.cache.append((list(ids), state))
        del self.cache[: -self.keep]
        return state
