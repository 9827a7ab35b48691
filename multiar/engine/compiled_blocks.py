"""The full-sequence pass (training, validation) with its blocks compiled: one graph, compiled from
`Block.forward` once and run by every block, the block's parameters its inputs (regional compilation).
Against `torch.compile(model.forward)` (every block inlined into one graph) the cold compile takes half
the time whatever the depth, and the step runs as fast: on a 2-core Xeon with AMX, bf16, 17 s against
28 s at 10.8M and 20 s against 38 s at 85M, steps within 2% (benchmarks/README.md, training). The
embedding, the last norm, the head and the loss stay eager. No Lightning, Hydra or domain code here.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor

from multiar.engine.inductor_options import make_room
from multiar.engine.model import GPT, Block

# graphs a training run may compile from Block.forward: its steps and validation, each also at a smaller
# last batch; dynamo's recompile limit counts them for every model trained in one process (a sweep)
GRAPHS_PER_RUN = 4


def compile_blocks(model: GPT) -> Callable[[Tensor], Tensor]:
    """model's forward, idx (B, T) -> logits (B, T, V), each block run by one compiled Block.forward."""
    make_room(GRAPHS_PER_RUN)
    return partial(model.forward, run_block=torch.compile(Block.forward))
