"""Speculative decoding: a cheap draft proposes k tokens per row, the target checks them in one forward
pass, and the standard accept/reject rule (Leviathan et al. 2023, Chen et al. 2023) keeps the output
distribution exactly the target's. Batched: each row accepts its own count and keeps its own positions
in both caches. Drafts: a smaller GPT with the same tokenizer, or `"ngram"` (prompt lookup: propose the
continuation of the latest earlier occurrence of the row's last n tokens; no second model).

Both distributions go through the same processors and sampling settings, so constraints (a grammar,
banned ids, min_new_tokens) hold for every emitted token. Knows no domain.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from multiar.engine.decode import as_rows, extend_row
from multiar.engine.model import GPT
from multiar.engine.sampling import LogitsProcessor, apply_processors, draw, probabilities


def ngram_proposal(row: list[int], k: int, n: int) -> list[int]:
    """Prompt lookup: the k tokens that followed the latest earlier occurrence of row's last n tokens
    (fewer n down to 1 when there is none), padded by repeating the last token."""
    for m in range(min(n, len(row) - 1), 0, -1):
        tail = row[-m:]
        for start in range(len(row) - m - 1, -1, -1):
            if row[start : start + m] == tail:
                found = row[start + m : start + m + k]
                return found + [found[-1]] * (k - len(found))
    return [row[-1]] * k


@dataclass
class SpeculativeStats:
    """What the draft bought: acceptance rate and tokens emitted per target forward pass; and why each
    row ended (`ends`, in batch order: "eos", "stop", "length" or "no_valid_token", as `stream` says)."""

    proposed: int = 0
    accepted: int = 0
    target_steps: int = 0
    emitted: int = 0
    per_row_steps: list[int] = field(default_factory=list)
    ends: list[str] = field(default_factory=list)

    def merge(self, other: SpeculativeStats) -> None:
        self.proposed += other.proposed
        self.accepted += other.accepted
        self.target_steps += other.target_steps
        self.emitted += other.emitted
        self.per_row_steps += other.per_row_steps
        self.ends += other.ends

    def as_dict(self) -> dict[str, float]:
        return {
            "acceptance_rate": self.accepted / max(self.proposed, 1),
            "tokens_per_target_step": self.emitted / max(sum(self.per_row_steps), 1),
            "target_steps": self.target_steps,
        }


class _Processed:
    """Runs processors (row by row, through generate's apply_processors) and min_new_tokens on logits
    for given per-row contexts."""

    def __init__(
        self, processors: Sequence[LogitsProcessor], eos_id: int | None, min_new: int, prompt_lens: list[int]
    ):
        self.processors, self.eos_id, self.min_new, self.prompt_lens = (
            list(processors),
            eos_id,
            min_new,
            prompt_lens,
        )

    def __call__(self, rows: list[list[int]], logits: Tensor, device: torch.device) -> Tensor:
        """rows: the ids before each logits row (B lists); logits (B, V) -> processed (B, V)."""
        if self.processors:
            lengths = [len(r) for r in rows]
            seq = torch.tensor([r + [0] * (max(lengths) - len(r)) for r in rows], device=device)
            logits = apply_processors(self.processors, seq, lengths, logits)
        if self.eos_id is not None and self.min_new:
            early = [len(r) - n < self.min_new for r, n in zip(rows, self.prompt_lens, strict=True)]
            logits = logits.clone()
            logits[torch.tensor(early, device=device), self.eos_id] = float("-inf")
        return logits


def accept_reject(
    p_all: Tensor, q_all: Tensor, d: Tensor, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """The speculative sampling rule: the target's distributions p_all (B, k+1, V) at the row's next k+1
    positions, the draft's q_all (B, k, V) and its proposals d (B, k) drawn from them -> how many
    proposals each row accepts (B,) and the token that follows them (B,). Proposal j is accepted with
    probability min(1, p/q); the first rejection draws from (p - q)+, all k accepted from p_all[:, k];
    what is emitted has the target's distribution. A position whose p is all zeros accepts nothing."""
    B, k = d.shape
    rows = torch.arange(B, device=d.device)
    pd = p_all[:, :k].gather(-1, d[..., None]).squeeze(-1)
    qd = q_all.gather(-1, d[..., None]).squeeze(-1)
    u = torch.rand(pd.shape, generator=generator, device=d.device)
    accept = (u * qd < pd).long()  # (B, k)
    n_acc = accept.cumprod(dim=1).sum(dim=1)  # (B,)
    at = n_acc.clamp(max=k - 1)
    residual = (p_all[rows, at] - q_all[rows, at]).clamp(min=0)
    empty = residual.sum(-1, keepdim=True) <= 0  # q covers p there: p itself
    residual = torch.where(empty, p_all[rows, at], residual)
    final = torch.where((n_acc == k)[:, None], p_all[:, k], residual)
    return n_acc, draw(final, generator)


def _distribution(
    logits: Tensor, temperature: float, top_k: int, top_p: float, min_p: float
) -> tuple[Tensor, Tensor]:
    """Sampling probabilities (B, V) of processed logits, all zeros for a row whose processors banned
    every token (instead of NaN), and that row flag (B,)."""
    banned = torch.isneginf(logits).all(dim=-1, keepdim=True)
    probs = probabilities(logits.masked_fill(banned, 0.0), temperature, top_k, top_p, min_p)
    return probs.masked_fill(banned, 0.0), banned[:, 0]


@torch.inference_mode()
def speculative_generate(
    target: GPT,
    prompt: Tensor | Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    draft: GPT | str = "ngram",
    k: int = 4,
    ngram: int = 3,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    eos_id: int | None = None,
    stop: Sequence[Sequence[int]] = (),
    min_new_tokens: int = 0,
    processors: Sequence[LogitsProcessor] = (),
    generator: torch.Generator | None = None,
) -> tuple[list[list[int]], SpeculativeStats]:
    """Continue each prompt row like `generate` (same arguments), k draft tokens checked per target step.
    Returns the new ids per row (without EOS or a matched stop) and the acceptance statistics, with
    each row's end reason as `stream` gives it."""
    if k < 1:
        raise ValueError(f"speculate_k must be >= 1, got {k}")
    use_model = isinstance(draft, GPT)
    if not use_model and draft != "ngram":
        raise ValueError(f"draft must be a GPT or 'ngram', got {draft!r}")
    if use_model and draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(
            f"draft vocab_size {draft.config.vocab_size} != target vocab_size {target.config.vocab_size}"
        )
    rows = as_rows(prompt)
    B, device = len(rows), target.wte.weight.device
    prompt_lens = [len(r) for r in rows]
    total = max(prompt_lens) + max_new_tokens + k + 1
    for model in (target, draft) if use_model else (target,):
        if total > model.config.block_size:
            raise ValueError(
                f"prompt ({max(prompt_lens)}) + max_new_tokens ({max_new_tokens}) + speculate_k ({k}) + 1 "
                f"= {total} exceeds block_size ({model.config.block_size})"
            )
    stops = [list(s) for s in stop if len(s)]
    process = _Processed(processors, eos_id, min_new_tokens, prompt_lens)
    models = [target, draft] if use_model else [target]
    training = [m.training for m in models]
    stats = SpeculativeStats(per_row_steps=[0] * B, ends=[""] * B)
    new: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    flat = torch.full((target.config.vocab_size,), 1.0 / target.config.vocab_size, device=device)
    try:
        for m in models:
            m.eval()
            m.setup_caches(max_batch_size=B, max_seq_length=total)
            # invariant between rounds: each cache holds row b's positions [0, len_b - 1), all but the
            # row's last token, which the next round feeds first
            if max(prompt_lens) > 1:
                width = max(prompt_lens) - 1
                pre = torch.tensor([r[:-1] + [0] * (width - len(r) + 1) for r in rows], device=device)
                m(pre, 0, logits_at=-1)
        while not all(done):
            lens = [len(r) for r in rows]
            kv_len = max(lens) + k
            # 1) the draft proposes k tokens per row, with q its (processed) distributions
            q_list, proposals = [], [[] for _ in range(B)]
            # rows of one length (always at batch 1) take the model's int-position path: slices, no gathers
            aligned = min(lens) == max(lens)
            if use_model:
                feed = torch.tensor([r[-2:] if len(r) >= 2 else r[-1:] * 2 for r in rows], device=device)
                if aligned and lens[0] >= 2:  # refeeding the row's last two tokens is idempotent
                    logits = draft(feed, lens[0] - 2, logits_at=-1)[:, -1]
                else:
                    start = torch.tensor([max(n - 2, 0) for n in lens], device=device)
                    pos = start[:, None] + torch.arange(2, device=device)  # (B, 2)
                    last = torch.tensor([1 if n >= 2 else 0 for n in lens], device=device)
                    logits = draft(feed, pos, kv_len=kv_len, logits_at=last)[:, -1]
                for j in range(k):
                    ctx = [r + p for r, p in zip(rows, proposals, strict=True)]
                    q, banned = _distribution(process(ctx, logits, device), temperature, top_k, top_p, min_p)
                    # a draft context with every token banned proposes from a flat q: any q keeps the
                    # rule exact, and the target (same processors) rejects what follows such a context
                    q = torch.where(banned[:, None], flat, q)
                    tok = draw(q, generator)
                    q_list.append(q)
                    for b, t in enumerate(tok.tolist()):
                        proposals[b].append(t)
                    if j + 1 < k:
                        if aligned:
                            logits = draft(tok[:, None], lens[0] + j)[:, -1]
                        else:
                            pos = torch.tensor([n + j for n in lens], device=device)[:, None]
                            logits = draft(tok[:, None], pos, kv_len=kv_len)[:, -1]
                q_all = torch.stack(q_list, dim=1)  # (B, k, V)
            else:
                proposals = [ngram_proposal(r, k, ngram) for r in rows]
                q_all = torch.nn.functional.one_hot(
                    torch.tensor(proposals, device=device), target.config.vocab_size
                ).float()
            d = torch.tensor(proposals, device=device)  # (B, k)
            # 2) the target scores the row's last token and the k proposals in one pass
            feed = torch.cat([torch.tensor([[r[-1]] for r in rows], device=device), d], dim=1)  # (B, k+1)
            if aligned:
                logits = target(feed, lens[0] - 1)  # (B, k+1, V)
            else:
                pos = torch.tensor([n - 1 for n in lens], device=device)[:, None] + torch.arange(
                    k + 1, device=device
                )
                logits = target(feed, pos, kv_len=kv_len)
            dists = [
                _distribution(
                    process([r + p[:j] for r, p in zip(rows, proposals, strict=True)], logits[:, j], device),
                    temperature,
                    top_k,
                    top_p,
                    min_p,
                )
                for j in range(k + 1)
            ]
            p_all = torch.stack([p for p, _ in dists], dim=1)  # (B, k+1, V); all-banned positions are zeros
            dead = torch.stack([banned for _, banned in dists], dim=1)  # (B, k+1)
            # 3) accept d_j with probability min(1, p/q); the first rejection draws from (p - q)+
            n_acc, extra = accept_reject(p_all, q_all, d, generator)
            # the token after the accepted ones comes from a position whose every token is banned: drawn
            # from nothing, it is dropped and the row ends there
            no_token = dead.gather(1, n_acc[:, None])[:, 0]
            stats.target_steps += 1
            # 4) append per row, stopping at EOS, a stop sequence, the token budget or no valid token
            for b, (n, x, barren) in enumerate(torch.stack([n_acc, extra, no_token.long()], dim=1).tolist()):
                if done[b]:
                    continue
                stats.proposed += k
                stats.accepted += n
                stats.per_row_steps[b] += 1
                for t in proposals[b][:n] + ([] if barren else [x]):
                    rows[b].append(t)
                    stats.emitted += t != eos_id
                    if extend_row(new[b], t, eos_id, stops):
                        stats.ends[b] = "eos" if t == eos_id else "stop"
                    elif len(new[b]) >= max_new_tokens:
                        stats.ends[b] = "length"
                    else:
                        continue
                    done[b] = True
                    break
                if barren and not done[b]:
                    stats.ends[b], done[b] = "no_valid_token", True
    finally:
        for m, was in zip(models, training, strict=True):
            m.clear_caches()
            m.train(was)
    return new, stats
