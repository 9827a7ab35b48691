"""run_dir/reference/: what a run was trained and validated on, so `multiar eval`, `multiar quantize` and
the run's final metrics judge it on the same documents later, without the training job: the validation
split's document keys, files and control tags, and the unigram counts of the training split (the
baseline every model must beat).

reference/validation.json  {"root": folder the keys are relative to, "files": [...], "keys": [...],
                           "tags": {key: [tag, ...]} (tagged runs: each document's tags as trained, so
                           any tag source, a TSV table included, is replayed without it)}
reference/unigram.json     {"vocab_size": V, "counts": [...], "tokens": N}: target-token counts of the
                           training split (each document's ids and its EOS, as the loss sees them);
                           streamed runs count the data.fit_documents sample ("sample": true)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset

from multiar.data.corpus import is_validation
from multiar.data.source import Source
from multiar.domain import Domain
from multiar.engine.scoring import Documents
from multiar.files import Skips, write_new_text
from multiar.tags import Tagged

log = logging.getLogger("multiar")


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


def validation_tags(domain: Domain, val: Dataset) -> dict[str, list[str]] | None:
    """Each validation document's control tags as its encoded ids hold them (None: an untagged run)."""
    if not isinstance(domain, Tagged):
        return None
    tags = {}
    for batch in val.iter(batch_size=1000):
        for key, ids in zip(batch["key"], batch["ids"], strict=True):
            head = []  # the tag ids stand right after BOS, before the record's own ids
            for i in ids:
                if not domain.first_tag_id <= i < domain.vocab_size:
                    break
                head.append(i)
            tags[key] = domain.tags_of_ids(head)
    return tags


def write_reference(
    run_dir: Path,
    source: Any,
    counts: np.ndarray,
    val_fraction: float,
    keys: list[str] | None,
    tags: dict[str, list[str]] | None = None,
) -> None:
    """source: the run's data.Source; keys: the validation documents' keys. None (streaming) stores the
    split's rule instead: a document of the input is in validation when its key hashes below val_fraction.
    tags: each validation document's control tags (tagged runs)."""
    folder = run_dir / "reference"
    folder.mkdir(parents=True, exist_ok=True)
    validation: dict[str, Any] = {"root": source.root, "val_fraction": val_fraction, "keys": keys}
    if tags is not None:
        validation["tags"] = tags
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


def document_conditions(
    domain: Domain, stored: dict[str, list[str]] | None = None
) -> Callable[[str, Any], list[int]]:
    """conditions(key, record): the ids a document was trained with after BOS (its control tags): the
    stored tags where the reference has them, else read from the document by the run's tag source."""
    if not isinstance(domain, Tagged):
        return lambda key, record: []
    warned: list[bool] = []

    def conditions(key: str, record: Any) -> list[int]:
        if stored is not None and key in stored:
            return domain.ids_of_tags(stored[key])
        if domain.replayable:
            return domain.ids_of_tags(domain.document_tags(key, record))
        if not warned:
            warned.append(True)
            log.warning("%s: this run's tags came from a TSV table it does not keep: scored untagged", key)
        return []

    return conditions


def encoded_chunks(
    domain: Domain,
    source: Source,
    *,
    size: int | None = None,
    wanted: Callable[[str], bool] | None = None,
    strict: bool = False,
    tags: dict[str, list[str]] | None = None,
) -> Iterator[Documents]:
    """Encoded documents of source (those whose key is wanted, when given), `size` at a time (None: all
    in one, which carries the skip counts), each with the control tags it was trained with (`tags`:
    stored per key, else read from the document by the run's tag source); unreadable files and records
    the tokenizer cannot encode are skipped and counted, as in training (strict: the first raises)."""
    if size is not None and size < 1:
        raise ValueError(f"chunks of {size} documents: give 1 or more, or None for all at once")
    skips, bad = Skips(), Skips()
    conditions = document_conditions(domain, tags)
    encode = domain.base.encode if isinstance(domain, Tagged) else domain.encode  # tags: conditions
    docs = Documents([], [], [])
    for key, record in source.records(skips, strict):
        if wanted is not None and not wanted(key):
            continue
        bad.seen += 1
        try:
            ids, units, head = encode(record), domain.units(record), conditions(key, record)
        except Exception as err:  # a tokenizer library's failure on one record is that record's
            if strict:
                raise ValueError(f"{key}: cannot encode: {err} (data.strict=true)") from err
            bad.skip(key, f"{type(err).__name__}: {err}")
            continue
        docs.keys.append(key)
        docs.ids.append(ids)
        docs.units.append(units)
        docs.conditions.append(head)
        if size is not None and len(docs) >= size:
            yield docs
            docs = Documents([], [], [])
    if skips.count or bad.count:
        log.info("%s: %s; %s", domain.name, skips.summary(source.unit), bad.summary("records"))
    docs.files_skipped, docs.records_skipped = skips.count, bad.count
    if size is None or len(docs):
        yield docs


def read_documents(
    domain: Domain,
    source: Source,
    wanted: Callable[[str], bool] | None = None,
    strict: bool = False,
    tags: dict[str, list[str]] | None = None,
) -> Documents:
    """Every encoded document of source (those whose key is wanted, when given) in one Documents, with
    the skip counts: `encoded_chunks` without a size; a ValueError when none is left."""
    docs = next(encoded_chunks(domain, source, wanted=wanted, strict=strict, tags=tags))
    if not docs.ids:
        raise ValueError(f"{domain.name}: no document to evaluate in {source.root}")
    return docs


def reference_documents(run_dir: Path, domain: Domain, strict: bool = False) -> Documents:
    """The run's own validation split, as stored in reference/ when it trained: the documents of the
    stored keys (or, for a streamed run, those of its input whose key hashes into validation), each
    with its stored control tags, in the input's order. The one place validation documents are found."""
    ref = read_reference(run_dir)["validation"]
    if "hf_dataset" in ref:
        hf = ref["hf_dataset"]
        source = Source(domain, hf_dataset=hf["name"], hf_column=hf["column"], hf_split=hf["split"])
    else:
        root = Path(ref["root"])
        missing = [f for f in ref["files"] if not (root / f).exists()]
        if missing:
            raise FileNotFoundError(
                f"{root / missing[0]}: a validation file of {run_dir} is gone ({len(missing)} missing)"
            )
        source = Source(domain, [str(root / f) for f in ref["files"]])
        source.root = str(root)  # keys relative to the training input's folder, as stored
    if ref["keys"] is None:
        fraction = float(ref["val_fraction"])
        return read_documents(domain, source, lambda k: is_validation(k, fraction), strict)
    keys = set(ref["keys"])
    docs = read_documents(domain, source, keys.__contains__, strict, ref.get("tags"))
    if len(docs.keys) != len(keys):
        log.warning(
            "%s: %d of %d validation documents found (files changed since training?)",
            run_dir,
            len(docs.keys),
            len(keys),
        )
    return docs


def unigram_nats(log_probs: np.ndarray, ids: list[int], eos_id: int) -> float:
    """Negative log-likelihood (nats) of one document's targets (ids, then EOS) under the unigram model."""
    return -float(log_probs[np.asarray(ids, dtype=np.int64)].sum() + log_probs[eos_id])
