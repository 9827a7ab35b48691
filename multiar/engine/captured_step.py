"""A slot engine's decoding step compiled whole: when a step carries no prompt chunk (most steps), the
decoding rows' forward — norms, linears, rotary positions, cache writes, attention (rows_attention's
`attend_rows`), head — runs as one inductor graph with dynamic rows and length instead of ~200 eager ops,
each a Python dispatch. The weights are frozen into the graph (inductor packs them for oneDNN itself, so
the model keeps nn.Linear: inductor cannot lower multiar's packed Linear) and on a CPU a C++ wrapper
calls the kernels (engine.inductor_options): a 16-slot protein step 1.5x faster than compiled with
neither, 2x the eager packed step (benchmarks/README.md, serve). The graph is compiled on the calling
(loading) thread for every case a step meets, since a compile on the engine thread would stall every row
for seconds. `decode_rows` is also the graph `compile=true` compiles for `generate` (engine.decode:
static shapes, every row over the whole cache). No Lightning, Hydra or domain code here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from multiar.engine.inductor_options import inductor_options, make_room
from multiar.engine.model import GPT, apply_rope
from multiar.engine.rows_attention import attend_rows


def decode_rows(model: GPT, ids: Tensor, positions: Tensor, kv_len: int) -> Tensor:
    """The step of `GPT.forward_segments` with decoding rows only: ids (d,) at positions (d,) written into
    rows 0 .. d-1 of the cache, each row attending to its slots up to its position (kv_len: the furthest
    one + 1) -> logits (d, V). The real rotary table: inductor has no complex ops."""
    d = ids.size(0)
    nh, hs = model.config.n_head, model.config.head_size
    rows = torch.arange(d, device=ids.device)
    freqs = model.rope[positions][:, None, None]  # (d, 1, 1, hs/2, 2): one token per row
    x = model.wte(ids)  # (d, C)
    for block in model.blocks:
        attn, cache = block.attn, block.attn.kv_cache
        assert cache is not None
        qk, v = attn.qkv(block.norm_1(x)).view(d, 3 * nh, hs).split([2 * nh, nh], dim=1)
        q, k = apply_rope(qk[:, None], freqs)[:, 0].split(nh, dim=1)  # (d, nh, hs) each
        cache.k[rows, :, positions] = k.to(cache.k.dtype)
        cache.v[rows, :, positions] = v.to(cache.v.dtype)
        y = attend_rows(q, cache.k[:d, :, :kv_len], cache.v[:d, :, :kv_len], positions)
        x = x + attn.proj(y.reshape(d, nh * hs).to(x.dtype))
        x = x + block.mlp(block.norm_2(x))
    return model.lm_head(model.norm_f(x))


class CapturedStep:
    """decode_rows compiled for `model` with caches of `slots` rows set up (setup_caches first, the
    engine's own: the graph reads them as they are)."""

    def __init__(self, model: GPT, slots: int) -> None:
        self.model = model
        model.keep_caches = True  # the frozen graph holds on to these cache tensors (guarded by identity)
        self.kernel = torch.compile(decode_rows, dynamic=True)
        make_room(4)  # its four cases below: a server of several runs compiles decode_rows for each
        self.options = inductor_options(cpp_wrapper=model.wte.weight.device.type == "cpu")
        block, device = model.config.block_size, model.wte.weight.device
        # every case a step meets, each size unlike the others (equal sizes at a first compile are guarded
        # equal): some rows over part of the cache, one row (a size of 1 is its own graph), every row
        # over all of it
        taken = (slots, block, model.config.n_head, model.config.head_size, model.config.n_embd)
        rows, length = [x for x in range(3, 99) if x not in taken][:2]
        with torch.inference_mode():
            for d, n in ((rows, length), (1, length), (slots, block), (1, block)):
                d = min(d, slots)
                self(
                    torch.zeros(d, dtype=torch.long, device=device), torch.full((d,), n - 1, device=device), n
                )

    def __call__(self, ids: Tensor, positions: Tensor, kv_len: int) -> Tensor:
        with self.options:  # read when a call compiles: around every call
            return self.kernel(self.model, ids, positions, kv_len)
