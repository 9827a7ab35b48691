"""Speculative decoding keeps the target's output: token for token when greedy, and in distribution when
sampling (chi-square on a tiny vocabulary); batched rows accept their own counts; processors hold."""

from __future__ import annotations

import pytest
import torch

from multiar.generate import ban_tokens, generate, probabilities
from multiar.model import GPT, ModelConfig
from multiar.speculative import ngram_proposal, speculative_generate


def model(seed: int, vocab: int = 37, **shape) -> GPT:
    torch.manual_seed(seed)
    args = dict(vocab_size=vocab, block_size=96, n_layer=2, n_head=2, n_embd=32) | shape
    return GPT(ModelConfig(**args)).eval()


PROMPTS = [[1, 5, 9], [1], [1, 7, 7, 7, 7, 7, 2], [1, 3, 3]]


@pytest.mark.parametrize("draft_kind", ["model", "ngram"])
def test_greedy_speculative_equals_greedy_target_token_for_token(draft_kind):
    target = model(0)
    draft = model(1, n_layer=1, n_embd=16) if draft_kind == "model" else "ngram"
    expected = generate(target, prompts=PROMPTS, max_new_tokens=30, temperature=0.0)
    for k in (1, 3, 5):
        out, stats = speculative_generate(target, PROMPTS, 30, draft=draft, k=k, temperature=0.0)
        assert out == expected, k
        assert stats.target_steps <= 30 and 0.0 <= stats.as_dict()["acceptance_rate"] <= 1.0


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
    from multiar.generate import sample

    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]])
    p = probabilities(logits, temperature=0.7, top_k=4, top_p=0.9, min_p=0.05)
    draws = sample(logits.repeat(20000, 1), 0.7, 4, 0.9, torch.Generator().manual_seed(0), min_p=0.05)
    freq = torch.bincount(draws, minlength=5).float() / 20000
    assert torch.allclose(freq, p[0], atol=0.015)


def test_generate_with_a_draft_run_or_ngram_reports_acceptance(tmp_path, capsys):
    import json

    from conftest import TINY

    from multiar.cli import main
    from multiar.config import load_config
    from multiar.train import train

    big, small = tmp_path / "big", tmp_path / "small"
    common = ["data.max_documents=200", "trainer.max_steps=20", "trainer.val_check_interval=10", *TINY]
    train(load_config("train", [*common, f"run_dir={big}", "model.n_layer=2"]))
    train(load_config("train", [*common, f"run_dir={small}"]))
    base = [f"run={big}", "n=4", "max_new_tokens=30", "temperature=0", "seed=5"]
    assert main(["generate", *base, f"out={tmp_path / 'plain'}"]) == 0
    for draft in (str(small), "ngram"):
        out = tmp_path / ("d" if draft != "ngram" else "n")
        assert main(["generate", *base, f"out={out}", f"draft={draft}", "speculate_k=3"]) == 0
        report = json.loads((out / "generate.json").read_text())
        assert 0.0 <= report["speculative"]["acceptance_rate"] <= 1.0
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
