"""How likely the model finds documents: the log-likelihood behind `multiar eval`, `multiar score` and
ranking generated samples by perplexity (`rank_by=ppl`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from multiar.model import GPT


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

    prefixes: ids after BOS that condition a document without being scored (control tags);
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
        logits = model(x.to(device)).float()  # (B, T, V)
        loss = F.cross_entropy(logits.transpose(1, 2), y.to(device), ignore_index=-100, reduction="none")
        for (d, _, _), value in zip(chunk, loss.sum(dim=1).tolist(), strict=True):
            nats[d] += value
    return nats
