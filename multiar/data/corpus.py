"""Files -> records -> token ids (HF datasets, cached on disk) -> packed blocks -> a LightningDataModule.

The split is by document (a file, or a record within a file), decided by a hash of the document's
key, so it is deterministic and never cuts a validation block out of a training document.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset, Features, Sequence, Value, load_from_disk

from multiar.data.source import Source
from multiar.domain import Domain, domain_state_digest
from multiar.files import Skips
from multiar.tags import Tagged

log = logging.getLogger("multiar")

CACHE_FORMAT = 5  # bump when the cached layout or the meaning of its contents changes (4: music train_stats;
# 5: code encodes special-token text as text, code.json keeps every setting)
SPLIT_FEATURES = Features({"key": Value("string"), "ids": Sequence(Value("int32")), "val": Value("bool")})


def is_validation(key: str, val_fraction: float) -> bool:
    """Deterministic split: a document goes to validation when its key hashes below val_fraction."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    return h < val_fraction


@dataclass
class Corpus:
    """A tokenized corpus: the fitted domain and its train/validation documents as HF datasets."""

    domain: Domain
    train: Dataset
    val: Dataset
    cache_dir: Path
    stats: dict[str, Any]


def prepare_corpus(
    domain: Domain,
    settings: dict | None = None,
    paths: list[str] | None = None,
    *,
    cache_dir: str | Path,
    max_documents: int | None = None,
    val_fraction: float = 0.05,
    strict: bool = False,
    fit: bool = True,
    source: Source | None = None,
    augment: dict[str, Any] | None = None,
) -> Corpus:
    """Read, drop exact duplicates, split, fit the tokenizer on the training part and encode; reuse the
    on-disk cache when the input, the domain settings and the split are unchanged.

    The input is `source` when given (files or an HF dataset column), else the files under paths (the
    domain's bundled data when None). augment: the domain's `augment(record, augment)` adds shifted
    copies of each training document (music; validation is never augmented). fit=False keeps the domain's tokenizer state as given (a resumed
    run's own tokenizer): the data is encoded with it, and the cache entry is keyed by that state.
    """
    domain_name = domain.name
    settings = dict(settings or {})  # what built the domain: part of the cache key
    source = source or Source(domain, paths)
    key = _cache_key(domain, settings, source, max_documents, val_fraction, fit, augment)
    root = Path(cache_dir).expanduser() / domain_name / key
    if (root / "complete.json").exists():
        log.info("%s: reusing tokenized data from %s", domain_name, root)
        return _load_cached(
            domain if not fit else None,
            type(domain),
            root,
            domain.base if isinstance(domain, Tagged) else None,
        )
    docs = _find_documents(domain, source, strict, max_documents, val_fraction)
    if fit:
        _fit_training(domain, source, docs)
    stats = _write_entry(domain, source, docs, root, key, strict, augment)
    log.info("%s: %s; %s", domain_name, docs.skips.summary(source.unit), json.dumps(stats))
    return _load_cached(
        domain if not fit else None, type(domain), root, domain.base if isinstance(domain, Tagged) else None
    )


