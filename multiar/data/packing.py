"""Tokenized documents -> packed training blocks (BOS doc EOS ..., windows of block_size + 1) -> a
LightningDataModule; the data-time transforms (tag dropout, fill-in-the-middle, bar-aligned windows)."""

from __future__ import annotations

import hashlib
import inspect
import json

import lightning as L
import torch
from datasets import Dataset, Features, Sequence, Value, concatenate_datasets
from torch.utils.data import DataLoader

from multiar.data import fim as fim_module
from multiar.data.corpus import Corpus, is_validation
from multiar.data.fim import transform_documents
from multiar.domain import Domain, WindowStarts
from multiar.tags import Tagged


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
    first = domain.first_tag_id if isinstance(domain, Tagged) else domain.vocab_size
    rate = domain.fim_rate if train else 0.0
    fim = (domain.fim_ids, rate, domain.fim_spm_rate) if rate > 0 else None
    # validation: every token once
    flags = domain.window_starts if train and isinstance(domain, WindowStarts) else None
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
