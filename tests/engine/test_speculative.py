"""Speculative decoding keeps the target's output: token for token when greedy, and in distribution when
sampling (chi-square on a tiny vocabulary); batched rows accept their own counts; processors hold."""

from __future__ import annotations

import pytest
import torch
from conftest import context_sensitive

from multiar.engine.decode import generate, stream
from multiar.engine.model import GPT, ModelConfig
from multiar.engine.sampling import ban_tokens, draw, probabilities
from multiar.engine.speculative import SpeculativeStats, accept_reject, ngram_proposal, speculative_generate


def model(seed: int, vocab: int = 37, **shape) -> GPT:
    torch.manual_seed(seed)
    args = dict(vocab_size=vocab, block_size=96, n_layer=2, n_head=2, n_embd=32) | shape
    return context_sensitive(GPT(ModelConfig(**args)).eval())


def busy_model(seed: int, **shape) -> GPT:
    """A model whose greedy continuation depends on its context: at the default init a tiny model repeats
    its last token, which any draft guesses."""
    m = model(seed, **shape)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:  # embeddings and linears; the norms stay at 1
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return m


PROMPTS = [[1, 5, 9], [1], [1, 7, 7, 7, 7, 7, 2], [1, 3, 3]]


@pytest.mark.parametrize("draft_kind", ["model", "ngram"])
def test_greedy_speculative_equals_greedy_target_token_for_token(draft_kind):
    target = busy_model(0)
    draft = busy_model(1, n_layer=1, n_embd=16) if draft_kind == "model" else "ngram"
    expected = generate(target, prompts=PROMPTS, max_new_tokens=30, temperature=0.0)
    for k in (1, 3, 5):
        out, stats = speculative_generate(target, PROMPTS, 30, draft=draft, k=k, temperature=0.0)
        assert out == expected, k
        # greedy fixes every proposal, so the counts follow from the two models alone
        proposed, accepted, steps = greedy_acceptance(target, draft, PROMPTS, 30, k)
        assert (stats.proposed, stats.accepted, stats.per_row_steps) == (proposed, accepted, steps), k
        assert stats.target_steps == max(steps) and stats.emitted == 30 * len(PROMPTS)
        assert 0 < accepted < proposed  # a different draft: the rule was exercised both ways


def greedy_acceptance(target: GPT, draft: GPT | str, prompts, n_new: int, k: int, ngram: int = 3):
    """Proposed and accepted counts and target steps per row of greedy speculative decoding, worked out
    from the target's greedy continuation and the draft's greedy (or n-gram) proposals, row by row."""
    cont = generate(target, prompts=prompts, max_new_tokens=n_new + k + 1, temperature=0.0)
    proposed = accepted = 0
    steps = []
    for prompt, row in zip(prompts, cont, strict=True):
        pos = n_steps = 0
        while pos < n_new:
            ctx = prompt + row[:pos]
            if draft == "ngram":
                guess = ngram_proposal(ctx, k, ngram)
            else:
                guess = generate(draft, prompts=[ctx], max_new_tokens=k, temperature=0.0)[0]
            n = next((j for j in range(k) if guess[j] != row[pos + j]), k)
            proposed, accepted, n_steps, pos = proposed + k, accepted + n, n_steps + 1, pos + n + 1
        steps.append(n_steps)
    return proposed, accepted, steps


def test_a_draft_equal_to_the_target_is_always_accepted():
    target = model(0)
    out, stats = speculative_generate(target, PROMPTS, 24, draft=model(0), k=4, temperature=0.0)
    assert stats.as_dict()["acceptance_rate"] == 1.0
    assert stats.as_dict()["tokens_per_target_step"] == pytest.approx(5.0, abs=0.6)


def test_speculative_sampling_has_the_target_distribution():
    # joint law of the first two new tokens over a 5-token vocabulary: 25 cells, chi-square test
    target, draft = model(2, vocab=5), model(3, vocab=5, n_layer=1, n_embd=16)
    prompt = [[0, 1]]
    with torch.no_grad():
        first = target(torch.tensor(prompt))[0, -1].softmax(-1)  # (V,)
        seconds = target(torch.tensor([[0, 1, a] for a in range(5)]))[:, -1].softmax(-1)  # (V, V)
    expected = (first[:, None] * seconds).flatten()
    n = 4000
    out, stats = speculative_generate(
        target, prompt * n, 2, draft=draft, k=3, temperature=1.0, generator=torch.Generator().manual_seed(0)
    )
    counts = torch.bincount(torch.tensor([a * 5 + b for a, b in out]), minlength=25).float()
    chi2 = ((counts - n * expected) ** 2 / (n * expected)).sum().item()
    assert chi2 < 51.2  # the 0.999 quantile of chi-square with 24 degrees of freedom
    assert 0.0 < stats.as_dict()["acceptance_rate"] < 1.0  # the rule was exercised both ways


