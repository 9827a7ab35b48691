"""A slot engine's mixed step: the next token of every decoding row and chunks of prompts entering other
rows, as one sequence through the model (GPT.forward_segments). The token-wise layers (norms, linears,
MLP) take every token of the step in one call; attention runs per part: the decoding rows together, each
row over its own cached slots, and each prompt chunk over its row's cache. One forward per step instead
of one more for every prompt that enters (llama.cpp and vLLM batch the same way). No Lightning, Hydra or
domain code here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from multiar.engine.precision import slow_bf16_attention

# the decoding rows' attention: q (d, nh, hs), the cache's keys and values (d, nh, n, hs), positions (d,)
# (row b sees its slots 0 .. positions[b]) -> (d, nh, hs); engine.rows_attention has the ways
Attend = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


@dataclass
class Segments:
    """The step's tokens, in order: one for each batch row 0 .. rows-1 at its own position (a row not
    decoding writes a slot it fills again before reading it), then each prompt chunk (batch row, first
    position, length). attend: the decoding rows' attention (None: SDPA with a mask)."""

    rows: int
    positions: Tensor  # (rows,)
    chunks: list[tuple[int, int, int]] = field(default_factory=list)
    attend: Attend | None = None
    kv_len: int = field(init=False)  # cache slots the decoding rows attend to: up to the furthest position

    def __post_init__(self) -> None:
        # once per step, not per layer: each read of a tensor's max is a wait for it on the host
        self.kv_len = int(self.positions.max()) + 1 if self.rows else 0
        self.row_index = torch.arange(
            self.rows, device=self.positions.device
        )  # the decoding rows' cache rows
        self._mask: Tensor | None = None

    def rows_mask(self, causal_mask: Tensor) -> Tensor:
        """The decoding rows' SDPA mask (rows, 1, 1, kv_len): each sees its slots up to its position
        (made once per step, not per layer)."""
        if self._mask is None:
            self._mask = causal_mask[self.positions[:, None], : self.kv_len][:, None]
        return self._mask

    def token_positions(self) -> Tensor:
        """Every token's position (N,)."""
        spans = [torch.arange(start, start + n, device=self.positions.device) for _, start, n in self.chunks]
        return torch.cat([self.positions, *spans])

    def logit_index(self) -> Tensor:
        """The tokens whose logits the step returns: each decoding row's, then each chunk's last."""
        ends, at = [], self.rows
        for _, _, n in self.chunks:
            at += n
            ends.append(at - 1)
        return torch.tensor([*range(self.rows), *ends], device=self.positions.device)


def segment_attention(q: Tensor, k: Tensor, v: Tensor, seg: Segments, cache, causal_mask: Tensor) -> Tensor:  # noqa: ANN001 (a KVCache: model.py imports this module)
    """q, k, v (N, nh, hs) of the step's tokens in the cache's dtype (Attention casts its projection once),
    written into the cache, -> (N, nh, hs) in that dtype: the decoding rows attend to their slots up to
    their own position; a chunk to its row's slots before it and causally within. The decoding rows' slots are written first, so a chunk overwrites its row's
    placeholder. On a CPU without AMX a chunk attends in fp32, whatever the cache holds (bf16 SDPA is slow
    there; with AMX the faster)."""
    out = []
    d, dtype = seg.rows, cache.k.dtype
    work = torch.float32 if slow_bf16_attention(q.device) else dtype
    if d:
        cache.k[seg.row_index, :, seg.positions] = k[:d]  # each row's slot at its own position
        cache.v[seg.row_index, :, seg.positions] = v[:d]
        keys, values = cache.k[:d, :, : seg.kv_len], cache.v[:d, :, : seg.kv_len]  # (d, nh, kv_len, hs)
        if seg.attend is not None:
            out.append(seg.attend(q[:d], keys, values, seg.positions))
        else:
            mask = seg.rows_mask(causal_mask)
            y = F.scaled_dot_product_attention(q[:d, :, None], keys, values, attn_mask=mask)
            out.append(y[:, :, 0])
    at = d
    for b, start, n in seg.chunks:
        end = start + n
        qc, kc, vc = (t[at : at + n].transpose(0, 1)[None] for t in (q, k, v))  # (1, nh, n, hs)
        cache.k[b : b + 1, :, start:end] = kc
        cache.v[b : b + 1, :, start:end] = vc
        keys, values = (c[b : b + 1, :, :end].to(work) for c in (cache.k, cache.v))
        qc = qc.to(work)
        if start == 0:
            y = F.scaled_dot_product_attention(qc, keys, values, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(qc, keys, values, attn_mask=causal_mask[start:end, :end])
        out.append(y[0].transpose(0, 1).to(q.dtype))  # (n, nh, hs)
        at += n
    return out[0] if len(out) == 1 else torch.cat(out)  # one part: no copy
