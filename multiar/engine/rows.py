"""The per-row side of decoding, in one place for plain sampling (`decode.stream`) and speculative decoding:
each row's ids (on the device), id and cache counts, logits processors and min_new_tokens applied per
row, stop sequences with the tokens held back for them, should_stop rules, end reasons and the sliding
window's tails. A decode loop owns the model calls; `Rows` owns what happens to each row. Knows no domain.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from multiar.engine.checked_draw import TokenCheck, checked_sample
from multiar.engine.sampling import LogitsProcessor, apply_processors, sample


class Token(NamedTuple):
    """One streamed event: row `row` produced `token`; token None means the row has finished, and
    `end` says why: "eos", "stop" (a stop sequence), "length" (max_new_tokens) or "no_valid_token"
    (the logits processors banned every token)."""

    row: int
    token: int | None
    end: str | None = None


def as_rows(prompt: Tensor | Sequence[Sequence[int]]) -> list[list[int]]:
    """Prompts as lists of ids: a (B, T) tensor or a list of (possibly different-length) id lists."""
    rows = prompt.tolist() if isinstance(prompt, Tensor) else [list(map(int, r)) for r in prompt]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("the prompt is empty: each row needs at least a BOS token")
    return rows


def extend_row(row: list[int], token: int, eos_id: int | None, stops: Sequence[list[int]]) -> bool:
    """Append token to a row's new ids unless it is EOS, and drop a stop sequence the row now ends with;
    returns whether the row has ended (EOS or a stop)."""
    if eos_id is not None and token == eos_id:
        return True
    row.append(token)
    for s in stops:
        if row[-len(s) :] == s:
            del row[-len(s) :]
            return True
    return False


def process_row(
    processors: Sequence[LogitsProcessor], ids: Tensor, logits: Tensor, ban_eos: int | None
) -> Tensor:
    """One row's processors on its logits (1, V) given its ids (1, n), then EOS banned (ban_eos: its id,
    while the row is under min_new_tokens): the per-row step of `Rows.process_rows`, and of a server's
    checked row on its worker."""
    for process in processors:
        logits = process(ids, logits)
    if ban_eos is not None:
        logits = logits.clone()
        logits[:, ban_eos] = float("-inf")
    return logits


def flatten_banned(logits: Tensor) -> tuple[Tensor, Tensor]:
    """logits (B, V) with a row whose every token is banned made flat (its probabilities would be NaN),
    and those rows' flags (B,)."""
    banned = torch.isneginf(logits).all(dim=-1, keepdim=True)
    return logits.masked_fill(banned, 0.0), banned[:, 0]


def window_tail(ids: list[int], keep: int, window_starts: Sequence[bool] | None = None) -> list[int]:
    """The last `keep` ids as a training window past a document's first begins: no BOS or tags put
    back; with window_starts (per id), from the first id a window may start at, when one is there."""
    tail = ids[-keep:]
    if window_starts is not None:
        first = next((j for j, i in enumerate(tail) if 0 <= i < len(window_starts) and window_starts[i]), 0)
        tail = tail[first:]
    return tail


@dataclass
class RowSettings:
    """One row's own settings, for a slot engine whose rows serve different requests: what Rows' shared
    arguments set for every row otherwise. should_stop(new ids) is the row's own rule."""

    max_new_tokens: int
    min_new_tokens: int = 0
    stop: Sequence[Sequence[int]] = ()
    processors: Sequence[LogitsProcessor] = ()
    should_stop: Callable[[list[int]], bool] | None = None

    def __post_init__(self) -> None:
        self.stop = [list(s) for s in self.stop if len(s)]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.checks = token_checks(self.processors)


def token_checks(processors: Sequence[LogitsProcessor]) -> list[TokenCheck]:
    """The processors that also judge single tokens (a grammar), found once: an isinstance of a
    runtime-checkable Protocol costs microseconds, which a check asked every token would pay again."""
    return [p for p in processors if isinstance(p, TokenCheck)]


class Counts:
    """A count per row (ids so far, filled cache slots): read on the host as `values`, on the device as
    `tensor`. A step that moves every row by one amount updates the device copy there, with no
    transfer; other changes (a slide, rows accepting different numbers of tokens) copy it over."""

    def __init__(self, values: Sequence[int], device: torch.device):
        self.device = device
        self.set(values)

    def set(self, values: Sequence[int]) -> None:
        """Every row's count anew."""
        self.values = list(values)
        self.tensor = torch.tensor(self.values, device=self.device)

    def add(self, step: int | Sequence[int]) -> None:
        """Move every row by step (one int), or each row by its own amount."""
        if isinstance(step, int):
            self.values = [v + step for v in self.values]
            self.tensor = self.tensor + step
        else:
            self.set([v + s for v, s in zip(self.values, step, strict=True)])

    @property
    def aligned(self) -> bool:
        """Whether every row has the same count (the model's int-position path: slices, no gathers)."""
        return min(self.values) == max(self.values)


