"""Sampling from a GPT with its KV cache: prefill, one-token decode, and the batched decode loop.

Everything that shapes the next-token distribution beyond temperature/top-k/top-p (grammar masks,
banned ids, length control) plugs in as a `LogitsProcessor`; they compose in order. Knows no domain.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from multiar.model import GPT

# (ids so far (B, t), logits for the next token (B, V)) -> logits (B, V); -inf bans a token
LogitsProcessor = Callable[[Tensor, Tensor], Tensor]


def ban_tokens(token_ids: Sequence[int]) -> LogitsProcessor:
    """A processor that never lets the given ids be sampled (e.g. PAD, BOS)."""
    banned = torch.tensor(sorted(set(token_ids)), dtype=torch.long)

    def processor(ids: Tensor, logits: Tensor) -> Tensor:
        return logits.index_fill(-1, banned.to(logits.device), float("-inf"))

    return processor


def min_new_tokens(n: int, prompt_length: int, eos_id: int) -> LogitsProcessor:
    """A processor that bans EOS until n new tokens follow a prompt of prompt_length: no empty samples."""

    eos = torch.tensor([eos_id])

    def processor(ids: Tensor, logits: Tensor) -> Tensor:
        if ids.size(1) < prompt_length + n:
            logits = logits.index_fill(-1, eos.to(logits.device), float("-inf"))
        return logits

    return processor


def sample(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw one token per row from logits (B, V) -> (B,). temperature 0 is greedy; top_k 0 is off."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # drop a token when the mass before it already reaches top_p; the most likely one always stays
        drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    # Gumbel-style exponential race instead of torch.multinomial: same distribution, no host sync
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / noise).argmax(dim=-1)


def prefill(model: GPT, idx: Tensor) -> Tensor:
    """Run the prompt idx (B, T) through the model, filling the cache; logits for the next token (B, V)."""
    input_pos = torch.arange(idx.size(1), device=idx.device)
    return model(idx, input_pos)[:, -1]


def decode_one_token(model: GPT, token: Tensor, pos: int) -> Tensor:
    """Feed one token per row (B, 1) at position pos; logits for the following token (B, V)."""
    input_pos = torch.tensor([pos], device=token.device)
    return model(token, input_pos)[:, -1]


@torch.inference_mode()
def generate(
    model: GPT,
    prompt: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    processors: Sequence[LogitsProcessor] = (),
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Continue each row of prompt (B, T); return the new ids per row, cut before the first eos_id."""
    B, T = prompt.shape
    total = T + max_new_tokens
    if T == 0:
        raise ValueError("the prompt is empty: it needs at least a BOS token")
    if total > model.config.block_size:
        raise ValueError(
            f"prompt ({T}) + max_new_tokens ({max_new_tokens}) = {total} exceeds the model's "
            f"block_size ({model.config.block_size})"
        )
    was_training = model.training
    model.eval()
    model.setup_caches(max_batch_size=B, max_seq_length=total)
    seq = torch.empty(B, total, dtype=torch.long, device=prompt.device)  # (B, T + new)
    seq[:, :T] = prompt
    done = torch.zeros(B, dtype=torch.bool, device=prompt.device)
    banned_all = torch.zeros(B, dtype=torch.bool, device=prompt.device)  # checked once, after the loop
    n = 0
    try:  # the caches are released whatever happens, so a failed call leaves the model as it was
        logits = prefill(model, prompt)
        for n in range(max_new_tokens):
            for process in processors:
                logits = process(seq[:, : T + n], logits)
            if processors:
                banned_all |= (logits == float("-inf")).all(dim=-1) & ~done
            token = sample(logits, temperature, top_k, top_p, generator)  # (B,)
            if eos_id is not None:
                token = token.masked_fill(done, eos_id)  # finished rows only repeat EOS
                done |= token == eos_id
            seq[:, T + n] = token
            if eos_id is not None and bool(done.all()):
                break
            if n + 1 < max_new_tokens:
                logits = decode_one_token(model, token[:, None], T + n)
    finally:
        model.clear_caches()
        model.train(was_training)
    if bool(banned_all.any()):
        rows = banned_all.nonzero().flatten().tolist()
        raise ValueError(
            f"the logits processors banned every token for row(s) {rows}: nothing can be sampled"
        )
    out = []
    for row in seq[:, T : T + n + 1].tolist():
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id)]
        out.append(row)
    return out
