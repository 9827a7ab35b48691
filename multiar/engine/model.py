"""The one causal transformer every domain trains: RMSNorm, rotary positions, SwiGLU, SDPA, KV cache.

`forward(idx, input_pos=None)`: without `input_pos` it is a plain causal pass over the whole block
(training); with it, it writes keys/values at `input_pos` into the preallocated cache and attends
over the filled part of the cache (prefill and decode). `input_pos` is an int (every row at the same
positions: slices, no gathers, the fast path), a (T,) tensor, or a (B, T) tensor of per-row positions
(prompts of different lengths, speculative rows that accepted different counts). No Lightning, Hydra
or domain code here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from multiar.engine.matmul_attention import causal_bias, matmul_attention
from multiar.engine.precision import slow_bf16_attention
from multiar.engine.segments import Segments, segment_attention
from multiar.engine.training_backward import rms_norm, rotate_split, swiglu_gate

# where a pass's tokens go: none (training), an int start, (T,) or (B, T) tensors, or a slot engine's mixed step
Positions = int | Tensor | Segments | None


@dataclass
class ModelConfig:
    vocab_size: int
    block_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    mlp_ratio: float = 8 / 3  # SwiGLU at 8/3 keeps the MLP's parameters equal to a 4x GELU MLP
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError("head size must be even for rotary embeddings")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def intermediate_size(self) -> int:
        # rounded up to a multiple of 64 for matmul-friendly shapes
        n = int(self.mlp_ratio * self.n_embd)
        return (n + 63) // 64 * 64

    def to_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if hand_backward(x) or hand_backward(self.weight):
            return rms_norm(x, self.weight, self.eps)
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


def hand_backward(t: Tensor) -> bool:
    """Whether an eager CPU training step computes with t: engine.training_backward's Functions then."""
    training = torch.is_grad_enabled() and t.requires_grad
    return training and t.device.type == "cpu" and not torch.compiler.is_compiling()


def rope_cache(seq_len: int, head_size: int, base: float) -> Tensor:
    """cos/sin table for rotary embeddings, shape (seq_len, head_size // 2, 2)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_size, 2).float() / head_size))
    freqs = torch.outer(torch.arange(seq_len).float(), inv_freq)  # (T, hs/2)
    return torch.stack([freqs.cos(), freqs.sin()], dim=-1)


def apply_rope(x: Tensor, freqs: Tensor) -> Tensor:
    """Rotate pairs of channels of x (B, T, H, hs) by the angles in freqs, shaped to broadcast over the
    heads: unit complex numbers (T, 1, hs/2) or (B, T, 1, hs/2) in eager mode, one complex multiply
    instead of a dozen real ops, which is what decode time is made of; or the real table
    (..., T, 1, hs/2, 2) of cos/sin under torch.compile, whose code generator has no complex ops but
    fuses the real ones into one kernel."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)  # (B, T, H, hs/2, 2)
    if freqs.is_complex():
        return torch.view_as_real(torch.view_as_complex(pairs) * freqs).flatten(-2).type_as(x)
    cos, sin = freqs[..., 0], freqs[..., 1]  # (..., T, 1, hs/2)
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2).type_as(x)


class KVCache(nn.Module):
    """Preallocated keys/values for one layer, shape (B, nh, max_seq_length, hs), written in place."""

    def __init__(
        self, batch_size: int, n_head: int, max_seq_length: int, head_size: int, dtype: torch.dtype
    ) -> None:
        super().__init__()
        shape = (batch_size, n_head, max_seq_length, head_size)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, input_pos: int | Tensor, k: Tensor, v: Tensor, kv_len: int) -> tuple[Tensor, Tensor]:
        """Store k, v (B, nh, T, hs) at input_pos (an int start or (T,) for every row, or (B, T) per row);
        return the cache's first kv_len slots for this batch, (B, nh, kv_len, hs) views."""
        B, T = k.size(0), k.size(2)
        k_cache, v_cache = self.k[:B], self.v[:B]
        if isinstance(input_pos, int):
            k_cache[:, :, input_pos : input_pos + T] = k
            v_cache[:, :, input_pos : input_pos + T] = v
        elif input_pos.dim() == 1:  # (T,) positions shared by every row: in place, also when compiled
            k_cache.index_copy_(2, input_pos, k)
            v_cache.index_copy_(2, input_pos, v)
        else:
            index = input_pos[:, None, :, None].expand_as(k)  # (B, nh, T, hs)
            k_cache.scatter_(2, index, k)
            v_cache.scatter_(2, index, v)
        return k_cache[:, :, :kv_len], v_cache[:, :, :kv_len]


