"""Speculative decoding: a cheap draft proposes k tokens per row, the target checks them in one forward
pass, and the standard accept/reject rule (Leviathan et al. 2023, Chen et al. 2023) keeps the output
distribution exactly the target's. Batched: each row accepts its own count and keeps its own positions
in both caches. Drafts: a smaller GPT with the same tokenizer, or `"ngram"` (prompt lookup: propose the
continuation of the latest earlier occurrence of the row's last n tokens; no second model).

Both distributions go through the same processors and sampling settings, so constraints (a grammar,
banned ids, min_new_tokens) hold for every emitted token; a processor with a per-token check
(checked_draw.TokenCheck) restricts the target's distribution to the tokens it accepts, as plain
decoding's checked draw does, while the draft proposes unchecked (an unsound proposal has target
probability 0 and is rejected). Knows no domain.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from multiar.engine.checked_draw import checked_sample, sound_probabilities
from multiar.engine.model import GPT
from multiar.engine.rows import Rows, as_rows
from multiar.engine.sampling import LogitsProcessor, draw, probabilities


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


def _distribution(processed: tuple[Tensor, Tensor | None], sampling: dict) -> tuple[Tensor, Tensor]:
    """Sampling probabilities (B, V) of logits processed by `Rows.process`, all zeros for a row whose
    processors banned every token (instead of NaN), and that row flag (B,)."""
    logits, banned = processed
    probs = probabilities(logits, **sampling)
    if banned is None:
        return probs, torch.zeros(probs.size(0), dtype=torch.bool, device=probs.device)
    return probs.masked_fill(banned[:, None], 0.0), banned


def _draft_proposals(
    draft: GPT, rows: Rows, k: int, kv_len: int, sampling: dict, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """The draft model's k proposals per row (B, k), written after each row's ids, and the (processed)
    distributions they were drawn from (B, k, V)."""
    n, at = rows.length.values, rows.length.tensor
    if rows.length.aligned and n[0] >= 2:  # refeeding the row's last two tokens is idempotent
        logits = draft(rows.seq[:, n[0] - 2 : n[0]], n[0] - 2, logits_at=-1)[:, -1]
    else:
        pos = (at - 2).clamp(min=0)[:, None] + torch.arange(2, device=at.device)  # (B, 2)
        logits = draft(rows.seq.gather(1, pos), pos, kv_len=kv_len, logits_at=(at >= 2).long())[:, -1]
    vocab = logits.size(-1)
    flat = torch.full((vocab,), 1.0 / vocab, device=at.device)
    qs, tokens = [], []
    for j in range(k):
        q, banned = _distribution(rows.process(logits, extra=j), sampling)
        # a draft context with every token banned proposes from a flat q: any q keeps the rule exact,
        # and the target (same processors) rejects what follows such a context
        q = torch.where(banned[:, None], flat, q)
        tok = draw(q, generator)
        rows.seq[rows.index, at + j] = tok  # the context of the next one
        qs.append(q)
        tokens.append(tok)
        if j + 1 < k:
            pos = n[0] + j if rows.length.aligned else (at + j)[:, None]
            logits = draft(tok[:, None], pos, kv_len=kv_len)[:, -1]
    return torch.stack(tokens, dim=1), torch.stack(qs, dim=1)


def _ngram_proposals(rows: Rows, k: int, ngram: int, vocab: int) -> tuple[Tensor, Tensor]:
    """Prompt-lookup proposals per row (B, k), written after each row's ids, and their one-hot q."""
    ids = rows.seq.tolist()
    d = torch.tensor(
        [ngram_proposal(r[:n], k, ngram) for r, n in zip(ids, rows.length.values, strict=True)],
        device=rows.seq.device,
    )
    at = rows.length.tensor[:, None] + torch.arange(k, device=d.device)
    rows.seq.scatter_(1, at, d)
    return d, torch.nn.functional.one_hot(d, vocab).float()


def _target_check(target: GPT, rows: Rows, k: int, kv_len: int, sampling: dict) -> tuple[Tensor, Tensor]:
    """The target scores each row's last token and its k proposals in one pass: its distributions at
    the k+1 positions (B, k+1, V), all zeros where every token is banned, and those flags (B, k+1)."""
    n, at = rows.length.values, rows.length.tensor
    if rows.length.aligned:
        logits = target(rows.seq[:, n[0] - 1 : n[0] + k], n[0] - 1)  # (B, k+1, V)
    else:
        pos = (at - 1)[:, None] + torch.arange(k + 1, device=at.device)
        logits = target(rows.seq.gather(1, pos), pos, kv_len=kv_len)
    dists = [_target_distribution(rows, logits[:, j], j, sampling) for j in range(k + 1)]
    return torch.stack([p for p, _ in dists], dim=1), torch.stack([b for _, b in dists], dim=1)