def test_processors_and_eos_hold_for_every_emitted_token():
    target, draft = model(4), model(5, n_layer=1, n_embd=16)
    banned = list(range(10, 30))
    out, _ = speculative_generate(
        target,
        PROMPTS,
        40,
        draft=draft,
        k=4,
        temperature=1.0,
        eos_id=3,
        min_new_tokens=5,
        processors=[ban_tokens(banned)],
        generator=torch.Generator().manual_seed(1),
    )
    assert all(t not in banned and t != 3 for row in out for t in row)
    assert all(len(row) >= 5 for row in out)


def test_mismatched_draft_is_refused_and_ngram_proposals_follow_the_latest_match():
    with pytest.raises(ValueError, match="vocab_size"):
        speculative_generate(model(0), PROMPTS, 5, draft=model(1, vocab=40))
    assert ngram_proposal([4, 5, 6, 7, 1, 4, 5], k=3, n=2) == [6, 7, 1]
    assert ngram_proposal([1, 2, 3], k=2, n=2) == [3, 3]  # no earlier match: repeat the last token


def test_probabilities_match_what_sample_draws_from():
    from multiar.engine.sampling import sample

    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]])
    p = probabilities(logits, temperature=0.7, top_k=4, top_p=0.9, min_p=0.05)
    draws = sample(logits.repeat(20000, 1), 0.7, 4, 0.9, torch.Generator().manual_seed(0), min_p=0.05)
    freq = torch.bincount(draws, minlength=5).float() / 20000
    assert torch.allclose(freq, p[0], atol=0.015)


# --- the accept/reject rule on its own -----------------------------------------------------------------

# the 0.999 quantiles of chi-square by degrees of freedom (a table; scipy is not a dependency)
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}
V, K, DRAWS = 8, 3, 20000


def matches(tokens: torch.Tensor, p: torch.Tensor) -> bool:
    """Whether tokens pass as draws from p (V,): none outside its support, and Pearson's chi-square
    below its 0.999 quantile."""
    counts = torch.bincount(tokens, minlength=p.numel()).double()
    support = p > 0
    if counts[~support].sum() > 0:
        return False
    expected = tokens.numel() * p.double()[support]
    stat = float(((counts[support] - expected) ** 2 / expected).sum())
    return stat < CHI2_999[int(support.sum()) - 1]