def _cache_key(
    domain: Domain,
    settings: dict,
    source: Source,
    max_documents: int | None,
    val_fraction: float,
    fit: bool,
    augment: dict[str, Any] | None,
) -> str:
    """The cache entry's name: a hash of everything that decides its contents."""
    # fit=False encodes with the domain's own tokenizer state, so that state is part of the key
    state = None if fit else domain_state_digest(domain)
    blob = json.dumps(
        [
            CACHE_FORMAT,
            domain.name,
            settings,
            source.fingerprint,
            max_documents,
            val_fraction,
            state,
            augment,
        ],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


@dataclass
class _Documents:
    """Pass 1's answer: the documents to use, those held out for validation, and what was skipped."""

    wanted: set[str]
    val_keys: set[str]
    skips: Skips  # unreadable files (the input's units)
    unusable: Skips  # records that are no document
    duplicates: int


def _find_documents(
    domain: Domain, source: Source, strict: bool, max_documents: int | None, val_fraction: float
) -> _Documents:
    """Pass 1: which documents exist, and which of them are held out for validation."""
    # bad files are skipped and counted here, once; the later passes read without counting
    skips = Skips()
    keys, unusable, duplicates = _unique_documents(domain, source, skips, strict)
    if skips.count and skips.count == skips.seen:
        raise ValueError(
            f"{domain.name}: every one of the {skips.seen} input {source.unit} is unreadable; first: {skips.reasons[0]}"
        )
    keys = keys[:max_documents]
    if len(keys) < 2:
        raise ValueError(
            f"{domain.name}: need at least 2 documents to split train/validation, found {len(keys)}"
        )
    val_keys = _validation_keys(keys, val_fraction)
    if unusable.count:
        for line in unusable.by_file():
            log.warning(line)
        log.info("%s: %s", domain.name, unusable.summary("records"))
    return _Documents(set(keys), val_keys, skips, unusable, duplicates)


def _unique_documents(
    domain: Domain, source: Source, skips: Skips, strict: bool
) -> tuple[list[str], Skips, int]:
    """The keys of the distinct usable documents in reading order, the unusable records, the duplicates."""
    # exact duplicates are dropped before the split, so one text can never sit on both sides of it
    keys: list[str] = []
    seen: set[bytes] = set()
    duplicates = 0
    unusable = Skips()  # records that are no document (empty, bad letters): skipped before the split
    for k, record in source.records(skips, strict):
        unusable.seen += 1
        try:
            digest = hashlib.sha256(domain.content(record)).digest()
        except Exception as err:
            if strict:
                raise ValueError(f"{k}: {err} (data.strict=true)") from err
            unusable.skip(k, str(err), quiet=True)  # one line per file and reason, in _find_documents
            continue
        if digest in seen:
            duplicates += 1
            continue
        seen.add(digest)
        keys.append(k)
    return keys, unusable, duplicates


def _validation_keys(keys: list[str], val_fraction: float) -> set[str]:
    """The documents held out for validation: by key hash, at least one, never all of them."""
    val_keys = {k for k in keys if is_validation(k, val_fraction)}
    if not val_keys:  # tiny corpora: still validate on one document, chosen by the same hash order
        val_keys = {min(keys, key=lambda k: hashlib.sha256(k.encode()).digest())}
    if len(val_keys) == len(keys):
        val_keys.discard(keys[0])
    return val_keys


def _fit_training(domain: Domain, source: Source, docs: _Documents) -> None:
    """Pass 2: fit the tokenizer state on the training documents only, so validation stays unseen."""
    training = ((k, r) for k, r in source.records() if k in docs.wanted and k not in docs.val_keys)
    domain.fit_documents(training)  # control tags: fitted from the documents' keys too


@dataclass
class _EncodeCounts:
    """What pass 3's generator skipped and added, read once it has run to the end."""

    bad_records: Skips
    augmented: int = 0  # copies added by augmentation


def _encoder(
    domain: Domain,
    source: Source,
    docs: _Documents,
    strict: bool,
    augment: dict[str, Any] | None,
    counts: _EncodeCounts,
) -> Callable[[], Iterator[dict]]:
    """Pass 3's generator: one read of the input for both splits, counting into `counts`."""
    # bound after pass 2, so it encodes with the fitted state
    encode = domain.encode_document
    bad_records = counts.bad_records

    def encoded() -> Iterator[dict]:
        for k, record in source.records():
            if k not in docs.wanted:
                continue
            bad_records.seen += 1
            try:
                ids = encode(k, record)
            except Exception as err:  # a tokenizer library's failure on one record is that record's
                if strict:
                    raise ValueError(f"{k}: cannot encode: {err} (data.strict=true)") from err
                bad_records.skip(k, f"{type(err).__name__}: {err}")
                continue
            yield {"key": k, "ids": ids, "val": k in docs.val_keys}
            if augment and k not in docs.val_keys:
                copies = 0
                for suffix, copy in domain.augment(record, augment):
                    try:
                        yield {"key": f"{k}@{suffix}", "ids": encode(k, copy), "val": False}
                        copies += 1
                    except Exception as err:  # a shift out of the tokenizer's range: that copy only
                        bad_records.skip(f"{k}@{suffix}", f"{type(err).__name__}: {err}", quiet=True)
                counts.augmented += copies

    return encoded


def _write_entry(
    domain: Domain,
    source: Source,
    docs: _Documents,
    root: Path,
    key: str,
    strict: bool,
    augment: dict[str, Any] | None,
) -> dict[str, Any]:
    """Pass 3: encode, and write the cache entry at root whole or not at all; its stats."""
    # a record the domain cannot encode is skipped and counted
    counts = _EncodeCounts(Skips())
    encoded = _encoder(domain, source, docs, strict, augment, counts)
    # a private partial folder per process: DDP ranks may prepare the same corpus at the same time
    tmp = root.with_name(f"{root.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        domain.save(tmp / "domain")
        split_sets = _save_splits(encoded, tmp, key, domain.name)
        stats = _corpus_stats(domain, source, docs, split_sets, counts, augment)
        (tmp / "complete.json").write_text(json.dumps(stats, indent=1))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # no half-built entry left behind
        raise
    if root.exists() and not (root / "complete.json").exists():
        shutil.rmtree(root, ignore_errors=True)  # debris of an older, interrupted layout
    try:
        tmp.rename(root)  # the cache entry appears whole or not at all
    except OSError:  # another process finished first: use its entry, so every rank sees the same data
        shutil.rmtree(tmp, ignore_errors=True)
    return stats


def _save_splits(
    encoded: Callable[[], Iterator[dict]], tmp: Path, key: str, domain_name: str
) -> dict[str, Dataset]:
    """Run the generator, save its train and val documents under tmp, and reopen them from there."""
    build = str(tmp / "build")
    full = Dataset.from_generator(encoded, features=SPLIT_FEATURES, cache_dir=build, fingerprint=key)
    split_sets = {}
    for split, is_val in (("train", False), ("val", True)):
        ds = full.filter(
            lambda v, want=is_val: v == want,
            input_columns="val",
            cache_file_name=f"{build}/{split}.arrow",
        )
        ds = ds.remove_columns("val")
        if len(ds) == 0:
            raise ValueError(f"{domain_name}: the {split} split is empty after skipping unencodable records")
        ds.save_to_disk(str(tmp / split))
        split_sets[split] = load_from_disk(str(tmp / split))
    # the build folder is scratch: the saved splits no longer read from it
    del full
    shutil.rmtree(tmp / "build", ignore_errors=True)
    return split_sets


def _corpus_stats(
    domain: Domain,
    source: Source,
    docs: _Documents,
    split_sets: dict[str, Dataset],
    counts: _EncodeCounts,
    augment: dict[str, Any] | None,
) -> dict[str, Any]:
    """The cache entry's complete.json: what was read, skipped and kept, in a fixed key order."""
    return {
        "files": len(source.files) if source.dataset is None else 0,
        **({"rows": len(source.dataset)} if source.dataset is not None else {}),
        "files_skipped": docs.skips.count,
        "duplicates_removed": docs.duplicates,
        "documents_train": len(split_sets["train"]),
        "documents_val": len(split_sets["val"]),
        "records_skipped": docs.unusable.count + counts.bad_records.count,
        **({"augmented_copies": counts.augmented} if augment else {}),
        "tokens_train": sum(len(x) for x in split_sets["train"]["ids"]),
        "tokens_val": sum(len(x) for x in split_sets["val"]["ids"]),
        "root": source.root,
        # a corpus gathered from installed packages records each one's licence (code site-packages)
        **({"licenses": dict(domain.licenses)} if domain.licenses else {}),
    }


def _load_cached(domain: Domain | None, domain_class: type, root: Path, base: Domain | None = None) -> Corpus:
    """The corpus stored in a complete cache entry, with the domain state that encoded it (or the
    given domain, whose state is part of the entry's key)."""
    if domain is None and issubclass(domain_class, Tagged):  # the entry's tags over its base domain
        domain = Tagged.load(type(base).load(root / "domain"), root / "domain")
    return Corpus(
        domain if domain is not None else domain_class.load(root / "domain"),
        load_from_disk(root / "train"),
        load_from_disk(root / "val"),
        root,
        json.loads((root / "complete.json").read_text()),
    )
