"""Drawing under a per-token check, with no hole: a processor that can judge single tokens (`TokenCheck`,
a grammar too costly to run over the whole vocabulary every step) is asked only about the tokens drawn.
Each row draws from its processed distribution as a plain row would (the same number, the same token);
a drawn token the check refuses is banned in that row and the row draws again, until a sound token is
drawn or no probability is left (the row is dead: it ends with `no_valid_token`). The redraws are the
finishers of one exponential race over the row's distribution (`sampling.race`), run only for a row
refused: the first sound finisher is exactly a draw from the distribution restricted to sound tokens, with
no new noise per refusal; a row's next finishers come from one top-k (`walk`), not an argmax over the
vocabulary per refusal. Greedy takes the most likely sound token. What comes out is the processed
distribution restricted to sound tokens, renormalized (a sound first draw, or the race's pick when the
first was refused: p_s + (1 - P_S) p_s / P_S = p_s / P_S): never an unchecked token. Knows no domain.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from multiar.engine.sampling import Generators, draw, probabilities, race


@runtime_checkable
class TokenCheck(Protocol):
    """A logits processor (its call masks what is cheap to mask) that also says, for one row's ids and
    one candidate token, whether the token is sound there. The decode loop asks `sound` of each token
    it draws (`checked_sample`); speculative decoding of every token it needs the probability of."""

    def __call__(self, ids: Tensor, logits: Tensor) -> Tensor: ...

    def sound(self, ids: list[int], token: int) -> bool: ...


Sound = Callable[[int, int], bool]  # (row, token) -> whether the row may take the token


WALK = 16  # a refused row's next finishers read from one top-k, not from one argmax per refusal


def checked_sample(
    logits: Tensor,
    dead: Tensor | None,
    sound: Sound,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    min_p: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """One token per row of processed logits (B, V) that sound(row, token) accepts, and which rows have
    none (B,) bool: a refused token is banned in its row and the row draws again. dead: rows already
    without a valid token (their logits flattened by `Rows.process`), left as they are. Sampling
    arguments as `sampling.sample` (temperature 0: the most likely sound token)."""
    greedy = temperature <= 0
    dead = (
        torch.zeros(logits.size(0), dtype=torch.bool, device=logits.device) if dead is None else dead.clone()
    )
    if greedy:
        return redraw_refused(logits, logits.argmax(-1), dead, sound, True, generator)
    probs = probabilities(logits, temperature, top_k, top_p, min_p)
    return redraw_refused(probs, draw(probs, generator), dead, sound, False, generator)


def redraw_refused(
    dist: Tensor,
    tokens: Tensor,
    dead: Tensor,
    sound: Sound,
    greedy: bool,
    generator: Generators = None,
    refused: list[int] | None = None,
) -> tuple[Tensor, Tensor]:
    """Rows' first draws (tokens (B,)) from their processed distributions dist (B, V) (probabilities;
    greedy: logits), each row's draw asked of sound and, refused, redrawn: the largest key of one
    exponential race over the row's distribution (its generator's noise; greedy: its logits) among the
    tokens sound accepts, or the row is dead (none left with probability). A first draw is the plain
    draw's (the same number, the same token, where the check accepts it), and the race is run only for
    the rows refused. tokens and dead are updated in place and returned; rows already dead are left.
    refused: the rows whose first draw is known refused (not asked again)."""
    if refused is None:
        drawn, gone = tokens.tolist(), dead.tolist()
        refused = [b for b, t in enumerate(drawn) if not gone[b] and not sound(b, t)]
    if not refused:
        return tokens, dead
    index = torch.tensor(refused, device=tokens.device)
    if greedy:
        keys = dist[index]  # a copy: refused tokens are banned in it
    else:
        own = isinstance(generator, torch.Generator) or generator is None
        keys = race(dist[index], generator if own else [generator[b] for b in refused])  # type: ignore[index]
    redrawn, none_left = settle(keys, tokens[index], dead[index], lambda j, t: sound(refused[j], t), greedy)
    tokens[index], dead[index] = redrawn, none_left
    return tokens, dead


def settle(keys: Tensor, tokens: Tensor, dead: Tensor, sound: Sound, greedy: bool) -> tuple[Tensor, Tensor]:
    """From rows' race keys (B, V) (greedy: their processed logits) and their first draws (tokens), each
    refused: each row's first token sound(row, token) accepts in the keys' order (largest first), and
    which rows have none left: tokens (B,) and dead (B,) are updated in place and returned, keys'
    refused entries set to -inf."""
    refused = []  # rows whose walk ran out: refused tokens banned, the argmax loop goes on from there
    for b, token in enumerate(tokens.tolist()):
        found = walk(keys[b], token, lambda t, b=b: sound(b, t))
        if isinstance(found, list):
            keys[b, found[:-1]] = float("-inf")
            tokens[b] = found[-1]
            refused.append(b)
        else:
            tokens[b] = found
    while refused:
        rows = torch.tensor(refused, device=keys.device)
        keys[rows, tokens[rows]] = float("-inf")
        left = keys[rows]
        empty = torch.isneginf(left).all(-1) if greedy else left.amax(-1) <= 0
        tokens[rows] = left.argmax(-1)
        dead[rows] |= empty
        waiting = [b for b, e in zip(refused, empty.tolist(), strict=True) if not e]
        drawn = tokens.tolist()
        refused = [b for b in waiting if not sound(b, drawn[b])]
    return tokens, dead


def walk(keys: Tensor, first: int, sound: Callable[[int], bool]) -> int | list[int]:
    """The redraws of one row (V,) whose first draw was refused, in the order repeated argmaxes would
    take them (largest key first, the lowest id among equal keys), from one top-k: the first sound
    token, or, where the top-k runs out first, the tokens refused (first drawn first). Keys equal to
    the top-k's last may continue past it with lower ids, and no probability left is such a tie (0 in
    a race, -inf greedy): both are left to the argmax loop."""
    values, ids = keys.topk(min(WALK, keys.numel()))
    ranked = sorted(zip((-values).tolist(), ids.tolist(), strict=True))
    if any(v != v for v, _ in ranked):  # NaN keys (a broken model) sort no way argmax agrees with
        return [first]
    floor = ranked[-1][0]
    refused = [first]
    for negative, token in ranked:
        if negative >= floor:
            break
        if token == first:
            continue
        if sound(token):
            return token
        refused.append(token)
    return refused


def sound_probabilities(probs: Tensor, sound: Callable[[int], bool]) -> Tensor:
    """One row's distribution (V,) restricted to the tokens sound(token) accepts, renormalized (all
    zeros when none is): what `checked_sample` draws from, made explicit for speculative decoding's
    accept/reject rule. Asks about every token with probability, most likely first."""
    out = probs.clone()
    support = torch.nonzero(probs > 0).flatten()
    order = support[probs[support].argsort(descending=True)].tolist()
    refused = [t for t in order if not sound(t)]
    if refused:
        out[refused] = 0.0
    total = out.sum()
    return out / total if total > 0 else out
