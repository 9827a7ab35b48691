"""A slot engine's mixed step: the next token of every decoding row and chunks of prompts entering other
rows, as one sequence through the model (GPT.forward_segments). The token-wise layers (norms, linears,
MLP) take every token of the step in one call; attention runs per part: the decoding rows together, each
row over its own cached slots, and each prompt chunk over its row's cache. One forward per step instead
of one more for every prompt that enters (llama.cpp and vLLM batch the same way). No Lightning, Hydra or
domain code here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class Segments:
    """The step's tokens, in order: one for each batch row 0 .. rows-1 at its own position (a row not
    decoding writes a slot it fills again before reading it), then each prompt chunk (batch row, first
    position, length)."""

    rows: int
    positions: Tensor  # (rows,)
    chunks: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def kv_len(self) -> int:
        """Cache slots the decoding rows attend to: up to the furthest position."""
        return int(self.positions.max()) + 1 if self.rows else 0

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
    """q, k, v (N, nh, hs) of the step's tokens, written into the cache, -> (N, nh, hs): the decoding rows
    attend to their slots up to their own position; a chunk to its row's slots before it and causally
    within. The decoding rows' slots are written first, so a chunk overwrites its row's placeholder."""
    out = []
    d = seg.rows
    if d:
        pos = seg.positions[:, None]  # (d, 1)
        keys, values = cache.update(pos, k[:d, :, None], v[:d, :, None], seg.kv_len)  # (d, nh, kv_len, hs)
        mask = causal_mask[pos, : seg.kv_len][:, None]  # (d, 1, 1, kv_len)
        out.append(F.scaled_dot_product_attention(q[:d, :, None], keys, values, attn_mask=mask)[:, :, 0])
    at = d
    for b, start, n in seg.chunks:
        end = start + n
        qc, kc, vc = (t[at : at + n].transpose(0, 1)[None] for t in (q, k, v))  # (1, nh, n, hs)
        cache.k[b : b + 1, :, start:end] = kc
        cache.v[b : b + 1, :, start:end] = vc
        keys, values = cache.k[b : b + 1, :, :end], cache.v[b : b + 1, :, :end]
        if start == 0:
            y = F.scaled_dot_product_attention(qc, keys, values, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(qc, keys, values, attn_mask=causal_mask[start:end, :end])
        out.append(y[0].transpose(0, 1))  # (n, nh, hs)
        at += n
    return torch.cat(out)
