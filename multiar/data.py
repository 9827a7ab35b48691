"""Files -> records -> token ids (HF datasets, cached on disk) -> packed blocks -> a LightningDataModule.

The split is by document (a file, or a record within a file), decided by a hash of the document's
key, so it is deterministic and never cuts a validation block out of a training document.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from datasets import Dataset, Features, Sequence, Value, concatenate_datasets, load_from_disk
from torch.utils.data import DataLoader

from multiar import fim as fim_module
from multiar.domain import Domain, Skips, domain_state_digest
from multiar.fim import transform_documents
from multiar.source import Source
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
        return _load_cached(domain if not fit else None, type(domain), root, getattr(domain, "base", None))

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
        if hasattr(domain, "fit_documents"):  # control tags: fitted from the documents' keys too
            domain.fit_documents(training)
        else:
            domain.fit(r for _, r in training)
    encode = getattr(domain, "encode_document", None) or (lambda _key, record: domain.encode(record))

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
            **({"licenses": domain.licenses} if getattr(domain, "licenses", None) else {}),
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
    return _load_cached(domain if not fit else None, type(domain), root, getattr(domain, "base", None))


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


def drops_tags(key: str, tag_dropout: float, seed: int) -> bool:
    """Whether a document's control tags are left out (deterministic per document and seed)."""
    return tag_dropout > 0 and is_validation(f"{seed}:tags:{key}", tag_dropout)


def pack(
    batch: dict[str, list],
    block_size: int,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    tag_ids: tuple[int, int] = (0, 0),
    tag_dropout: float = 0.0,
    seed: int = 0,
    fim: tuple[tuple[int, int, int], float, float] | None = None,
    window_starts: list[int] | None = None,
) -> dict[str, list]:
    """Concatenate BOS doc EOS BOS doc EOS ... and cut windows of block_size + 1 tokens, stride block_size.

    Consecutive windows overlap by one token so every token is a target exactly once. The last window
    of a batch is padded with pad_id, which the loss ignores. BOS and EOS mark a document's real ends:
    a document longer than a block spans several windows, and only the first holds its BOS (and its
    control tags, ids in [tag_ids[0], tag_ids[1]) right after BOS), only the last its EOS. With
    tag_dropout, that share of documents is packed without its tags. fim: (its three ids, rate, SPM
    rate) rearranges that share of documents for fill-in-the-middle (multiar/fim.py). window_starts:
    ids a window may start at (music: a bar's first token); each window then starts at the latest such
    id (or BOS) inside the window before, so a window never begins inside a note (only where one bar
    is longer than a block does it fall back to the plain stride); the overlap is trained twice.
    """
    stream: list[int] = []
    keys = batch.get("key") or [""] * len(batch["ids"])
    docs = batch["ids"]
    if tag_ids[1] > tag_ids[0] and tag_dropout > 0:
        docs = [
            [i for i in ids if not tag_ids[0] <= i < tag_ids[1]]
            if drops_tags(key, tag_dropout, seed)
            else ids
            for key, ids in zip(keys, docs, strict=True)
        ]
    if fim is not None:
        docs = transform_documents(
            keys, docs, *fim, seed=seed, keep_front=range(*tag_ids), max_len=block_size - 1
        )
    for ids in docs:
        stream += [bos_id, *ids, eos_id]
    blocks = []
    starts = set(window_starts or ()) | {bos_id}
    start = 0
    while True:
        window = stream[start : start + block_size + 1]
        blocks.append(window + [pad_id] * (block_size + 1 - len(window)))
        end = start + block_size
        if end >= len(stream) - 1:
            break
        aligned = next((j for j in range(end, start, -1) if stream[j] in starts), None)
        if not window_starts or aligned is None:
            start = end
            continue
        first = aligned  # a bar that opens a document: start at its BOS (and tags), as sampling does
        while first - 1 > start and tag_ids[0] <= stream[first - 1] < tag_ids[1]:
            first -= 1
        start = first - 1 if first - 1 > start and stream[first - 1] == bos_id else aligned
    return {"block": blocks}


