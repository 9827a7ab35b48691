"""compile=true on CUDA: the one-token step replayed as one CUDA graph (the gpu tier: `make test-all` on
a machine with a GPU; benchmarks/gpu_check.py measures the same at 85M)."""

from __future__ import annotations

import copy

import pytest
import torch

from multiar.engine.decode import compile_for_sampling, generate
from multiar.engine.model import GPT, ModelConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here"),
]


def test_the_captured_step_decodes_the_eager_steps_ids_and_is_captured():
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, block_size=128, n_layer=2, n_head=4, n_embd=64)).cuda().eval()
    prompts = [[1, 5, 9, 2], [1, 7, 7, 3]]
    eager = generate(model, prompts=prompts, max_new_tokens=60, temperature=0.0)
    compiled = compile_for_sampling(copy.deepcopy(model))
    skips = counters["inductor"]["cudagraph_skips"]
    first = generate(compiled, prompts=prompts, max_new_tokens=60, temperature=0.0)
    again = generate(compiled, prompts=prompts, max_new_tokens=60, temperature=0.0)  # replays, caches reused
    assert first == eager and again == eager
    assert counters["inductor"]["cudagraph_skips"] == skips  # captured, not run as plain kernels
