"""One generator per row (`stream(generators=...)`): a row's tokens depend on its prompt and its own
generator, not on how many rows run beside it or which; with and without a per-token check."""

from __future__ import annotations

import pytest
import torch
from conftest import context_sensitive

from multiar.engine.decode import generate
from multiar.engine.model import GPT, ModelConfig
from multiar.engine.sampling import draw


def tiny_model() -> GPT:
    torch.manual_seed(0)
    return context_sensitive(
        GPT(ModelConfig(vocab_size=37, block_size=64, n_layer=2, n_head=2, n_embd=16)).eval()
    )


def seeded(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


class EvenOnly:
    """A per-token check refusing odd tokens (drawn, checked, redrawn: checked_draw)."""

    def __call__(self, ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def sound(self, ids: list[int], token: int) -> bool:
        return token % 2 == 0


@pytest.mark.parametrize("checked", [False, True])
def test_a_row_draws_the_same_tokens_alone_or_beside_others(checked):
    model, prompts = tiny_model(), [[1, 5, 6], [1], [1, 9], [1, 2, 3, 4]]
    kwargs = dict(eos_id=0, processors=[EvenOnly()] if checked else [])
    together = generate(
        model, prompts=prompts, max_new_tokens=12, generators=seeded(10, 11, 12, 13), **kwargs
    )
    for b, (prompt, seed) in enumerate(zip(prompts, (10, 11, 12, 13), strict=True)):
        alone = generate(model, prompts=[prompt], max_new_tokens=12, generators=seeded(seed), **kwargs)
        assert alone[0] == together[b]
        single = generate(model, prompts=[prompt], max_new_tokens=12, generator=seeded(seed)[0], **kwargs)
        assert single == alone  # a batch of one: the same numbers as its batch generator
    if checked:
        assert all(t % 2 == 0 for row in together for t in row)
    shuffled = generate(
        model, prompts=prompts[::-1], max_new_tokens=12, generators=seeded(13, 12, 11, 10), **kwargs
    )
    assert shuffled[::-1] == together


def test_generators_must_be_one_per_row_and_not_beside_a_generator():
    model = tiny_model()
    with pytest.raises(ValueError, match="one per row"):
        generate(model, prompts=[[1], [1]], max_new_tokens=2, generators=seeded(1))
    with pytest.raises(ValueError, match="one per row"):
        generate(model, prompts=[[1]], max_new_tokens=2, generators=seeded(1), generator=seeded(2)[0])


def test_draw_per_row_takes_each_rows_numbers_from_its_generator():
    probs = torch.rand(3, 11)
    rows = draw(probs, seeded(1, 2, 3))
    for b, seed in enumerate((1, 2, 3)):
        assert draw(probs[b : b + 1], seeded(seed)[0]).item() == rows[b].item()
