"""A slot engine's step compiled whole (engine.captured_step): the eager mixed step's logits for rows at
any positions (one row, a row at the block's last position, every cache row) and for prompt chunks
entering beside them (a one-token prompt alone included), its attention through the operator or
inductor's ops, and once built it never compiles again."""

from __future__ import annotations

import pytest
import torch

from multiar.engine import cpu_matvec, rows_attention
from multiar.engine.captured_step import CapturedStep
from multiar.engine.model import GPT, ModelConfig
from multiar.engine.rows_attention import attend_rows, operator_attend
from multiar.engine.segments import Segments
from multiar.errors import first_line

SLOTS = 4


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=40, block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()
    model.setup_caches(max_batch_size=SLOTS, max_seq_length=64)
    return model


@pytest.fixture(scope="module", params=["operator", "inductor"])
def captured(model, request) -> CapturedStep:
    """The step with its attention through engine.cpu_matvec's operator (each token's cache row read in
    place), and through inductor's fused ops (where the operator is not built)."""
    if request.param == "operator" and cpu_matvec.library() is None:
        pytest.skip("no C++ compiler here: the attention is inductor's")
    with pytest.MonkeyPatch.context() as patch:
        if request.param == "inductor":
            patch.setattr(rows_attention, "operator_runs", lambda keys: False)
        try:
            step = CapturedStep(model, SLOTS)
        except Exception as err:  # noqa: BLE001 (inductor needs a C++ compiler)
            pytest.skip(f"torch.compile does not run here: {first_line(err)}")
    assert step.attend is (operator_attend if request.param == "operator" else attend_rows)
    return step


def history(model: GPT, positions: list[int]) -> None:
    """The same earlier ids in each row's cache, as prompt chunks of the eager step."""
    torch.manual_seed(2)
    model.setup_caches(max_batch_size=SLOTS, max_seq_length=64)
    with torch.inference_mode():
        for block in model.blocks:  # nothing of the last step left: a step must read what it writes
            block.attn.kv_cache.k.zero_()
            block.attn.kv_cache.v.zero_()
        for b, p in enumerate(positions):
            if p:
                model.forward_segments(torch.randint(3, 40, (p,)), Segments(0, torch.zeros(0, dtype=torch.long), [(b, 0, p)]))  # fmt: skip


@pytest.mark.parametrize("positions", [[9, 1, 30, 4], [17], [63, 5], [63, 1, 2, 3], [63]])
def test_the_captured_step_gives_the_eager_steps_logits_and_never_compiles_again(model, captured, positions):
    ids, at = torch.randint(3, 40, (len(positions),)), torch.tensor(positions)
    history(model, positions)
    with torch.inference_mode():
        want = model.forward_segments(ids, Segments(len(positions), at, []))
    history(model, positions)
    with torch.compiler.set_stance("fail_on_recompile"), torch.inference_mode():
        rows = torch.arange(len(positions))  # every tensor made in inference mode, as the engine's
        got = captured(ids.clone(), rows, at.clone(), int(at.max()) + 1, rows.clone())
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize(
    "decoding, chunks",
    [
        ([(0, 9), (2, 30)], [(1, 0, 5)]),  # rows decoding, a prompt entering between them
        ([(3, 12)], [(0, 0, 7), (2, 4, 3)]),  # two chunks, one a later part of its prompt
        ([], [(1, 0, 1)]),  # a one-token prompt alone: one token, one logit, a length of 1
        ([], [(0, 0, 20)]),  # a prompt alone
        ([(1, 63)], [(2, 0, 2)]),  # a row at the block's last position
    ],
)
def test_a_captured_step_with_prompt_chunks_gives_the_eager_steps_logits(model, captured, decoding, chunks):
    """The eager step computes every slot up to the last decoding one (placeholders where none decodes);
    the captured one only the tokens it is given, each naming its row: the same logits for both."""
    start = {b: at for b, at, _ in chunks}
    filled = [start.get(b, dict(decoding).get(b, 0)) for b in range(SLOTS)]
    history(model, filled)
    torch.manual_seed(3)
    prompt = {b: torch.randint(3, 40, (n,)) for b, _, n in chunks}
    last = {b: torch.randint(3, 40, ()).item() for b, _ in decoding}
    d = max(b for b, _ in decoding) + 1 if decoding else 0
    placeholders = torch.tensor([last.get(b, 3) for b in range(d)], dtype=torch.long)
    with torch.inference_mode():
        want = model.forward_segments(
            torch.cat([placeholders, *prompt.values()]),
            Segments(d, torch.tensor(filled[:d], dtype=torch.long), chunks),
        )[[b for b, _ in decoding] + list(range(d, d + len(chunks)))]
    history(model, filled)
    ids = torch.tensor([last[b] for b, _ in decoding] + [t for b, _, _ in chunks for t in prompt[b].tolist()])
    rows = [b for b, _ in decoding] + [b for b, _, n in chunks for _ in range(n)]
    positions = [p for _, p in decoding] + [p for _, at, n in chunks for p in range(at, at + n)]
    ends = torch.tensor([n for _, _, n in chunks]).cumsum(0) + len(decoding) - 1
    logits_at = [*range(len(decoding)), *ends.tolist()]
    with torch.compiler.set_stance("fail_on_recompile"), torch.inference_mode():
        args = (
            ids.clone(),
            *map(torch.tensor, (rows, positions)),
            max(positions) + 1,
            torch.tensor(logits_at),
        )
        got = captured(*args)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.slow  # three compiles, ~80 s on 2 cores
def test_a_server_of_three_runs_compiles_every_runs_step(monkeypatch):
    """Each CapturedStep compiles its step for four cases; dynamo's limit of 8 graphs for one function
    ran the third run's step uncompiled (a server of music, code and protein runs) until each made room.
    With inductor's attention: the operator's reads each row in place, so a case over the whole cache is
    the same graph as one over part of it (two graphs a step, under the limit either way)."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(rows_attention, "operator_runs", lambda keys: False)
    before = counters["stats"]["unique_graphs"]
    for width in (32, 40, 48):
        torch.manual_seed(width)
        model = GPT(ModelConfig(vocab_size=40, block_size=64, n_layer=2, n_head=2, n_embd=width)).eval()
        model.setup_caches(max_batch_size=SLOTS, max_seq_length=64)
        CapturedStep(model, SLOTS)
    assert counters["stats"]["unique_graphs"] - before == 12
