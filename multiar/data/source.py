"""Where a corpus's documents come from: files and folders read by the domain, or one column of an HF
dataset. Bad input is skipped and counted here, once, so one bad file or row is never fatal."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from datasets import Dataset, load_from_disk

from multiar.domain import Domain
from multiar.errors import ConfigError
from multiar.files import Skips, find_files


def document_root(files: list[Path]) -> Path:
    """The folder that document keys are relative to: unique keys, the same on every machine."""
    return Path(os.path.commonpath([f.resolve().parent for f in files]))


def iter_records(
    domain: Domain,
    files: list[Path],
    skips: Skips | None = None,
    root: Path | None = None,
    strict: bool = False,
) -> Iterator[tuple[str, Any]]:
    """(key, record) for every readable record; a bad file is skipped and counted in skips, not fatal.

    A file's records are read whole before any is yielded, so a file that fails half-way gives no
    document at all rather than some. A key is the file's path relative to the files' common folder,
    '#', and the record's index in it. strict: the first bad file raises ValueError instead.
    """
    root = root or (document_root(files) if files else Path())
    for path in files:
        if skips is not None:
            skips.seen += 1
        try:
            records = list(domain.read(path))
        except Exception as err:  # any library's failure on one file (zlib, MIDI parser, ...) is that file's
            reason = f"{type(err).__name__}: {str(err).strip() or 'unreadable'}".splitlines()[0]
            if strict:
                raise ValueError(f"{path}: {reason} (data.strict=true)") from err
            if skips is not None:
                skips.skip(path, reason)
            continue
        key = path.resolve().relative_to(root).as_posix()
        for i, record in enumerate(records):
            yield f"{key}#{i}", record


class Source:
    """Where a corpus's documents come from: files and folders, or one column of an HF dataset.

    records() yields (key, record) for every readable document; a file or row that failed once is
    counted in the given Skips and not read again by later passes. Keys are unique and stable:
    a file's path relative to `root`, '#', the record's index; or the dataset's name, '#', the row.
    """

    def __init__(
        self,
        domain: Domain,
        paths: list[str] | None = None,
        hf_dataset: str | None = None,
        hf_column: str | None = None,
        hf_split: str = "train",
        corpus: str | None = None,
    ) -> None:
        self.domain, self.bad = domain, set()
        self.dataset = None
        if hf_dataset is not None:
            self.dataset, self.column = load_hf_dataset(hf_dataset, hf_column, hf_split), hf_column
            self.split = hf_split
            self.label = Path(hf_dataset).name or hf_dataset
            self.root, self.files = hf_dataset, []
            self.unit = "rows"
            self.fingerprint = [hf_dataset, hf_column, hf_split, self.dataset._fingerprint]
            return
        if not paths:
            try:
                paths = domain.default_paths(corpus)
            except ValueError as err:
                raise ConfigError(f"data.corpus: {err}") from None
        self.files = find_files(paths, domain.suffixes, domain.skip_dirs)
        if not self.files:
            raise FileNotFoundError(
                f"no {'/'.join(domain.suffixes)} files under {', '.join(map(str, paths))}"
            )
        self.root, self.unit = str(document_root(self.files)), "files"
        self.fingerprint = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in self.files]

    def records(
        self, skips: Skips | None = None, strict: bool = False, shard: list | None = None
    ) -> Iterator[tuple[str, Any]]:
        """(key, record) of every readable document (of `shard`: some files or row indices, when given)."""
        skips = skips if skips is not None else Skips()
        if self.dataset is None:
            files = [f for f in (shard if shard is not None else self.files) if str(f) not in self.bad]
            yield from iter_records(self.domain, files, skips, Path(self.root), strict)
        else:
            column = self.dataset.select_columns([self.column])
            # the whole column: iterated in Arrow batches; a shard: its rows by index
            rows = enumerate(column) if shard is None else ((int(i), column[int(i)]) for i in shard)
            for i, row in rows:
                key = f"{self.label}#{i}"
                if key in self.bad:
                    continue
                skips.seen += 1
                try:
                    record = self.domain.from_value(row[self.column], key)
                except Exception as err:  # one row's bad value is that row's
                    reason = f"{type(err).__name__}: {str(err).strip() or 'unusable'}".splitlines()[0]
                    if strict:
                        raise ValueError(f"{key}: {reason} (data.strict=true)") from err
                    skips.skip(key, reason)
                    continue
                yield key, record
        self.bad |= skips.places

    def shards(self) -> list:
        """Units of work for streaming: files, or row indices."""
        return list(self.files) if self.dataset is None else list(range(len(self.dataset)))


def load_hf_dataset(name: str, column: str | None, split: str = "train") -> Dataset:
    """A `save_to_disk` folder (offline), or a hub dataset name (needs network; HF_DATASETS_OFFLINE=0)."""
    from datasets import DatasetDict, load_dataset

    if not column:
        raise ConfigError("data.hf_column: name the column that holds the documents")
    local = Path(name).expanduser()
    if local.exists():
        try:
            ds = load_from_disk(str(local))
        except Exception as err:
            raise ValueError(
                f"{local}: not a datasets save_to_disk folder ({type(err).__name__}: {err})"
            ) from None
        if isinstance(ds, DatasetDict):
            if split not in ds:
                raise ConfigError(f"data.hf_split: {local} has splits {', '.join(ds)}, not {split!r}")
            ds = ds[split]
    else:
        try:
            ds = load_dataset(name, split=split)
        except Exception as err:
            raise ValueError(
                f"data.hf_dataset={name}: no such local folder, and the hub said: {str(err).splitlines()[0]}"
            ) from None
    if column not in ds.column_names:
        raise ConfigError(
            f"data.hf_column: {name} has no column {column!r}; its columns: {', '.join(ds.column_names)}"
        )
    return ds
