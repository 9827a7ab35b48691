"""The sampler and the logits processors: everything that shapes one next-token distribution (temperature, top-k,
top-p, min-p, banned ids, forced positions, repetition penalty) and draws from it. A processor is a function
(ids so far, logits) -> logits, composed in order; the decode loop (decode.py) knows no more than that."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

# (ids so far (B, t), logits for the next token (B, V)) -> logits (B, V); -inf bans a token
LogitsProcessor = Callable[[Tensor, Tensor], Tensor]


def _on(table: dict, device: torch.device, make: Callable[[], Tensor]) -> Tensor:
    """A small constant tensor, built once per device (processors run every step)."""
    if device not in table:
        table[device] = make().to(device)
    return table[device]


def ban_tokens(token_ids: Sequence[int]) -> LogitsProcessor:
    """A processor that never lets the given ids be sampled (e.g. PAD, BOS)."""
    banned = sorted(set(token_ids))
    tables: dict = {}

    def processor(ids: Tensor, logits: Tensor) -> Tensor:
        index = _on(tables, logits.device, lambda: torch.tensor(banned, dtype=torch.long))
        return logits.index_fill_(-1, index, float("-inf"))

    return processor


def min_new_tokens(n: int, prompt_length: int, eos_id: int) -> LogitsProcessor:
    """A processor that bans EOS until n new tokens follow a prompt of prompt_length: no empty samples.
    (`generate(min_new_tokens=...)` does the same per row when prompts differ in length.)"""

    def processor(ids: Tensor, logits: Tensor) -> Tensor:
        if ids.size(1) < prompt_length + n:
            logits[:, eos_id] = float("-inf")
        return logits

    return processor


def force_tokens(forced: dict[int, int]) -> LogitsProcessor:
    """A processor that makes the token at sequence position p (0-based, prompt included) forced[p]:
    fixed positions of a redesigned sequence. Rows with other lengths are called one by one."""

    def processor(ids: Tensor, logits: Tensor) -> Tensor:
        token = forced.get(ids.size(1))
        if token is not None:
            keep = logits[:, token].clone()
            logits.fill_(float("-inf"))[:, token] = torch.where(torch.isneginf(keep), 0.0, keep)
        return logits

    return processor


def repetition_penalty(penalty: float, window: int = 64) -> LogitsProcessor:
    """CTRL's repetition penalty over each row's last `window` ids: a logit of a token seen there is
    divided by penalty when positive, multiplied when negative (penalty > 1 discourages repeats)."""
    if penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {penalty}")

    def processor(ids: Tensor, logits: Tensor) -> Tensor:
        recent = ids[:, -window:]  # (B, w)
        seen = logits.gather(-1, recent)
        return logits.scatter_(-1, recent, torch.where(seen > 0, seen / penalty, seen * penalty))

    return processor


def probabilities(
    logits: Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0
) -> Tensor:
    """The distribution the sampler draws from, as probabilities (..., V); temperature 0 is one-hot."""
    if temperature <= 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.size(-1)).float()
    logits = logits.float()
    if temperature < 1e-3:  # a tiny divisor could overflow logits to inf (NaN in softmax): shift first
        logits = logits - logits.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).min)
    if temperature != 1.0:  # (each small op costs ~8 us right after a compiled step: skip a no-op)
        # past float32's largest, the divisor would round to inf and turn banned tokens' -inf into NaN
        logits = logits / min(temperature, torch.finfo(torch.float32).max)
    if 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (..., 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # drop a token when the mass before it already reaches top_p; the most likely one always stays
        drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    probs = logits.softmax(dim=-1)
    if min_p > 0.0:
        probs = probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


# one generator for the whole batch, or one per row (B of them: each row draws only from its own)
Generators = torch.Generator | Sequence[torch.Generator] | None


def draw(probs: Tensor, generator: Generators = None) -> Tensor:
    """One index per row of probs (..., V), drawn by inverting the row's cumulative distribution at one
    uniform number (torch.multinomial's way, without its host sync): one number a row where the
    exponential race takes V (torch's exponential_ on a CPU is 7x slower than uniform_, and one row of a
    2,048-token vocabulary took 49 us of a 16-row step's sampling). generator: one, or one per row of
    probs (B, V), each row's number from its own (the number that row alone would draw with it)."""
    shape, wide = (*probs.shape[:-1], 1), wide_float(probs.device)
    if generator is None or isinstance(generator, torch.Generator):
        u = torch.rand(shape, generator=generator, device=probs.device, dtype=wide)
    else:
        numbers = [torch.rand(1, generator=g, device=probs.device, dtype=wide) for g in generator]
        u = torch.cat(numbers).view(shape)
    return invert(probs, u)


def wide_float(device: torch.device) -> torch.dtype:
    """float64 for a draw's numbers and sums, float32 where the device has no float64 (Apple's MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def invert(probs: Tensor, u: Tensor) -> Tensor:
    """The index where each row's cumulative probability (..., V) first passes u (..., 1) of its total,
    u in [0, 1): a token of probability 0 adds nothing to the sum, so it is never passed there. Summed
    in u's dtype (float64 but on MPS), so the last tokens of a large vocabulary keep their mass."""
    cdf = probs.cumsum(-1, dtype=u.dtype)  # the cast and the sum in one op
    if probs.device.type != "cpu":  # a CPU sums in order: exactly flat there (cummax costs 100 us a step)
        cdf = flat_at_zeros(cdf, probs)
    picked = torch.searchsorted(cdf, u * cdf[..., -1:], right=True)[..., 0]
    return picked.clamp_max(probs.size(-1) - 1)  # a row without probability (all 0, NaN): the last index


def race(probs: Tensor, generator: Generators = None) -> Tensor:
    """Each index's key in the exponential race (..., V): p / E with E ~ Exp(1) (0 where p is 0). The
    largest key is a draw from probs; the largest among any subset of indexes is a draw from probs
    restricted to that subset, renormalized (the first of independent exponential clocks to ring is
    each with chance proportional to its rate), so one race serves every redraw."""
    if generator is None or isinstance(generator, torch.Generator):
        noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    else:
        rows = zip(probs, generator, strict=True)
        noise = torch.stack([torch.empty_like(p).exponential_(1.0, generator=g) for p, g in rows])
    # a sample of exactly 0 would make p / noise inf, or NaN for p = 0, which argmax takes as largest
    return probs / noise.clamp_min(torch.finfo(noise.dtype).tiny)


def sample(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: Generators = None,
    min_p: float = 0.0,
) -> Tensor:
    """Draw one token per row from logits (B, V) -> (B,). temperature 0 is greedy; top_k 0, top_p 1 and
    min_p 0 are off. min_p keeps tokens whose probability is at least min_p times the row's largest."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    return draw(probabilities(logits, temperature, top_k, top_p, min_p), generator)


def apply_processors(
    processors: Sequence[LogitsProcessor], seq: Tensor, lengths: Sequence[int] | None, logits: Tensor
) -> Tensor:
    """Run processors on logits (B, V) given the ids seq (B, >= t); rows of different lengths one by one."""
    if lengths is None:
        for process in processors:
            logits = process(seq, logits)
        return logits
    rows = []
    for b, n in enumerate(lengths):
        row = logits[b : b + 1]
        for process in processors:
            row = process(seq[b : b + 1, :n], row)
        rows.append(row)
    return torch.cat(rows)


def flat_at_zeros(cdf: Tensor, probs: Tensor) -> Tensor:
    """Cumulative sums (..., V) held flat across zero-probability tokens: a device that sums in another
    order (a GPU) could leave one a rounding step's width, where a number could pick it."""
    return torch.where(probs > 0, cdf, 0.0).cummax(-1).values


@dataclass
class Sampler:
    """One row's sampling settings and its own generator (a slot engine's request: its seed gives the
    same tokens whatever rows run beside it)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    generator: torch.Generator | None = None


def sample_each(logits: Tensor, samplers: Sequence[Sampler]) -> Tensor:
    """One token per row of logits (B, V), row b drawn by samplers[b] with its own settings and
    generator: each row consumes only its own generator's numbers. (B,)."""
    out = [
        sample(logits[b : b + 1], s.temperature, s.top_k, s.top_p, s.generator, s.min_p)
        for b, s in enumerate(samplers)
    ]
    return torch.cat(out) if out else logits.new_zeros(0, dtype=torch.long)


def sample_groups(logits: Tensor, samplers: Sequence[Sampler]) -> Tensor:
    """One token per row of processed logits (B, V), row b drawn with samplers[b]'s settings and its
    generator alone: the tokens of `sample_each`, with one vectorized call per group of rows sharing
    settings (each row's number drawn from its own generator, as alone). (B,)."""
    out = torch.empty(logits.size(0), dtype=torch.long, device=logits.device)
    groups: dict[tuple[float, int, float, float], list[int]] = {}
    for b, s in enumerate(samplers):
        key = (0.0, 0, 1.0, 0.0) if s.temperature <= 0 else (s.temperature, s.top_k, s.top_p, s.min_p)
        groups.setdefault(key, []).append(b)
    for (temperature, top_k, top_p, min_p), rows in groups.items():
        index = torch.tensor(rows, device=logits.device)
        part = logits if len(rows) == logits.size(0) else logits[index]
        if temperature <= 0:
            out[index] = part.argmax(dim=-1)
            continue
        probs = probabilities(part, temperature, top_k, top_p, min_p)
        out[index] = draw(probs, [samplers[b].generator for b in rows])  # type: ignore[misc]
    return out
