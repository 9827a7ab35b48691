"""run_dir/reference/: what a run was trained and validated on, so `multiar eval` can judge it later
without the training job: the validation split's document keys and files, and the unigram counts of the
training split (the baseline every model must beat).

reference/validation.json  {"root": folder the keys are relative to, "files": [...], "keys": [...]}
reference/unigram.json     {"vocab_size": V, "counts": [...], "tokens": N}: target-token counts of the
                           training split (each document's ids and its EOS, as the loss sees them);
                           streamed runs count the data.fit_documents sample ("sample": true);
                           streamed runs count the data.fit_documents sample ("sample": true)
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset

from multiar.domain import write_new_text


def unigram_counts(documents: Iterable[Sequence[int]], vocab_size: int, eos_id: int) -> np.ndarray:
    """How often each id is a target in documents (id lists): every id, and one EOS per document."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for ids in documents:
        counts += np.bincount(np.asarray(ids, dtype=np.int64), minlength=vocab_size)[:vocab_size]
        counts[eos_id] += 1
    return counts


def dataset_ids(ds: Dataset) -> Iterator[np.ndarray]:
    """The `ids` of every document of a tokenized split, read in Arrow batches."""
    for batch in ds.with_format("numpy").iter(batch_size=1000):
        yield from batch["ids"]


def unigram_log_probs(counts: np.ndarray) -> np.ndarray:
    """Add-one smoothed log-probabilities (nats) of a unigram model with these counts."""
    smoothed = counts.astype(np.float64) + 1.0
    return np.log(smoothed / smoothed.sum())


def write_reference(
    run_dir: Path, source: Any, counts: np.ndarray, val_fraction: float, keys: list[str] | None
) -> None:
    """source: the run's data.Source; keys: the validation documents' keys. None (streaming) stores the
    split's rule instead: a document of the input is in validation when its key hashes below val_fraction."""
    folder = run_dir / "reference"
    folder.mkdir(parents=True, exist_ok=True)
    validation: dict[str, Any] = {"root": source.root, "val_fraction": val_fraction, "keys": keys}
    if source.dataset is not None:
        validation["hf_dataset"] = {"name": source.root, "column": source.column, "split": source.split}
        validation["files"] = []
    elif keys is not None:
        validation["files"] = sorted({k.rsplit("#", 1)[0] for k in keys})
    else:
        validation["files"] = [Path(f).resolve().relative_to(source.root).as_posix() for f in source.files]
    write_new_text(folder / "validation.json", json.dumps(validation, indent=1) + "\n", overwrite=True)
    unigram = {
        "vocab_size": len(counts),
        "tokens": int(counts.sum()),
        "counts": counts.tolist(),
        "sample": keys is None,
    }
    write_new_text(folder / "unigram.json", json.dumps(unigram) + "\n", overwrite=True)


def read_reference(run_dir: Path) -> dict[str, Any]:
    """The reference folder's contents; FileNotFoundError naming the folder for runs that have none."""
    folder = Path(run_dir) / "reference"
    if not (folder / "unigram.json").exists():
        raise FileNotFoundError(
            f"{folder}: no reference (runs trained before multiar wrote it): retrain, or give data.paths"
        )
    return {
        "validation": json.loads((folder / "validation.json").read_text()),
        "unigram": json.loads((folder / "unigram.json").read_text()),
    }


def unigram_nats(log_probs: np.ndarray, ids: list[int], eos_id: int) -> float:
    """Negative log-likelihood (nats) of one document's targets (ids, then EOS) under the unigram model."""
    return -float(log_probs[np.asarray(ids, dtype=np.int64)].sum() + log_probs[eos_id])


def perplexity(nats: float, count: int) -> float:
    return math.exp(nats / max(count, 1))
