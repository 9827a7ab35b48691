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
from collections.abc import Iterator
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
    state = None if fit else domain_state_digest(domain)
    blob = json.dumps(
        [
            CACHE_FORMAT,
            domain_name,
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
    key = hashlib.sha256(blob.encode()).hexdigest()[:20]
    root = Path(cache_dir).expanduser() / domain_name / key
    if (root / "complete.json").exists():
        log.info("%s: reusing tokenized data from %s", domain_name, root)
        return _load_cached(
            domain if not fit else None,
            type(domain),
            root,
            domain.base if isinstance(domain, Tagged) else None,
        )

    # pass 1: which documents exist (bad files are skipped and counted here, once); exact duplicates
    # are dropped before the split, so one text can never sit on both sides of it
    skips = Skips()
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
            unusable.skip(k, str(err), quiet=True)  # one line per file and reason, below
            continue
        if digest in seen:
            duplicates += 1
            continue
        seen.add(digest)
        keys.append(k)
    if skips.count and skips.count == skips.seen:
        raise ValueError(
            f"{domain_name}: every one of the {skips.seen} input {source.unit} is unreadable; first: {skips.reasons[0]}"
        )
    keys = keys[:max_documents]
    if len(keys) < 2:
        raise ValueError(
            f"{domain_name}: need at least 2 documents to split train/validation, found {len(keys)}"
        )
    val_keys = {k for k in keys if is_validation(k, val_fraction)}
    if not val_keys:  # tiny corpora: still validate on one document, chosen by the same hash order
        val_keys = {min(keys, key=lambda k: hashlib.sha256(k.encode()).digest())}
    if len(val_keys) == len(keys):
        val_keys.discard(keys[0])
    wanted = set(keys)
    if unusable.count:
        for line in unusable.by_file():
            log.warning(line)
        log.info("%s: %s", domain_name, unusable.summary("records"))

    # pass 2: fit tokenizer state on training documents only, so validation stays unseen
    if fit:
        training = ((k, r) for k, r in source.records() if k in wanted and k not in val_keys)
        domain.fit_documents(training)  # control tags: fitted from the documents' keys too
    encode = domain.encode_document

    # pass 3: encode, one read of the input for both splits; a record the domain cannot encode is
    # skipped and counted
    bad_records = Skips()
    augmented = [0]  # copies added by augmentation

    def encoded() -> Iterator[dict]:
        for k, record in source.records():
            if k not in wanted:
                continue
            bad_records.seen += 1
            try:
                ids = encode(k, record)
            except Exception as err:  # a tokenizer library's failure on one record is that record's
                if strict:
                    raise ValueError(f"{k}: cannot encode: {err} (data.strict=true)") from err
                bad_records.skip(k, f"{type(err).__name__}: {err}")
                continue
            yield {"key": k, "ids": ids, "val": k in val_keys}
            if augment and k not in val_keys:
                copies = 0
                for suffix, copy in domain.augment(record, augment):
                    try:
                        yield {"key": f"{k}@{suffix}", "ids": encode(k, copy), "val": False}
                        copies += 1
                    except Exception as err:  # a shift out of the tokenizer's range: that copy only
                        bad_records.skip(f"{k}@{suffix}", f"{type(err).__name__}: {err}", quiet=True)
                augmented[0] += copies

    # a private partial folder per process: DDP ranks may prepare the same corpus at the same time
    tmp = root.with_name(f"{root.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        domain.save(tmp / "domain")
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
                raise ValueError(
                    f"{domain_name}: the {split} split is empty after skipping unencodable records"
                )
            ds.save_to_disk(str(tmp / split))
            split_sets[split] = load_from_disk(str(tmp / split))
        del full
        shutil.rmtree(tmp / "build", ignore_errors=True)
        stats = {
            "files": len(source.files) if source.dataset is None else 0,
            **({"rows": len(source.dataset)} if source.dataset is not None else {}),
            "files_skipped": skips.count,
            "duplicates_removed": duplicates,
            "documents_train": len(split_sets["train"]),
            "documents_val": len(split_sets["val"]),
            "records_skipped": unusable.count + bad_records.count,
            **({"augmented_copies": augmented[0]} if augment else {}),
            "tokens_train": sum(len(x) for x in split_sets["train"]["ids"]),
            "tokens_val": sum(len(x) for x in split_sets["val"]["ids"]),
            "root": source.root,
            # a corpus gathered from installed packages records each one's licence (code site-packages)
            **({"licenses": dict(domain.licenses)} if domain.licenses else {}),
        }
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
    log.info("%s: %s; %s", domain_name, skips.summary(source.unit), json.dumps(stats))
    return _load_cached(
        domain if not fit else None, type(domain), root, domain.base if isinstance(domain, Tagged) else None
    )


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
