"""A slot engine's step compiled whole: the decoding rows' next tokens and the prompt chunks entering
other rows — norms, linears, rotary positions, cache writes, attention (engine.cpu_matvec's operator
where it builds, each token's cache row read in place, else rows_attention's `attend_rows`), head — run
as one inductor graph with dynamic sizes instead of ~200 eager ops, each a Python dispatch.
Every token names its cache row and position, so a step computes the rows that decode and the chunks'
tokens, nothing else, and a prompt's entry costs about one decoding step more rather than an eager
forward 3-4 times a step (benchmarks/README.md, serve). The weights are frozen into the graph (inductor
packs them for oneDNN itself, so the model keeps nn.Linear: inductor cannot lower multiar's packed
Linear) and on a CPU a C++ wrapper calls the kernels (engine.inductor_options). The graph is compiled on
the calling (loading) thread for every case a step meets, since a compile on the engine thread would
stall every row for seconds. `decode_rows` (rows 0 .. d-1, one token each) is the graph `compile=true`
compiles for `generate` (engine.decode: static shapes but the filled slots' count). No Lightning,
Hydra or domain code here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from multiar.engine.inductor_options import inductor_options, make_room
from multiar.engine.model import GPT, apply_rope
from multiar.engine.rows_attention import attend_for, attend_rows, operator_attend
from multiar.engine.segments import Attend


def hidden_rows(
    model: GPT, ids: Tensor, positions: Tensor, kv_len: int, rows: Tensor | None, attend: Attend = attend_rows
) -> Tensor:
    """Token t (ids (T,)) written into cache row rows[t] (None: row t, the cache's first T rows read as a
    view) at positions[t], attending to that row's slots up to its position -> hidden states (T, C).
    Every token's keys and values are written before any token attends, so a prompt chunk's tokens in
    one row see the ones before them. The real rotary table: inductor has no complex ops. attend: the
    attention (rows_attention.attend_for's pick in a CPU package and a CapturedStep)."""
    T = ids.size(0)
    nh, hs = model.config.n_head, model.config.head_size
    index = torch.arange(T, device=ids.device) if rows is None else rows
    freqs = model.rope[positions][:, None, None]  # (T, 1, 1, hs/2, 2): one position per token
    x = model.wte(ids)  # (T, C)
    for block in model.blocks:
        attn, cache = block.attn, block.attn.kv_cache
        assert cache is not None
        qkv = attn.qkv(block.norm_1(x)).to(cache.k.dtype)  # as the eager step: in the cache's dtype
        qk, v = qkv.view(T, 3 * nh, hs).split([2 * nh, nh], dim=1)
        q, k = apply_rope(qk[:, None], freqs)[:, 0].split(nh, dim=1)  # (T, nh, hs) each
        cache.k[index, :, positions] = k
        cache.v[index, :, positions] = v
        if rows is None:
            y = attend(q, cache.k[:T, :, :kv_len], cache.v[:T, :, :kv_len], positions)
        elif attend is operator_attend:  # each token's row read where it is (an index would copy it)
            y = operator_attend(q, cache.k, cache.v, positions, rows)
        else:  # each token's row: (T, nh, kv_len, hs)
            y = attend(q, cache.k[rows, :, :kv_len], cache.v[rows, :, :kv_len], positions)
        x = x + attn.proj(y.reshape(T, nh * hs).to(x.dtype))
        x = x + block.mlp(block.norm_2(x))
    return x


def decode_rows(
    model: GPT, ids: Tensor, positions: Tensor, kv_len: int, attend: Attend = attend_rows
) -> Tensor:
    """One token for each of rows 0 .. d-1: ids (d,) at positions (d,), each row attending to its slots up
    to its position (kv_len: the furthest one + 1) -> logits (d, V)."""
    return model.lm_head(model.norm_f(hidden_rows(model, ids, positions, kv_len, None, attend)))


def step_rows(
    model: GPT,
    ids: Tensor,
    rows: Tensor,
    positions: Tensor,
    kv_len: int,
    logits_at: Tensor,
    attend: Attend = attend_rows,
) -> Tensor:
    """A slot engine's step: tokens ids (T,) of cache rows rows (T,) at positions (T,) -> logits of the
    tokens at logits_at (K,): (K, V)."""
    hidden = hidden_rows(model, ids, positions, kv_len, rows, attend)
    return model.lm_head(model.norm_f(hidden[logits_at]))


class CapturedStep:
    """step_rows compiled for `model` with caches of `slots` rows set up (setup_caches first, the engine's
    own: the graph reads them as they are)."""

    def __init__(self, model: GPT, slots: int) -> None:
        self.model = model
        model.keep_caches = True  # the frozen graph holds on to these cache tensors (guarded by identity)
        # the attention through engine.cpu_matvec's operator where it runs, each token's cache row read in
        # place: 16 rows decoding, spread over a 1,024-slot context, the 10.8M step 3.57 ms against 6.60
        # with inductor's fused ops in bf16, 5.73 against 10.14 in fp32 (Zen 5 EPYC, session 33)
        attend = attend_for(model.blocks[0].attn.kv_cache.k)
        self.attend = attend

        def step(model: GPT, ids: Tensor, rows: Tensor, positions: Tensor, kv_len: int, at: Tensor) -> Tensor:
            return step_rows(model, ids, rows, positions, kv_len, at, attend)

        self.kernel = torch.compile(step, dynamic=True)
        # its four cases below (two graphs with the operator): a server of several runs compiles each one's
        make_room(4)
        self.options = inductor_options(cpp_wrapper=model.wte.weight.device.type == "cpu")
        block, device = model.config.block_size, model.wte.weight.device
        # every case a step meets, each size unlike the others (equal sizes at a first compile are guarded
        # equal): tokens over part of the cache, one token (a size of 1 is its own graph), and each over
        # all of it; calls never pass one logit or a length of 1 (see __call__)
        c = model.config
        taken = (slots, block, c.n_head, c.head_size, c.n_embd, c.vocab_size)
        wanted, tokens, length = [x for x in range(3, 99) if x not in taken][:3]  # wanted < tokens
        with torch.inference_mode():
            for t, n in ((tokens, length), (1, length), (tokens, block), (1, block)):
                at = torch.arange(wanted, device=device) % t
                rows = torch.arange(t, device=device) % slots
                self(torch.zeros(t, dtype=torch.long, device=device), rows, torch.full((t,), n - 1, device=device), n, at)  # fmt: skip

    def __call__(
        self, ids: Tensor, rows: Tensor, positions: Tensor, kv_len: int, logits_at: Tensor
    ) -> Tensor:
        """The logits (len(logits_at), V) of step_rows; a size of 1 would compile a graph of its own on the
        engine thread, so one logit is asked twice and a length of 1 read as 2 (the second slot masked)."""
        k = logits_at.size(0)
        if k < 2:
            logits_at = torch.cat([logits_at, logits_at]) if k else logits_at.new_zeros(2)
        with self.options:  # read when a call compiles: around every call
            return self.kernel(self.model, ids, rows, positions, max(kv_len, 2), logits_at)[:k]
