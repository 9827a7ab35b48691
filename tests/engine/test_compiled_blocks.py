"""The full-sequence pass with its blocks compiled (engine.compiled_blocks): the eager pass's logits and
gradients, from one graph that every block runs (not a graph per block: a 12-block model would pass
dynamo's recompile limit of 8 and run the rest uncompiled)."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from multiar.engine.compiled_blocks import compile_blocks
from multiar.engine.model import GPT, ModelConfig
from multiar.errors import first_line


def test_compiled_blocks_give_the_eager_pass_from_one_graph():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=40, block_size=16, n_layer=3, n_head=2, n_embd=32))
    idx = torch.randint(0, 40, (2, 16))
    eager = model(idx)
    eager.square().mean().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    torch._dynamo.reset()  # what earlier tests compiled from Block.forward
    counters.clear()
    try:
        logits = compile_blocks(model)(idx)
    except Exception as err:  # noqa: BLE001 (inductor needs a C++ compiler)
        pytest.skip(f"torch.compile does not run here: {first_line(err)}")
    logits.square().mean().backward()
    assert counters["stats"]["unique_graphs"] == 1  # the three blocks ran one graph
    assert torch.allclose(logits, eager, atol=1e-5)
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, want[name], atol=1e-5), name


def test_each_compile_makes_room_for_its_graphs():
    # a sweep trains several models in one process: each run's graphs are counted against one limit
    import torch._dynamo.config as config

    before = config.recompile_limit
    compile_blocks(GPT(ModelConfig(vocab_size=40, block_size=16, n_layer=1, n_head=2, n_embd=32)))
    assert config.recompile_limit == before + 4
