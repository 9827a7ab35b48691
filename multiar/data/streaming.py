"""data.streaming=true: documents read, tokenized and packed on the fly through an HF `datasets`
IterableDataset, for corpora larger than memory: no token cache on disk, and at most PACK_DOCUMENTS
documents held at once (plus a buffer of packed blocks for shuffling).

The split is the same hash of document keys as the cached path. Files (or dataset rows) are the shards:
DDP ranks get their own (`split_dataset_by_node`) and the shard order is shuffled with the seed. A
tokenizer that must be fitted (code's BPE) is fitted on the first `data.fit_documents` training
documents. Not done while streaming: removing exact duplicates (it needs every document's digest).
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import lightning as L
import torch
from datasets import Features, IterableDataset, Sequence, Value
from torch.utils.data import DataLoader

from multiar.data.corpus import is_validation
from multiar.data.packing import pack, stack_blocks
from multiar.data.source import Source
from multiar.domain import Domain
from multiar.files import Skips

log = logging.getLogger("multiar")

PACK_DOCUMENTS = 64  # documents packed together into blocks: the most held in memory at once
FEATURES = Features({"key": Value("string"), "ids": Sequence(Value("int32"))})


@dataclass
class StreamStats:
    """What a stream has done so far (in this process): for logs and for the bounded-memory test."""

    read: int = 0
    packed: int = 0
    most_held: int = 0  # documents read but not yet packed, at most, over the stream's life
    skipped: int = 0


def fit_on_first(
    domain: Domain, source: Source, val_fraction: float, n: int, fit: bool = True
) -> list[list[int]]:
    """Fit domain on the first n training documents (fit=False: keep its state, a resumed or fine-tuned
    run's tokenizer); their ids, the sample the run's unigram reference is counted on."""
    first = list(itertools.islice((r for k, r in source.records() if not is_validation(k, val_fraction)), n))
    if fit:
        domain.fit(first)
        log.info(
            "%s: tokenizer fitted on the first %d training documents (data.fit_documents)",
            domain.name,
            len(first),
        )
    ids = []
    for r in first:
        try:
            ids.append(domain.encode(r))
        except Exception:  # skipped and counted when streamed
            continue
    return ids


def stream_blocks(
    source: Source,
    domain: Domain,
    block_size: int,
    val_fraction: float,
    validation: bool,
    stats: StreamStats,
    shards: list | None = None,
) -> IterableDataset:
    """Packed blocks (block_size + 1 ids) of one split, produced on the fly, reading the source's shards
    (files, or rows) in the given order."""

    def documents(shards: list) -> Iterator[dict]:
        skips = Skips()
        for key, record in source.records(skips, shard=shards):
            if is_validation(key, val_fraction) != validation:
                continue
            try:
                ids = domain.encode(record)
            except Exception as err:  # a tokenizer library's failure on one record is that record's
                skips.skip(key, f"{type(err).__name__}: {err}")
                stats.skipped += 1
                continue
            stats.read += 1
            stats.most_held = max(stats.most_held, stats.read - stats.packed)
            yield {"key": key, "ids": ids}

    def pack_counted(batch: dict, **kw) -> dict:
        stats.packed += len(batch["ids"])
        return pack(batch, **kw)

    ds = IterableDataset.from_generator(
        documents, features=FEATURES, gen_kwargs={"shards": source.shards() if shards is None else shards}
    )
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        from datasets.distributed import split_dataset_by_node

        ds = split_dataset_by_node(ds, torch.distributed.get_rank(), torch.distributed.get_world_size())
    ds = ds.map(
        pack_counted,
        batched=True,
        batch_size=PACK_DOCUMENTS,
        remove_columns=["key", "ids"],
        fn_kwargs={
            "block_size": block_size,
            "bos_id": domain.bos_id,
            "eos_id": domain.eos_id,
            "pad_id": domain.pad_id,
        },
    )
    return ds.with_format("torch")


class ShuffledStream(torch.utils.data.IterableDataset):
    """The training stream, one epoch per pass: shards (files) in a new order each epoch, and packed
    blocks shuffled within a buffer. (HF's own shuffle of a stream read far ahead of the packing: the
    documents held grew with the corpus.) Lightning sets epochs on samplers only; a stream has none, so
    each pass counts its own.

    cycle=True (several ranks): the next pass starts as one ends, without end. Ranks read different files
    and so get different numbers of blocks; a rank whose epoch ended first would leave the others waiting
    in the gradient all-reduce. Training then ends at trainer.max_steps, the same step on every rank."""

    def __init__(
        self,
        make: Callable[[list], IterableDataset],
        shards: list,
        seed: int,
        buffer: int,
        cycle: bool = False,
    ) -> None:
        self.make, self.shards, self.seed, self.buffer, self.epoch = make, shards, seed, buffer, 0
        self.cycle = cycle

    def __iter__(self) -> Iterator:
        while True:
            yielded = yield from self._one_pass()
            if not self.cycle:
                return
            if not yielded:
                raise ValueError("data: this rank's share of the training stream holds no blocks")

    def _one_pass(self) -> Iterator:
        """One pass over the shards in this epoch's order; returns how many blocks it yielded."""
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        self.epoch += 1
        order = list(self.shards)
        rng.shuffle(order)
        held: list = []
        count = 0
        for block in self.make(order):
            if len(held) < self.buffer:
                held.append(block)
                continue
            i = rng.randrange(self.buffer)
            yield held[i]
            count += 1
            held[i] = block
        rng.shuffle(held)
        yield from held
        return count + len(held)


class StreamLoader(DataLoader):
    """A DataLoader over a ShuffledStream that starts each pass as the next epoch, also when worker
    processes iterate their own copies of the stream (their epoch counters never reach back here)."""

    def __iter__(self) -> Iterator:
        self.passes = getattr(self, "passes", -1) + 1
        self.dataset.epoch = self.passes  # copied into the workers as the iterator starts them
        return super().__iter__()


class StreamingDataModule(L.LightningDataModule):
    """Train/validation loaders that stream packed blocks; an epoch is one pass over the input."""

    def __init__(
        self,
        source: Source,
        domain: Domain,
        block_size: int,
        batch_size: int,
        val_fraction: float,
        num_workers: int = 0,
        seed: int = 0,
        shuffle_buffer: int = 1000,
    ) -> None:
        super().__init__()
        self.source, self.domain, self.block_size, self.batch_size = source, domain, block_size, batch_size
        self.val_fraction, self.num_workers, self.seed, self.shuffle_buffer = (
            val_fraction,
            num_workers,
            seed,
            shuffle_buffer,
        )
        self.stats = {"train": StreamStats(), "val": StreamStats()}

    def _stream(self, validation: bool, shards: list | None = None) -> IterableDataset:
        split = "val" if validation else "train"
        return stream_blocks(
            self.source,
            self.domain,
            self.block_size,
            self.val_fraction,
            validation,
            self.stats[split],
            shards,
        )

    def _loader(self, validation: bool) -> DataLoader:
        if validation:
            return DataLoader(
                self._stream(True),
                batch_size=self.batch_size,
                num_workers=self.num_workers,
                collate_fn=stack_blocks,
            )
        world = self.trainer.world_size if self.trainer is not None else 1
        if world > 1 and self.trainer.max_steps <= 0:
            raise ValueError(
                "data.streaming on several ranks: set trainer.max_steps (each rank's stream repeats, so that "
                "every rank takes the same number of steps)"
            )
        ds = ShuffledStream(
            lambda order: self._stream(False, order),
            self.source.shards(),
            self.seed,
            self.shuffle_buffer,
            cycle=world > 1,
        )
        return StreamLoader(
            ds, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=stack_blocks
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(validation=False)

    def val_dataloader(self) -> DataLoader:
        return self._loader(validation=True)
