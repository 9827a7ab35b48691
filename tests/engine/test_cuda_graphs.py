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
    from torch._inductor import cudagraph_trees

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, block_size=128, n_layer=2, n_head=4, n_embd=64)).cuda().eval()
    compiled = compile_for_sampling(copy.deepcopy(model))
    skips = counters["inductor"]["cudagraph_skips"]
    # rows at one position, then ragged rows ((B, 1) positions), then a second batch size
    for prompts in ([[1, 5, 9, 2], [1, 7, 7, 3]], [[1, 5], [1, 7, 7, 3, 4, 9]], [[1, 4, 4]]):
        eager = generate(model, prompts=prompts, max_new_tokens=60, temperature=0.0)
        assert generate(compiled, prompts=prompts, max_new_tokens=60, temperature=0.0) == eager
        assert generate(compiled, prompts=prompts, max_new_tokens=60, temperature=0.0) == eager  # replays
    assert counters["inductor"]["cudagraph_skips"] == skips  # no graph declined
    manager = cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
    assert manager is not None and any(True for _ in manager.get_roots())  # and graphs were recorded
