"""checked_draw: draw, check, ban, redraw; no row ever takes a token its check refuses."""

from __future__ import annotations

import torch

from multiar.engine.checked_draw import TokenCheck, checked_sample, sound_probabilities
from multiar.engine.sampling import draw, race, sample


class EvenOnly:
    """A per-token check: only even tokens are sound (the mask would be cheap, the point is the draw)."""

    def __init__(self) -> None:
        self.asked = 0

    def __call__(self, ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def sound(self, ids: list[int], token: int) -> bool:
        self.asked += 1
        return token % 2 == 0


def test_the_eight_most_likely_tokens_all_unsound_the_row_stays_sound():
    """The old constraint checked the top 8 and left the row free when none passed: here the 8 most
    likely tokens are odd (unsound) and hold almost all the mass; every draw is still even."""
    V = 32
    logits = torch.full((4, V), -10.0)
    logits[:, [1, 3, 5, 7, 9, 11, 13, 15]] = 10.0  # the top 8, all unsound
    check = EvenOnly()
    assert isinstance(check, TokenCheck)
    gen = torch.Generator().manual_seed(0)
    for temperature in (0.0, 1.0):
        for _ in range(20):
            tokens, dead = checked_sample(
                logits, None, lambda b, t: check.sound([], t), temperature=temperature, generator=gen
            )
            assert not dead.any()
            assert all(t % 2 == 0 for t in tokens.tolist())


def test_greedy_takes_the_most_likely_sound_token_and_no_probability_left_is_dead():
    logits = torch.tensor([[0.0, 5.0, 3.0, 4.0, 1.0], [9.0, 8.0, 7.0, 6.0, 5.0]])
    tokens, dead = checked_sample(logits, None, lambda b, t: t % 2 == 0, temperature=0)
    assert tokens.tolist() == [2, 0] and not dead.any()
    # top_k=1 leaves one token with probability; refused, nothing is left: the row is dead
    tokens, dead = checked_sample(logits, None, lambda b, t: b == 1, temperature=1.0, top_k=1)
    assert dead.tolist() == [True, False] and tokens[1].item() == 0


def test_rows_already_dead_are_not_asked_and_sound_probabilities_renormalize():
    asked = []
    logits = torch.zeros(2, 4)
    tokens, dead = checked_sample(logits, torch.tensor([True, False]), lambda b, t: asked.append(b) or True)
    assert dead.tolist() == [True, False] and set(asked) == {1}
    probs = torch.tensor([0.5, 0.25, 0.25, 0.0])
    out = sound_probabilities(probs, lambda t: t != 0)
    assert torch.allclose(out, torch.tensor([0.0, 0.5, 0.5, 0.0]))
    assert sound_probabilities(probs, lambda t: False).sum() == 0


def test_redraws_from_one_race_give_the_distribution_restricted_to_sound_tokens():
    """A first draw is the plain draw; a refused one's redraw is the first sound finisher of one race over
    the row (no new noise per refusal): over many rows the drawn tokens follow the processed
    distribution restricted to sound tokens, renormalized."""
    probs = torch.tensor([0.30, 0.05, 0.25, 0.15, 0.10, 0.15])  # odd tokens (unsound) hold 35%
    rows = 40_000
    logits = probs.log().expand(rows, -1)
    gen = torch.Generator().manual_seed(1)
    tokens, dead = checked_sample(logits, None, lambda b, t: t % 2 == 0, generator=gen)
    assert not dead.any()
    seen = torch.bincount(tokens, minlength=6).float() / rows
    want = torch.where(torch.arange(6) % 2 == 0, probs, 0.0)
    assert torch.allclose(seen, want / want.sum(), atol=0.01), seen  # 4 sigma is about 0.01 here
    # a first draw is the plain one (a number a row); every redraw came from one race over the refused
    # rows: the generator moved as far as those, no further
    raced = torch.Generator().manual_seed(1)
    first = draw(torch.softmax(logits, -1), raced)
    refused = int((first % 2 == 1).sum())
    assert 0.3 * rows < refused < 0.4 * rows
    race(torch.softmax(logits[:refused], -1), raced)
    assert torch.equal(gen.get_state(), raced.get_state())
    # a sound first draw is the plain draw's token: the same number, the same token
    free, _ = checked_sample(logits[:8], None, lambda b, t: True, generator=torch.Generator().manual_seed(2))
    plain = sample(logits[:8], generator=torch.Generator().manual_seed(2))
    assert free.tolist() == plain.tolist()


def argmax_loop(
    first: list[int], keys: torch.Tensor, greedy: bool, sound
) -> tuple[list[int], list[bool], list[tuple[int, int]]]:
    """The reference for checked_sample: each row's first draw asked; a refused row's redraws as
    repeated argmaxes over its keys (B, V), one refused token banned at a time, dead once no key is
    left (what the top-k walk must reproduce): tokens, dead flags and every (row, token) asked."""
    keys, asked, tokens, dead = keys.clone(), [], [], []
    for b in range(keys.size(0)):
        token = first[b]
        while True:
            asked.append((b, token))
            if sound(b, token):
                tokens.append(token), dead.append(False)
                break
            keys[b, token] = float("-inf")
            left = keys[b]
            if bool(torch.isneginf(left).all()) if greedy else float(left.amax()) <= 0:
                tokens.append(int(left.argmax())), dead.append(True)
                break
            token = int(left.argmax())
    return tokens, dead, asked


def test_the_top_k_walk_takes_the_tokens_and_asks_the_questions_repeated_argmaxes_would():
    """checked_sample asks each row's first draw (the plain draw), and reads a refused row's next
    finishers from one top-k of one race over the refused rows: the same tokens, dead rows and
    questions, in each row's order, as banning one token and taking the argmax again, with ties (equal
    logits, keys of 0 where top_k leaves no probability) and with more refusals than the top-k holds."""
    for seed in range(48):
        g = torch.Generator().manual_seed(seed)
        logits = torch.randn(6, 10 if seed % 8 == 7 else 50, generator=g)  # some rows shorter than the top-k
        if seed % 2:
            logits = logits.mul(2).round()  # many equal logits
        if seed % 8 == 2:
            logits[:, ::3] = float("-inf")  # banned tokens: greedy rows run out where a race has no mass
        if seed % 8 == 4:
            logits[:3] = 1.0  # more tokens tied for the largest key than the top-k holds
        refuse = (
            torch.rand(logits.shape, generator=g) < torch.tensor([0.3, 0.6, 0.9, 0.97, 1.0, 0.0])[:, None]
        )
        for temperature, top_k in ((0.0, 0), (1.0, 0), (1.0, 5)):
            asked: list[tuple[int, int]] = []
            tokens, dead = checked_sample(
                logits,
                None,
                asking(refuse, asked),
                temperature,
                top_k,
                generator=torch.Generator().manual_seed(seed),
            )
            probs = torch.softmax(logits, -1)
            if top_k:
                probs = torch.softmax(
                    logits.masked_fill(logits < logits.topk(top_k).values[:, -1:], -1e9), -1
                )
            if temperature == 0:
                first, keys = logits.argmax(-1).tolist(), logits
            else:
                again = torch.Generator().manual_seed(seed)
                first = draw(probs, again).tolist()
                refused = [b for b, t in enumerate(first) if refuse[b, t]]
                keys = torch.zeros_like(probs)  # rows not refused never read theirs
                if refused:
                    keys[refused] = race(probs[refused], again)
            want_tokens, want_dead, want_asked = argmax_loop(
                first, keys, temperature == 0, asking(refuse, [])
            )
            assert tokens.tolist() == want_tokens, (seed, temperature, top_k)
            assert dead.tolist() == want_dead, (seed, temperature, top_k)
            assert sorted(asked, key=lambda a: a[0]) == want_asked, (seed, temperature, top_k)


def asking(refuse: torch.Tensor, asked: list[tuple[int, int]]):
    """sound(row, token): refuse[row, token] says no; every question noted in asked."""

    def sound(b: int, token: int) -> bool:
        asked.append((b, token))
        return not bool(refuse[b, token])

    return sound
