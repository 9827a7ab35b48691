"""How likely the model finds documents: the one log-likelihood behind `multiar eval`, `multiar score`,
`multiar quantize`'s report, a run's final metrics and ranking samples by perplexity (`rank_by=ppl`).

A document is scored on its own: BOS, its conditions (control tags, a prompt: context, never targets),
then its ids and EOS as targets, in windows of block_size + 1 like training's packing, so its figure never
depends on which other documents are scored with it. Training's in-loop `val/loss` is the packed
equivalent, capped by `trainer.limit_val_batches`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from multiar.engine.model import GPT


@dataclass
class Documents:
    """Encoded documents: each one's key, ids (the targets, before EOS), natural units, and the condition
    ids after BOS it was trained with (its control tags; empty for an untagged run)."""

    keys: list[str]
    ids: list[list[int]]
    units: list[int]
    conditions: list[list[int]] = field(default_factory=list)
    files_skipped: int = 0
    records_skipped: int = 0

    def __post_init__(self) -> None:
        if not self.conditions:
            self.conditions = [[] for _ in self.ids]

    def __len__(self) -> int:
        return len(self.ids)

    def head(self, n: int | None) -> Documents:
        """The first n documents (all when n is None)."""
        if n is None or n >= len(self):
            return self
        return Documents(self.keys[:n], self.ids[:n], self.units[:n], self.conditions[:n])

    @property
    def tagged(self) -> bool:
        return any(self.conditions)


def token_nats(logits: Tensor, targets: Tensor) -> Tensor:
    """Next-token negative log-likelihood (nats) per position, (B, T); targets of -100 count 0.
    The one definition of the loss: training's packed blocks and scored documents both use it."""
    B, T, V = logits.shape
    flat = F.cross_entropy(logits.reshape(B * T, V).float(), targets.reshape(B * T), reduction="none")
    return flat.view(B, T)  # ignore_index is -100 by default: those positions are 0


@torch.inference_mode()
def document_nats(
    model: GPT,
    docs: Sequence[Sequence[int]],
    bos_id: int,
    eos_id: int,
    batch_size: int = 16,
    prefixes: Sequence[Sequence[int]] | None = None,
    ended: Sequence[bool] | None = None,
) -> list[float]:
    """Negative log-likelihood (nats) of each document's targets (its ids, then EOS) under model.

    prefixes: ids after BOS that condition a document without being scored (control tags, a prompt);
    ended: per document, whether EOS is a target (False for a sample cut at a length cap).
    """
    model.eval()
    block, device = model.config.block_size, model.wte.weight.device
    windows: list[tuple[int, list[int], int]] = []  # (document, up to block_size + 1 ids, unscored)
    for d, ids in enumerate(docs):
        head = [bos_id, *(prefixes[d] if prefixes else [])]
        seq = head + list(ids) + ([eos_id] if ended is None or ended[d] else [])
        windows += [(d, seq[s : s + block + 1], len(head) - 1 - s) for s in range(0, len(seq) - 1, block)]
    nats = [0.0] * len(docs)
    order = sorted(range(len(windows)), key=lambda i: len(windows[i][1]))  # like lengths batch together
    for start in range(0, len(order), batch_size):
        chunk = [windows[i] for i in order[start : start + batch_size]]
        T = max(len(w) for _, w, _ in chunk) - 1
        x = torch.zeros(len(chunk), T, dtype=torch.long)
        y = torch.full((len(chunk), T), -100, dtype=torch.long)
        for row, (_, w, unscored) in enumerate(chunk):
            x[row, : len(w) - 1] = torch.tensor(w[:-1])
            y[row, : len(w) - 1] = torch.tensor(w[1:])
            y[row, : max(unscored, 0)] = -100  # the prefix's own ids are conditions, not targets
        loss = token_nats(model(x.to(device)), y.to(device))  # (B, T)
        for (d, _, _), value in zip(chunk, loss.sum(dim=1).tolist(), strict=True):
            nats[d] += value
    return nats


def summary(nats: Sequence[float], docs: Documents, unit: str) -> dict[str, Any]:
    """Loss per token, perplexity, bits and perplexity per natural unit of a set of documents."""
    total, tokens, units = sum(nats), sum(len(i) + 1 for i in docs.ids), sum(docs.units)
    return {
        "loss": total / max(tokens, 1),
        "ppl": math.exp(total / max(tokens, 1)),
        "bits_per_unit": total / max(units, 1) / math.log(2),
        "ppl_per_unit": math.exp(total / max(units, 1)),
        "unit": unit,
        "tokens": tokens,
        "units": units,
        "documents": len(docs.ids),
    }


def score_documents(
    model: GPT, docs: Documents, bos_id: int, eos_id: int, batch_size: int = 16, conditioned: bool = True
) -> list[float]:
    """Each document's nats as it was trained (its conditions as context), or unconditioned."""
    prefixes = docs.conditions if conditioned and docs.tagged else None
    return document_nats(model, docs.ids, bos_id, eos_id, batch_size, prefixes)