def target_and_draft(draft_kind: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """p (1, K+1, V) after temperature, top-p and min-p; q (1, K, V) and the proposals d (1, K): a
    model-like draft (its own logits through the same sampling settings), or an n-gram's one-hot."""
    g = torch.Generator().manual_seed(seed)
    settings = dict(temperature=0.8, top_p=0.9, min_p=0.05)
    p = probabilities(torch.randn(1, K + 1, V, generator=g), **settings)
    assert ((p > 0).sum(-1) >= 3).all() and ((p == 0).sum(-1) >= 1).all()  # top-p / min-p cut some
    if draft_kind == "model":
        q = probabilities(torch.randn(1, K, V, generator=g), **settings)
        return p, q, torch.zeros(1, K, dtype=torch.long)  # d is drawn from q per row
    # one proposal the target likes, one it has banned (top-p / min-p), one in between
    liked = p[0, 0].argmax()
    banned = (p[0, 1] == 0).nonzero()[0, 0]
    middle = p[0, 2].argsort()[-2]
    d = torch.stack([liked, banned, middle])[None]
    return p, torch.nn.functional.one_hot(d, V).float(), d


def first_two_tokens(rule, draft_kind: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first emitted token of DRAWS rounds of rule, the second among rounds that accept the first,
    and p."""
    p, q, d = target_and_draft(draft_kind, seed)
    g = torch.Generator().manual_seed(seed + 1)
    p, q = p.expand(DRAWS, -1, -1), q.expand(DRAWS, -1, -1)
    d = draw(q, g) if draft_kind == "model" else d.expand(DRAWS, -1)
    n_acc, extra = rule(p, q, d, g)
    first = torch.where(n_acc >= 1, d[:, 0], extra)
    second = torch.where(n_acc >= 2, d[:, 1], extra)[n_acc >= 1]
    return first, second, p[0]


@pytest.mark.parametrize("draft_kind", ["model", "ngram"])
def test_the_accept_reject_rule_samples_the_target_distribution(draft_kind):
    first, second, p = first_two_tokens(accept_reject, draft_kind)
    assert matches(first, p[0])
    assert second.numel() > 1000  # the first proposal is accepted often enough to test the next one
    assert matches(second, p[1])  # given d_0 accepted, the next token is p_1's


@pytest.mark.parametrize("draft_kind", ["model", "ngram"])
def test_the_chi_square_check_catches_a_wrong_rule(draft_kind):
    def accept_always(p, q, d, g):
        return torch.full(d.shape[:1], d.size(1)), draw(p[:, -1], g)

    def resample_from_p(p, q, d, g):  # the usual slip: a rejection redraws from p, not from (p - q)+
        n_acc, _ = accept_reject(p, q, d, g)
        at = n_acc.clamp(max=d.size(1) - 1)
        return n_acc, draw(p[torch.arange(d.size(0)), at], g)

    for rule in (accept_always, resample_from_p):
        first, _, p = first_two_tokens(rule, draft_kind)
        assert not matches(first, p[0]), rule.__name__


# --- end reasons: the same with and without a draft --------------------------------------------------


def stream_rows(target: GPT, prompts, n_new: int, **kwargs) -> tuple[list[list[int]], list[str]]:
    out: list[list[int]] = [[] for _ in prompts]
    ends: list[str] = [""] * len(prompts)
    for e in stream(target, prompts, n_new, **kwargs):
        if e.token is None:
            ends[e.row] = e.end
        else:
            out[e.row].append(e.token)
    return out, ends


def ban_all_at(prompt_second_id: int, length: int):
    """A processor that bans every token for the row whose second id is prompt_second_id once it holds
    `length` ids."""

    def processor(ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if ids.size(1) == length:
            logits[ids[:, 1] == prompt_second_id] = float("-inf")
        return logits

    return processor


@pytest.mark.parametrize("draft_kind", ["model", "ngram"])
def test_end_reasons_and_outputs_equal_plain_decoding(draft_kind):
    target = busy_model(0)
    draft = busy_model(1, n_layer=1, n_embd=16) if draft_kind == "model" else "ngram"
    plain = generate(target, prompts=PROMPTS, max_new_tokens=30, temperature=0.0)
    # a stop sequence row 0 meets, an EOS id row 3 meets: the other rows run to the token budget
    settings = dict(temperature=0.0, stop=[plain[0][4:6]], eos_id=plain[3][8])
    expected, ends = stream_rows(target, PROMPTS, 30, **settings)
    assert set(ends) == {"stop", "eos", "length"}, ends
    for k in (1, 4):
        out, stats = speculative_generate(target, PROMPTS, 30, draft=draft, k=k, **settings)
        assert (out, stats.ends) == (expected, ends), k
    merged = SpeculativeStats()
    merged.merge(stats)
    merged.merge(stats)
    assert merged.ends == ends + ends


@pytest.mark.parametrize("draft_kind", ["model", "ngram"])
def test_a_row_with_every_token_banned_ends_with_no_valid_token(draft_kind):
    target = busy_model(0)
    draft = busy_model(1, n_layer=1, n_embd=16) if draft_kind == "model" else "ngram"
    dead = ban_all_at(7, len(PROMPTS[2]) + 5)  # row 2 after five new tokens
    expected, ends = stream_rows(target, PROMPTS, 20, temperature=0.0, processors=[dead])
    assert ends == ["length", "length", "no_valid_token", "length"] and len(expected[2]) == 5
    for k in (1, 4):
        out, stats = speculative_generate(
            target, PROMPTS, 20, draft=draft, k=k, temperature=0.0, processors=[dead]
        )
        assert (out, stats.ends) == (expected, ends), k
    # sampling: nothing drawn from the all-banned distribution, the other rows run on
    out, stats = speculative_generate(
        target, PROMPTS, 20, draft=draft, k=4, processors=[dead], generator=torch.Generator().manual_seed(2)
    )
    assert stats.ends == ends and [len(r) for r in out] == [20, 20, 5, 20]


def test_generate_with_a_draft_run_or_ngram_reports_acceptance(tmp_path, capsys):
    import json

    from conftest import TINY

    from multiar.cli import main
    from multiar.config import load_config
    from multiar.training.run import train

    big, small = tmp_path / "big", tmp_path / "small"
    common = ["data.max_documents=200", "trainer.max_steps=20", "trainer.val_check_interval=10", *TINY]
    train(load_config("train", [*common, f"run_dir={big}", "model.n_layer=2"]))
    train(load_config("train", [*common, f"run_dir={small}"]))
    base = [f"run={big}", "n=4", "max_new_tokens=30", "temperature=0", "seed=5"]
    assert main(["generate", *base, f"out={tmp_path / 'plain'}"]) == 0
    for name, draft in (("d", str(small)), ("n", "ngram"), ("self", str(big))):
        out = tmp_path / name
        assert main(["generate", *base, f"out={out}", f"draft={draft}", "speculate_k=3"]) == 0
        report = json.loads((out / "generate.json").read_text())
        if draft == str(big):  # greedy, the target as its own draft: every proposal is accepted
            assert report["speculative"]["acceptance_rate"] == 1.0
        assert report["speculative"]["tokens_per_target_step"] >= 1.0
        # greedy: the files equal plain decoding's, byte for byte
        assert (out / "samples.fasta").read_bytes() != b""
        plain = (tmp_path / "plain" / "samples.fasta").read_text()
        assert (out / "samples.fasta").read_text().replace(f" draft={draft}", "") == plain
    code = tmp_path / "code"
    train(
        load_config(
            "train", ["domain=code", "data.max_documents=20", f"run_dir={code}", "trainer.max_steps=2", *TINY]
        )
    )
    assert main(["generate", *base, f"draft={code}"]) == 2
    assert "is a code run; the target is protein" in capsys.readouterr().err