def _target_distribution(rows: Rows, logits: Tensor, extra: int, sampling: dict) -> tuple[Tensor, Tensor]:
    """The target's distribution (B, V) after each row's ids and `extra` draft tokens, and the rows with
    none (B,): where a row has a per-token check (a grammar), restricted to the tokens it accepts, as
    `checked_sample` draws: greedy the most likely sound token; sampling asks about every token with
    probability (exact, and as costly as the support is wide: top_k or top_p narrow it)."""
    processed = rows.process(logits, extra=extra)
    probs, dead = _distribution(processed, sampling)
    if not rows.checked:
        return probs, dead
    probs, dead = probs.clone(), dead.clone()
    for b in range(probs.size(0)):
        if dead[b] or rows.ends[b] is not None or not rows.checks(b):
            continue

        def sound(_: int, token: int, b: int = b) -> bool:
            return rows.sound(b, token, extra)

        if sampling["temperature"] <= 0:
            token, none = checked_sample(processed[0][b : b + 1], None, sound, temperature=0)
            probs[b] = torch.nn.functional.one_hot(token[0], probs.size(-1)).to(probs.dtype)
        else:
            probs[b] = sound_probabilities(probs[b], lambda t, f=sound: f(0, t))
            none = probs[b].sum(-1, keepdim=True) <= 0
        if none.item():
            probs[b], dead[b] = 0.0, True
    return probs, dead


def _check_models(target: GPT, draft: GPT | str, k: int, longest: int, max_new_tokens: int) -> int:
    """The refusals of `speculative_generate`'s arguments; the cache length the round needs."""
    if k < 1:
        raise ValueError(f"speculate_k must be >= 1, got {k}")
    if not isinstance(draft, GPT) and draft != "ngram":
        raise ValueError(f"draft must be a GPT or 'ngram', got {draft!r}")
    if isinstance(draft, GPT) and draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(
            f"draft vocab_size {draft.config.vocab_size} != target vocab_size {target.config.vocab_size}"
        )
    total = longest + max_new_tokens + k + 1
    for model in (target, draft) if isinstance(draft, GPT) else (target,):
        if total > model.config.block_size:
            raise ValueError(
                f"prompt ({longest}) + max_new_tokens ({max_new_tokens}) + speculate_k ({k}) + 1 "
                f"= {total} exceeds block_size ({model.config.block_size})"
            )
    return total


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
    prompts = as_rows(prompt)
    T, B = max(map(len, prompts)), len(prompts)
    total = _check_models(target, draft, k, T, max_new_tokens)
    rows = Rows(
        prompts,
        max_new_tokens,
        device=target.wte.weight.device,
        width=total,
        eos_id=eos_id,
        stop=stop,
        min_new_tokens=min_new_tokens,
        processors=processors,
    )
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    models = [target, draft] if isinstance(draft, GPT) else [target]
    training = [m.training for m in models]
    stats = SpeculativeStats(per_row_steps=[0] * B)
    try:
        _prefill(models, rows, T, total)
        while not rows.done:
            kv_len = max(rows.length.values) + k
            if isinstance(draft, GPT):
                d, q_all = _draft_proposals(draft, rows, k, kv_len, sampling, generator)
            else:
                d, q_all = _ngram_proposals(rows, k, ngram, target.config.vocab_size)
            p_all, dead = _target_check(target, rows, k, kv_len, sampling)
            n_acc, extra = accept_reject(p_all, q_all, d, generator)
            # the token after the accepted ones comes from a position whose every token is banned: drawn
            # from nothing, it is dropped and the row ends there
            barren = dead.gather(1, n_acc[:, None])
            rows.seq[rows.index, rows.length.tensor + n_acc] = extra
            stats.target_steps += 1
            _accept(rows, torch.cat([d, n_acc[:, None], extra[:, None], barren.long()], dim=1), stats)
    finally:
        for m, was in zip(models, training, strict=True):
            m.clear_caches()
            m.train(was)
    stats.ends = [str(e) for e in rows.ends]
    return rows.new, stats


def _prefill(models: list[GPT], rows: Rows, longest: int, total: int) -> None:
    """Set up each model's cache for the batch and fill it with the prompts: between rounds each cache
    holds row b's positions [0, length_b - 1), all but the row's last token, which a round feeds first."""
    for m in models:
        m.eval()
        m.setup_caches(max_batch_size=len(rows.ends), max_seq_length=total)
        if longest > 1:
            m(rows.seq[:, : longest - 1], 0, logits_at=-1)


def _accept(rows: Rows, outcome: Tensor, stats: SpeculativeStats) -> None:
    """Each running row takes its accepted proposals and the token after them (outcome (B, k+3): the
    proposals, how many were accepted, that token, whether it was barren), stopping where the row ends
    (EOS, a stop, the token budget, no valid token); the counts go to stats."""
    taken = []
    for b, (*proposals, n, x, barren) in enumerate(outcome.tolist()):
        if rows.ends[b] is not None:
            taken.append(0)
            continue
        stats.proposed += len(proposals)
        stats.accepted += n
        stats.per_row_steps[b] += 1
        tokens = proposals[:n] + ([] if barren else [x])
        why = None
        for i, t in enumerate(tokens):
            stats.emitted += t != rows.eos_id
            why = rows.push(b, t)
            if why is not None:
                tokens = tokens[: i + 1]
                break
        taken.append(len(tokens))
        if why is not None or barren:
            rows.end(b, why or "no_valid_token")
    rows.length.add(taken)