class Rows:
    """A batch of rows being continued: ids (B, width) on the device, `length` ids per row, `cache`
    slots filled per row, and on the host each row's new ids (`new`, without EOS or a matched stop)
    and why it ended (`ends`, None while it runs). Processors and min_new_tokens apply per row; `push`
    ends a row on EOS, a stop sequence, should_stop or max_new_tokens; `events` streams a row's
    tokens, holding back as many as the longest stop sequence minus one. Rows are indexed 0..B-1
    throughout, so a slot engine can end (`end`) or refill one row while the others run."""

    def __init__(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        *,
        device: torch.device,
        width: int,
        eos_id: int | None = None,
        stop: Sequence[Sequence[int]] = (),
        min_new_tokens: int = 0,
        processors: Sequence[LogitsProcessor] = (),
        should_stop: Callable[[int, list[int]], bool] | None = None,
    ):
        self.max_new_tokens, self.eos_id, self.min_new_tokens = max_new_tokens, eos_id, min_new_tokens
        self.processors, self.should_stop = list(processors), should_stop
        self.shared_checks = token_checks(self.processors)
        self.stops = [list(s) for s in stop if len(s)]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.prompt_lens = [len(p) for p in prompts]
        self.seq = torch.zeros(len(prompts), width, dtype=torch.long, device=device)  # row b at [0, length_b)
        for b, p in enumerate(prompts):
            self.seq[b, : len(p)] = torch.tensor(p)
        self.length = Counts(self.prompt_lens, device)
        self.cache = Counts(self.prompt_lens, device)
        self.finished_t = torch.zeros(len(prompts), dtype=torch.bool, device=device)
        self.index = torch.arange(len(prompts), device=device)  # to write each row at its own position
        self.new: list[list[int]] = [[] for _ in prompts]
        self.ends: list[str | None] = [None] * len(prompts)
        self.sent = [0] * len(prompts)  # new ids of each row already streamed
        self.own: list[RowSettings | None] = [None] * len(prompts)  # a row's own settings (refill)
        self.failed: dict[int, str] = {}  # rows whose stop rule raised (append_rows): the error

    @property
    def done(self) -> bool:
        """Whether every row has ended."""
        return all(e is not None for e in self.ends)

    def last_index(self, counts: Counts) -> Tensor | None:
        """Each row's last filled index (B,) for a ragged prefill; None when the rows are aligned."""
        return None if counts.aligned else counts.tensor - 1

    def process(self, logits: Tensor, extra: int = 0) -> tuple[Tensor, Tensor | None]:
        """Run the processors and min_new_tokens on logits (B, V) for the next id after each row's ids
        and `extra` more already written after them (a speculative draft's); the processed logits, with
        a row whose every token is banned made flat (its probabilities would be NaN), and those rows
        (B,) flags, or None when nothing can ban (no processors, min_new_tokens met)."""
        lengths = [n + extra for n in self.length.values]
        if self.processors:
            if self.length.aligned:
                logits = apply_processors(self.processors, self.seq[:, : lengths[0]], None, logits)
            else:
                logits = apply_processors(self.processors, self.seq, lengths, logits)
        early = (
            self.eos_id is not None
            and self.min_new_tokens > 0
            and min(lengths) < max(self.prompt_lens) + self.min_new_tokens
        )
        if early:
            logits, early = self.ban_early_eos(logits, lengths)
        if not (self.processors or early):
            return logits, None
        return flatten_banned(logits)

    def ban_early_eos(self, logits: Tensor, lengths: list[int]) -> tuple[Tensor, bool]:
        """logits with EOS banned for the rows under min_new_tokens new ids, given each row's ids
        count; whether any was."""
        early = [n - p < self.min_new_tokens for n, p in zip(lengths, self.prompt_lens, strict=True)]
        if all(early):
            logits[:, self.eos_id] = float("-inf")
        elif any(early):
            logits = logits.clone()
            logits[torch.tensor(early, device=logits.device), self.eos_id] = float("-inf")
        return logits, any(early)

    def refill(self, b: int, prompt: Sequence[int], settings: RowSettings | None = None) -> None:
        """Row b starts over with a new prompt (a slot engine's next request joins where a row ended):
        its ids, counts and end state are reset; its cache rows must be prefilled from position 0 by the
        caller (`cache` counts the prompt as filled). Processors see only the row's own ids, so their
        state follows (PrefixStates keys state by the ids, not the row). settings: the row's own
        (max/min new tokens, stops, processors, stop rule) instead of the shared ones."""
        if not 0 < len(prompt) <= self.seq.shape[1]:
            raise ValueError(
                f"row {b}: a prompt of {len(prompt)} ids does not fit a width of {self.seq.shape[1]}"
            )
        self.seq[b].zero_()
        self.seq[b, : len(prompt)] = torch.tensor(list(prompt), device=self.seq.device)
        self.prompt_lens[b] = len(prompt)
        for counts in (self.length, self.cache):
            counts.set([len(prompt) if i == b else v for i, v in enumerate(counts.values)])
        self.finished_t[b] = False
        self.new[b], self.ends[b], self.sent[b] = [], None, 0
        self.own[b] = settings
        self.failed.pop(b, None)

    def move(self, src: int, dst: int) -> None:
        """Row src continues as row dst (a slot engine packs its busy rows into the lowest slots): its
        ids, counts, end state and settings; row src is left ended ("idle"). Its cache rows are the
        caller's to move."""
        self.seq[dst] = self.seq[src]
        self.prompt_lens[dst] = self.prompt_lens[src]
        for counts in (self.length, self.cache):
            values = list(counts.values)
            values[dst] = values[src]
            counts.set(values)
        self.finished_t[dst] = self.finished_t[src]
        self.finished_t[src] = True
        self.new[dst], self.ends[dst], self.sent[dst] = self.new[src], self.ends[src], self.sent[src]
        self.own[dst] = self.own[src]
        # dst's own entry, if any, is an ended row's stop-rule error (kept until a refill): not this row's
        error = self.failed.pop(src, None)
        self.failed.pop(dst, None)
        if error is not None:
            self.failed[dst] = error
        self.new[src], self.ends[src], self.sent[src], self.own[src] = [], "idle", 0, None

    def checks(self, b: int) -> list[TokenCheck]:
        """Row b's processors that also judge single tokens (a grammar): `sound` asks them."""
        own = self.own[b]
        return self.shared_checks if own is None else own.checks

    @property
    def checked(self) -> bool:
        """Whether some row has a per-token check: its tokens are drawn with `checked_draw`."""
        return any(self.checks(b) for b in range(len(self.ends)))

    def sound(self, b: int, token: int, extra: int = 0) -> bool:
        """Whether row b may take token after its ids and `extra` more (a draft's); an ended row may."""
        checks = self.checks(b) if self.ends[b] is None else []
        if not checks:
            return True
        ids = self.seq[b, : self.length.values[b] + extra].tolist()
        return all(c.sound(ids, token) for c in checks)

    def draw(self, logits: Tensor, dead: Tensor | None, **sampling) -> tuple[Tensor, Tensor | None]:
        """One token per row from processed logits, with `sampling.sample`'s keyword arguments (generator:
        one, or one per row); where a row has a per-token check, only a token it accepts
        (checked_sample), else the row is dead."""
        if not self.checked:
            return sample(logits, **sampling), dead
        generators = sampling.get("generator")
        if generators is None or isinstance(generators, torch.Generator):
            return checked_sample(logits, dead, self.sound, **sampling)
        # one generator per row: each row checked and drawn alone, from its own numbers only
        out = [
            checked_sample(
                logits[b : b + 1],
                None if dead is None else dead[b : b + 1],
                lambda _, token, b=b: self.sound(b, token),
                **(sampling | {"generator": g}),
            )
            for b, g in enumerate(generators)
        ]
        return torch.cat([t for t, _ in out]), torch.cat([d for _, d in out])

    def hold_of(self, b: int) -> int:
        """Row b's held-back token count (its longest stop sequence minus one)."""
        own = self.own[b]
        return self.hold if own is None else own.hold

    def process_rows(self, logits: Tensor, rows: Sequence[int]) -> tuple[Tensor, Tensor, dict[int, str]]:
        """Each listed row's own processors and min_new_tokens on its logits (len(rows), V), given its
        ids: the processed logits (a row with every token banned made flat), those rows' flags, and the
        rows whose processor raised, with the error (they fail alone: their logits are left flat)."""
        out, failed = [], {}
        for j, b in enumerate(rows):
            own, n = self.own[b], self.length.values[b]
            least = own.min_new_tokens if own is not None else self.min_new_tokens
            early = self.eos_id if n - self.prompt_lens[b] < least else None
            processors = own.processors if own is not None else self.processors
            try:
                out.append(process_row(processors, self.seq[b : b + 1, :n], logits[j : j + 1], early))
            except Exception as err:  # noqa: BLE001 (a row's processor failing fails that row alone)
                failed[b] = f"{type(err).__name__}: {err}"
                out.append(torch.zeros_like(logits[j : j + 1]))
        return (*flatten_banned(torch.cat(out)), failed)

    def push(self, b: int, token: int) -> str | None:
        """Add a produced token to row b; the reason it ends there, or None."""
        row, own = self.new[b], self.own[b]
        if extend_row(row, token, self.eos_id, self.stops if own is None else own.stop):
            return "eos" if token == self.eos_id else "stop"
        if own is not None:
            if own.should_stop is not None and own.should_stop(row):
                return "stop"
            return "length" if len(row) >= own.max_new_tokens else None
        if self.should_stop is not None and self.should_stop(b, row):
            return "stop"
        return "length" if len(row) >= self.max_new_tokens else None

    def end(self, b: int, why: str) -> list[Token]:
        """End row b for reason why: its held-back tokens and its end event."""
        self.ends[b] = why
        self.finished_t[b] = True
        events = [Token(b, t) for t in self.new[b][self.sent[b] :]]
        self.sent[b] = len(self.new[b])
        return [*events, Token(b, None, why)]

    def released(self, b: int) -> list[Token]:
        """Row b's tokens that can no longer start a stop sequence, not yet streamed."""
        upto = len(self.new[b]) - self.hold_of(b)
        events = [Token(b, t) for t in self.new[b][self.sent[b] : upto]]
        self.sent[b] = max(self.sent[b], upto)
        return events

    def append(
        self, token: Tensor, dead: Tensor | None, rows: Sequence[int] | None = None
    ) -> tuple[Tensor, list[Token]]:
        """One token per row (B,) written after each row's ids (an ended row's becomes EOS); dead (B,)
        ends a row with no valid token. The tokens as written and the events; one host sync.
        rows: only these rows take a token (token and dead are theirs, in that order): a slot engine's
        running rows, while others wait or prefill."""
        if rows is not None:
            return token, self.append_rows(token, dead, rows)
        if self.eos_id is not None:
            token = token.masked_fill(self.finished_t, self.eos_id)  # ended rows only repeat EOS
        if self.length.aligned:
            self.seq[:, self.length.values[0]] = token
        else:
            self.seq[self.index, self.length.tensor] = token
        self.length.add(1)
        # the row flags come to the host with the tokens: one sync per step
        if dead is None:
            tokens, dead_rows = token.tolist(), [False] * len(self.ends)
        else:
            tokens, dead_rows = torch.stack([token, dead.long()]).tolist()
        events: list[Token] = []
        for b, t in enumerate(tokens):
            if self.ends[b] is not None:
                continue
            why = "no_valid_token" if dead_rows[b] else self.push(b, t)
            if why is not None:
                events += self.end(b, why)
            elif len(self.new[b]) - self.sent[b] > self.hold:
                events += self.released(b)
        return token, events

    def append_rows(self, token: Tensor, dead: Tensor | None, rows: Sequence[int]) -> list[Token]:
        """`append` for the listed running rows alone; the events."""
        index = torch.tensor(list(rows), device=self.seq.device)
        self.seq[index, self.length.tensor[index]] = token
        taken = set(rows)
        self.length.add([int(b in taken) for b in range(len(self.ends))])
        tokens = token.tolist()
        dead_rows = dead.tolist() if dead is not None else [False] * len(tokens)
        events: list[Token] = []
        for b, t, d in zip(rows, tokens, dead_rows, strict=True):
            try:
                why = "no_valid_token" if d else self.push(b, t)
            except Exception as err:  # noqa: BLE001 (a row's stop rule failing fails that row alone)
                self.failed[b] = f"{type(err).__name__}: {err}"
                why = "error"
            if why is not None:
                events += self.end(b, why)
            elif len(self.new[b]) - self.sent[b] > self.hold_of(b):
                events += self.released(b)
        return events

    def tail_ids(
        self, keep: int, window_starts: Sequence[bool] | None = None, rows: Sequence[int] | None = None
    ) -> list[list[int]]:
        """Each of `rows`' (None: every row's) last `keep` ids, cut as training windows are
        (multiar.data.packing.pack): the contexts their windows slide to. One copy to the host."""
        rows = range(len(self.length.values)) if rows is None else rows
        lengths = [self.length.values[b] for b in rows]
        ids = self.seq[list(rows), : max(lengths)].tolist()
        return [
            window_tail(r[max(n - keep, 0) : n], keep, window_starts)
            for r, n in zip(ids, lengths, strict=True)
        ]

    def tails(self, keep: int, window_starts: Sequence[bool] | None = None) -> tuple[Tensor, Tensor | None]:
        """Slide every row's window to its tail, which becomes its cache; the padded ids (B, width) to
        prefill and each row's last index (None when aligned)."""
        ctxs = self.tail_ids(keep, window_starts)
        self.cache.set([len(c) for c in ctxs])
        width = max(self.cache.values)
        padded = torch.tensor([c + [0] * (width - len(c)) for c in ctxs], device=self.seq.device)
        return padded, self.last_index(self.cache)
