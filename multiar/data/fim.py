"""Fill-in-the-middle for any domain (Bavarian et al. 2022): a document's ids are cut at two random
points into prefix, middle and suffix and moved so the middle comes last, marked by three special
tokens the domain adds to its vocabulary. A model trained on such documents completes a middle given
both sides (`multiar generate prompt_prefix=... prompt_suffix=...`).

  PSM  <fim_prefix> prefix <fim_suffix> suffix <fim_middle> middle
  SPM  <fim_suffix> suffix <fim_prefix> prefix <fim_middle> middle

Applied at data time when blocks are packed (data.pack), never written into the token cache, on
pieces of a long document that fit one training window each: a
domain enables it with `domain.settings.fim_rate` (share of training documents) and `fim_spm_rate`
(share of those in SPM order). Control tags stay in front of the transformed document.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence


def document_rng(key: str, seed: int) -> random.Random:
    """A generator of its own per document and seed: the same blocks every time they are packed."""
    return random.Random(int.from_bytes(hashlib.sha256(f"{seed}:fim:{key}".encode()).digest()[:8], "big"))


def fim_transform(
    ids: Sequence[int], fim_ids: tuple[int, int, int], rng: random.Random, spm: bool = False
) -> list[int]:
    """ids rearranged around two cut points drawn uniformly (the middle may be empty)."""
    pre, mid, suf = fim_ids
    a, b = sorted(rng.randint(0, len(ids)) for _ in range(2))
    prefix, middle, suffix = list(ids[:a]), list(ids[a:b]), list(ids[b:])
    if spm:
        return [suf, *suffix, pre, *prefix, mid, *middle]
    return [pre, *prefix, suf, *suffix, mid, *middle]


def reassemble(ids: Sequence[int], fim_ids: tuple[int, int, int]) -> list[int]:
    """The original ids of a transformed document (PSM or SPM): prefix + middle + suffix."""
    pre, mid, suf = fim_ids
    ids = list(ids)
    m = ids.index(mid)
    head, middle = ids[:m], ids[m + 1 :]
    if head[0] == pre:  # PSM
        s = head.index(suf)
        return head[1:s] + middle + head[s + 1 :]
    p = head.index(pre)  # SPM
    return head[p + 1 :] + middle + head[1:p]


def infill_prompt(prefix: Sequence[int], suffix: Sequence[int], fim_ids: tuple[int, int, int]) -> list[int]:
    """The ids after BOS (and tags) that ask for the middle between prefix and suffix (PSM order)."""
    pre, mid, suf = fim_ids
    return [pre, *prefix, suf, *suffix, mid]


def transform_documents(
    keys: Sequence[str],
    docs: Sequence[list[int]],
    fim_ids: tuple[int, int, int],
    rate: float,
    spm_rate: float,
    seed: int,
    keep_front: Sequence[int] = (),
    max_len: int | None = None,
) -> list[list[int]]:
    """Each document transformed with probability `rate` (SPM with probability `spm_rate` among those);
    leading ids in `keep_front` (control tags) stay where they are. With max_len, a chosen document
    longer than that is first cut into pieces of max_len ids, each transformed on its own and packed as
    its own document: every piece fits one training window, so the model sees prefix, suffix, middle
    and the EOS that ends the middle together (with whole long files that EOS is rare and far away)."""
    out = []
    front = set(keep_front)
    for key, ids in zip(keys, docs, strict=True):
        rng = document_rng(key, seed)
        if rate > 0 and rng.random() < rate:
            n = 0
            while n < len(ids) and ids[n] in front:
                n += 1
            tags, body = list(ids[:n]), ids[n:]
            size = max(max_len - n - 3, 1) if max_len else max(len(body), 1)
            for start in range(0, max(len(body), 1), size):
                out.append(
                    tags
                    + fim_transform(body[start : start + size], fim_ids, rng, spm=rng.random() < spm_rate)
                )
        else:
            out.append(ids)
    return out