class Attention(nn.Module):
    """Causal self-attention. mask: on the cached path (input_pos given) a bool mask of the slots each
    query sees, or None (all / causal); on the full-sequence path None (SDPA, causal) or the additive
    causal bias of matmul_attention (GPT.attention "matmul")."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        # one fused matmul for q, k, v: fewer, larger ops is what pays at small sizes on CPU
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(
        self, x: Tensor, freqs: Tensor, input_pos: Positions, kv_len: int, mask: Tensor | None
    ) -> Tensor:
        B, T, C = x.shape
        nh, hs = self.config.n_head, self.config.head_size
        qkv = self.qkv(x)
        if input_pos is not None and self.kv_cache is not None:
            # the cache's dtype (fp32 for bf16 weights on a CPU without AMX) once, before rotary: not q, k, v each
            # and rotary's result back and forth (a decode step is made of such small ops)
            qkv = qkv.to(self.kv_cache.k.dtype)
        if hand_backward(qkv) and freqs.is_complex() and not isinstance(input_pos, Segments):
            q, k, v = rotate_split(qkv.view(B, T, 3 * nh, hs), freqs, nh)  # its gradient in one buffer
        else:
            # split, not slices: its backward is one cat, where each slice's fills a zero tensor of qkv's size
            qk, v = qkv.view(B, T, 3 * nh, hs).split([2 * nh, nh], dim=2)
            # rotate q and k in one call: half the small ops per layer
            qk = apply_rope(qk, freqs)  # (B, T, 2 * nh, hs)
            if isinstance(input_pos, Segments):  # a slot engine's mixed step: B = 1, T tokens of many rows
                if self.kv_cache is None or mask is None:
                    raise RuntimeError("a mixed step needs the KV cache: call model.setup_caches() first")
                q, k = qk[0].split(nh, dim=1)  # (T, nh, hs) each
                y = segment_attention(q, k, v[0], input_pos, self.kv_cache, mask)
                return self.proj(y.to(x.dtype).reshape(B, T, C))
            q, k = qk.transpose(1, 2).split(nh, dim=1)  # (B, nh, T, hs) each
            v = v.transpose(1, 2)
        if input_pos is None:
            dropout = self.config.dropout if self.training else 0.0
            if mask is None:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
            else:  # GPT.attention "matmul": mask is the additive causal bias
                y = matmul_attention(q, k, v, mask, dropout)
        else:
            if self.kv_cache is None:
                raise RuntimeError("input_pos given but no KV cache: call model.setup_caches() first")
            k, v = self.kv_cache.update(input_pos, k, v, kv_len)  # (B, nh, kv_len, hs): the filled part
            if k.dtype == torch.bfloat16 and slow_bf16_attention(k.device):
                # bf16 caches (a compiled model's, GPT.cache_dtype) on the eager passes it still takes
                # (prefill, a slide, other row counts)
                q, k, v = q.float(), k.float(), v.float()
            # one new token attends to every filled slot: no mask at all; a block starting at 0 is causal
            causal = mask is None and T > 1
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal).to(x.dtype)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.proj(y)


class SwiGLU(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hidden = config.intermediate_size
        self.gate_up = nn.Linear(config.n_embd, 2 * hidden, bias=False)  # fused gate and up projections
        self.down = nn.Linear(hidden, config.n_embd, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate_up = self.gate_up(x)
        if hand_backward(gate_up):
            return self.down(swiglu_gate(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.norm_1 = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = Attention(config)
        self.norm_2 = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = SwiGLU(config)
        self.dropout = config.dropout

    def forward(
        self, x: Tensor, freqs: Tensor, input_pos: Positions, kv_len: int, mask: Tensor | None
    ) -> Tensor:
        a = self.attn(self.norm_1(x), freqs, input_pos, kv_len, mask)
        if self.dropout and self.training:  # no dropout op at all when sampling
            a = F.dropout(a, self.dropout, True)
        x = x + a
        m = self.mlp(self.norm_2(x))
        if self.dropout and self.training:
            m = F.dropout(m, self.dropout, True)
        return x + m


class GPT(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying (Press & Wolf 2017, https://arxiv.org/abs/1608.05859): fewer parameters, no loss in quality
        self.lm_head.weight = self.wte.weight
        self.register_buffer(
            "rope", rope_cache(config.block_size, config.head_size, config.rope_base), persistent=False
        )
        self.causal_mask: Tensor | None = None
        self.max_seq_length = config.block_size
        self.keep_caches = False
        # the caches' dtype where setup_caches is not told one; None: its rule (engine.decode's compiled
        # step sets bf16 where the linears make bf16 keys: its attention reads them at half the bytes)
        self.cache_dtype: torch.dtype | None = None
        # a training step's attention (a full-sequence pass with gradients): "sdpa" (its flash kernels) or
        # "matmul" (matmul_attention, whose backward is the faster on some CPUs; engine.attention_choice
        # measures); passes without gradients and cached ones always take SDPA, whose forward is the faster
        self.attention = "sdpa"
        self.apply(self._init_weights)
        # GPT-2 scaling: residual projections shrink with depth so the residual stream keeps its variance
        for name, p in self.named_parameters():
            if name.endswith(("proj.weight", "down.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 (nn.Module's signature)
        # .to(bf16) must not round the rotary angles: rebuild the table in fp32 on the new device
        super()._apply(fn, recurse)
        rope = rope_cache(self.config.block_size, self.config.head_size, self.config.rope_base)
        self.rope = rope.to(self.rope.device)
        return self

    def setup_caches(
        self, max_batch_size: int, max_seq_length: int | None = None, kv_dtype: torch.dtype | None = None
    ) -> None:
        """Allocate a KV cache per layer, and the causal mask, for up to max_seq_length positions, keys
        and values in kv_dtype (None: cache_dtype if set, else the weights' dtype; fp32 for bf16 weights
        on a CPU without AMX, whose SDPA runs bf16 several times slower). With
        keep_caches set (a compiled model: its graph holds on to these tensors), caches at least that
        large are reused instead; on a CPU they are the block size (a compiled step is built for one cache
        shape)."""
        max_seq_length = max_seq_length or self.config.block_size
        if max_seq_length > self.config.block_size:
            raise ValueError(f"max_seq_length={max_seq_length} exceeds block_size={self.config.block_size}")
        if self.keep_caches and self.wte.weight.device.type == "cpu":
            # a CPU's compiled step is a package per cache shape (engine.ahead_of_time): one length, so
            # every job shares it; its attention reads the filled slots only, so a longer cache costs memory
            max_seq_length = self.config.block_size
        kv_dtype = kv_dtype or self.cache_dtype
        device, dtype = self.wte.weight.device, kv_dtype or self.wte.weight.dtype
        if kv_dtype is None and dtype == torch.bfloat16 and slow_bf16_attention(device):
            # bf16 weights, fp32 keys/values and attention; with AMX bf16 caches decode faster (eager,
            # 2-vCPU Xeon: +2% to +15% tokens/s at 10.8M/85M, batch 1/8; benchmarks/README.md)
            dtype = torch.float32
        cache = self.blocks[0].attn.kv_cache
        if self.keep_caches and cache is not None and cache.k.dtype == dtype:
            big_enough = cache.k.size(0) >= max_batch_size and cache.k.size(2) >= max_seq_length
            if big_enough:
                return
        for block in self.blocks:
            block.attn.kv_cache = KVCache(
                max_batch_size, self.config.n_head, max_seq_length, self.config.head_size, dtype
            ).to(device)
        self.max_seq_length = max_seq_length
        self.causal_mask = torch.ones(max_seq_length, max_seq_length, dtype=torch.bool, device=device).tril()

    def clear_caches(self) -> None:
        """Release the KV caches (kept while keep_caches is set)."""
        if self.keep_caches:
            return
        for block in self.blocks:
            block.attn.kv_cache = None
        self.causal_mask = None

    def forward_segments(self, idx: Tensor, segments: Segments) -> Tensor:
        """A slot engine's mixed step (multiar.engine.segments): idx (N,), the decoding rows' next ids
        then the prompt chunks', written into the cache -> logits (rows + chunks, V): each decoding
        row's, then each chunk's last token's. Eager (complex rotary table)."""
        if self.causal_mask is None:
            raise RuntimeError("a mixed step needs the KV cache: call model.setup_caches() first")
        freqs = torch.view_as_complex(self.rope)[segments.token_positions()].unsqueeze(-2)  # (N, 1, hs/2)
        x = self.wte(idx[None])  # (1, N, C)
        for block in self.blocks:
            x = block(x, freqs, segments, segments.kv_len, self.causal_mask)
        return self.lm_head(self.norm_f(x[0, segments.logit_index()]))  # (rows + chunks, V)

    def forward(
        self,
        idx: Tensor,
        input_pos: int | Tensor | None = None,
        *,
        kv_len: int | None = None,
        logits_at: int | Tensor | None = None,
        run_block: Callable[..., Tensor] | None = None,
    ) -> Tensor:
        """idx (B, T) token ids -> logits (B, T, vocab_size).

        input_pos selects the cached path: an int (rows share positions input_pos .. input_pos+T-1),
        a (T,) tensor, or (B, T) per-row positions. kv_len bounds the cache slots attended to (default:
        the int path's end, else the whole cache). logits_at computes logits only at one column (an
        int) or one column per row ((B,) tensor): (B, 1, vocab_size), no lm_head over a whole prompt.
        run_block(block, x, freqs, input_pos, kv_len, mask) runs each block instead of the block itself:
        a compiled Block.forward (engine.compiled_blocks), given the real rotary table.
        """
        B, T = idx.shape
        # (block_size, hs/2) complex64 in eager mode; the real (block_size, hs/2, 2) table when compiled
        real = run_block is not None or torch.compiler.is_compiling()  # inductor has no complex ops
        freqs = self.rope if real else torch.view_as_complex(self.rope)
        mask = None
        if input_pos is None:
            if self.config.block_size < T:
                raise ValueError(f"sequence of {T} tokens exceeds block_size={self.config.block_size}")
            freqs = freqs[:T]
            kv_len = T
            if self.attention == "matmul" and torch.is_grad_enabled():  # a training step (see GPT.attention)
                device = idx.device.type  # the bias in the dtype the scores are in: autocast's if on
                dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
                mask = causal_bias(T, dtype or self.wte.weight.dtype, idx.device)
        else:
            if self.causal_mask is None:
                raise RuntimeError("input_pos given but no KV cache: call model.setup_caches() first")
            if isinstance(input_pos, int):
                if input_pos + T > self.max_seq_length:
                    raise ValueError(
                        f"positions up to {input_pos + T} exceed the cache ({self.max_seq_length})"
                    )
                freqs = freqs[input_pos : input_pos + T]  # (T, hs/2): a slice, no gather
                kv_len = input_pos + T
                if input_pos > 0 and T > 1:  # a block after earlier slots: causal within, all before
                    mask = self.causal_mask[input_pos : input_pos + T, :kv_len]
            else:
                kv_len = kv_len or self.max_seq_length
                freqs = freqs[input_pos]  # (T, hs/2) shared by every row, or (B, T, hs/2)
                # per row: slot s is visible from position p when s <= p; slots past a row's own
                # length hold stale values that are overwritten before any position can see them
                mask = self.causal_mask[input_pos, :kv_len]  # (T, kv_len) or (B, T, kv_len)
                if input_pos.dim() == 2:
                    mask = mask[:, None]  # (B, 1, T, kv_len)
        # a head axis to broadcast over, once for every layer: (..., T, 1, hs/2) (+ (2,) when real)
        freqs = freqs.unsqueeze(-2 if freqs.is_complex() else -3)
        x = self.wte(idx)  # (B, T, C)
        for block in self.blocks:
            if run_block is None:
                x = block(x, freqs, input_pos, kv_len, mask)
            else:
                x = run_block(block, x, freqs, input_pos, kv_len, mask)
        if logits_at is not None:
            if isinstance(logits_at, int):
                x = x[:, logits_at].unsqueeze(1)
            else:
                x = x[torch.arange(B, device=x.device), logits_at].unsqueeze(1)
        return self.lm_head(self.norm_f(x))  # (B, T, vocab_size)