def packing_fingerprint(ds: Dataset, kwargs: dict) -> str:
    """The cache key of a packed dataset: its input, the arguments, and the source of the code that
    packs. datasets' own fingerprint of a function did not change when the code it calls changed, so
    blocks packed by an older transform were reused (seen with fill-in-the-middle)."""
    code = "".join(inspect.getsource(f) for f in (pack, drops_tags, is_validation)) + inspect.getsource(
        fim_module
    )
    blob = json.dumps([ds._fingerprint, kwargs, code], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def pack_dataset(
    ds: Dataset, block_size: int, domain: Domain, tag_dropout: float = 0.0, seed: int = 0, train: bool = False
) -> Dataset:
    """A dataset of packed blocks (block_size + 1 int32 ids each), torch-formatted. train: the data-time
    transforms apply (tag dropout, fill-in-the-middle where the domain enables it)."""
    first = getattr(domain, "first_tag_id", domain.vocab_size)
    rate = getattr(domain, "fim_rate", 0.0) if train else 0.0
    fim = (domain.fim_ids, rate, domain.fim_spm_rate) if rate > 0 else None
    flags = getattr(domain, "window_starts", None) if train else None  # validation: every token once
    window_starts = [i for i, ok in enumerate(flags) if ok] if flags is not None else None
    kwargs = {
        "block_size": block_size,
        "bos_id": domain.bos_id,
        "eos_id": domain.eos_id,
        "pad_id": domain.pad_id,
        "tag_ids": (first, domain.vocab_size),
        "tag_dropout": tag_dropout if train else 0.0,
        "seed": seed,
        "fim": fim,
        "window_starts": window_starts,
    }
    packed = ds.map(
        pack,
        batched=True,
        batch_size=1000,
        remove_columns=ds.column_names,
        fn_kwargs=kwargs,
        features=Features({"block": Sequence(Value("int32"), length=block_size + 1)}),
        desc="packing",
        new_fingerprint=packing_fingerprint(ds, kwargs),
    )
    return packed.with_format("torch")


def stack_blocks(rows: list[dict]) -> torch.Tensor:
    """Collate rows of packed blocks into one (B, block_size + 1) long tensor."""
    return torch.stack([r["block"] for r in rows]).long()


class BlockDataModule(L.LightningDataModule):
    """Train/validation loaders over packed blocks of a prepared corpus."""

    def __init__(
        self,
        corpus: Corpus,
        block_size: int,
        batch_size: int,
        num_workers: int = 0,
        seed: int = 0,
        tag_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.corpus = corpus
        self.block_size = block_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.tag_dropout = tag_dropout
        self.train_blocks: Dataset | None = None
        self.val_blocks: Dataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_blocks is None:
            self.train_blocks = pack_dataset(
                self.corpus.train,
                self.block_size,
                self.corpus.domain,
                self.tag_dropout,
                self.seed,
                train=True,
            )  # validation: every document as it is, tags kept, no fill-in-the-middle
            self.val_blocks = pack_dataset(self.corpus.val, self.block_size, self.corpus.domain)

    def _loader(self, ds: Dataset, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        sampler = None
        if not shuffle and torch.distributed.is_available() and torch.distributed.is_initialized():
            # validation under DDP: each block on exactly one rank. Lightning's default sampler pads
            # the last rank with repeated blocks, which would count them twice in the token-weighted mean
            from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

            world = torch.distributed.get_world_size()
            if len(ds) < world:  # a rank without a block would skip the validation loop the others
                # reduce in (Lightning drops an empty loader): a block of pads scores 0 tokens
                pad = [[self.corpus.domain.pad_id] * (self.block_size + 1)] * (world - len(ds))
                padding = Dataset.from_dict({"block": pad}, features=ds.features)
                ds = concatenate_datasets([ds.with_format(None), padding]).with_format("torch")
            sampler = UnrepeatedDistributedSampler(ds, shuffle=False)
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            shuffle=shuffle if sampler is None else False,
            sampler=sampler,
            generator=generator,
            num_workers=self.num_workers,
            collate_fn=stack_blocks,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_blocks, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_blocks, shuffle=False)
