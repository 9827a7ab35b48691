"""The Domain protocol every data type implements, and the few helpers all domains share.

A domain turns files into token ids and ids back into files; everything generic (packing, training,
sampling, checkpoints) lives once in `multiar/`. Helpers here: walking input paths, skipping and
counting bad input, and writing outputs atomically without clobbering.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from multiar.generate import LogitsProcessor

log = logging.getLogger("multiar")

Record = Any  # what a domain reads: a symusic Score, a Bio SeqRecord, a source string
Artifact = Any  # what a domain decodes to and writes


@runtime_checkable
class Domain(Protocol):
    name: ClassVar[str]  # one string: registry key, conf/domain/<name>.yaml, metric prefix, output folder
    suffixes: ClassVar[tuple[str, ...]]  # file endings it reads, lower case
    unit: ClassVar[str]  # the domain's natural unit for bits/perplexity: byte, residue, note
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def default_paths(self, corpus: str | None = None) -> list[Path]:
        """The bundled data used when the user gives no data.paths: corpus names one (data.corpus;
        None is the default one); ValueError naming the known ones for another name."""

    def read(self, path: Path) -> Iterator[Record]:
        """Records in one file; raises ValueError or OSError with a clear reason on a bad file, and
        nothing else: library errors (zlib, MIDI parsers) are turned into ValueError."""

    def from_value(self, value: Any, key: str) -> Record:
        """A record from one value of an HF dataset column (text, a sequence, MIDI bytes or a path);
        ValueError when the value is no record of this domain."""

    def content(self, record: Record) -> bytes:
        """The document's content as bytes: two records with equal content are duplicates, dropped before
        the split. Raises ValueError for a record that is no usable document (empty, letters outside
        the alphabet): it is skipped and counted before the split, so it cannot empty a split."""

    def units(self, record: Record) -> int:
        """How many natural units (see `unit`) the record holds: eval reports bits per unit with it."""

    def fit(self, records: Iterable[Record]) -> None:
        """Learn tokenizer state from training records (no-op for fixed vocabularies)."""

    def encode(self, record: Record) -> list[int]:
        """Token ids of one record, without BOS/EOS; raises ValueError on a record it cannot encode."""

    def prompt_ids(self, prompt: str | None) -> list[int]:
        """BOS followed by the encoded prompt (a file path or a literal, per domain)."""

    def decode(self, ids: list[int]) -> tuple[Artifact, int]:
        """Artifact from model output, and how many tokens were dropped or repaired; never raises."""

    def write(
        self,
        artifacts: Sequence[Artifact],
        out_dir: Path,
        provenance: dict,
        overwrite: bool = False,
        start: int = 0,
    ) -> list[Path]:
        """Write artifacts as samples start, start+1, ... under out_dir; refuses to replace existing files
        unless overwrite. With start > 0 a domain that keeps one file for all samples extends the one
        this run wrote for samples 0..start-1 (so finished samples are on disk as they come)."""

    def metrics(self, artifacts: Sequence[Artifact]) -> dict[str, float]:
        """Domain metrics, each key prefixed with '<name>/'."""

    def constraint(self) -> LogitsProcessor | None:
        """A grammar mask for sampling, or None."""

    def save(self, directory: Path) -> None:
        """Write the tokenizer state so that load() rebuilds an identical domain."""

    # Optional, where a domain has them (looked up with hasattr):
    #   fields(record) -> dict[str, str]          header fields: the source of data.tags=header:FIELD
    #   one_token_per_unit: bool                  lengths/positions in units are token counts (min_len,
    #                                             max_len, template/fixed)
    #   assess(artifacts, details, settings)      per-sample columns into details (novelty, filters:
    #       -> dict[str, float]                   `passes`), and their summary metrics
    #   report(artifacts, details, out_dir, overwrite, provenance) -> list[Path]
    #                                             files about the whole set (CSV, plots); a domain with
    #                                             it also takes write(..., details=) per sample
    #   window_starts: list[bool]                 per id: a training window or a cut prompt may start
    #                                             there (music: a bar's first token)
    #   check_augment(spec), augment(record, spec) -> [(suffix, record)]
    #                                             data.augment: shifted copies of training records
    #   token_errors(ids) -> int                  errors by the tokenizer's own count (generate reports
    #                                             <name>/token_error_rate over the sampled tokens)
    #   prompt_ids(prompt, bars=N)                prompt_bars: only the prompt's first N bars
    #   render(path, out, soundfont, overwrite)   render=wav: audio beside a written file
    #   prompt_meta(prompt, bars=None) -> Any     what a sample keeps from its prompt beyond the tokens
    #                                             (music: tempos, time signatures the tokens lack)
    #   with_prompt_meta(artifact, meta, whole)   applies it to one sample (no state on the domain)
    #   filter_keys: tuple[str, ...]              the filters.* keys assess reads (checked before sampling)


def domain_state_digest(domain: Domain, only: Sequence[str] = ()) -> str:
    """A hash of the domain's saved state: two domains with the same digest encode alike. only: hash just
    these files of it (the tokenizer's, leaving out training statistics), where the domain saves any."""
    with tempfile.TemporaryDirectory() as tmp:
        domain.save(Path(tmp) / "domain")
        files = sorted(f for f in (Path(tmp) / "domain").rglob("*") if f.is_file())
        chosen = [f for f in files if f.name in only]
        h = hashlib.sha256()
        for f in chosen or files:
            h.update(f.relative_to(tmp).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def find_files(
    paths: Iterable[str | Path], suffixes: Sequence[str], skip_dirs: Iterable[str] = ()
) -> list[Path]:
    """Files under paths (files or folders, recursive) whose names end in one of suffixes, sorted.
    Inside a given folder, files under a folder named in skip_dirs (.git, .venv, ...) are left out,
    with one line saying how many; a file given by name is always kept."""
    found: list[Path] = []
    skip_dirs = set(skip_dirs)
    for p in map(Path, paths):
        p = p.expanduser()
        if p.is_dir():
            matching = [f for f in p.rglob("*") if f.is_file() and f.name.lower().endswith(tuple(suffixes))]
            kept = sorted(f for f in matching if not skip_dirs & set(f.relative_to(p).parts[:-1]))
            if len(kept) < len(matching):
                log.info(
                    "%s: left out %d file(s) under %s folders",
                    p,
                    len(matching) - len(kept),
                    "/".join(sorted(skip_dirs)),
                )
            found += kept
        elif p.is_file():
            found.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return found


@dataclass
class Skips:
    """Counts bad input that was skipped, with a one-line warning each, so one bad file is never fatal."""

    seen: int = 0
    reasons: list[str] = field(default_factory=list)
    places: set[str] = field(default_factory=set)

    def skip(self, where: str | Path, problem: str, quiet: bool = False) -> None:
        """Count one skipped item; quiet: no line now (records, summed per file by by_file())."""
        lines = str(problem).strip().splitlines() or ["unknown problem"]
        message = f"{where}: skipped: {lines[0]}"  # one line, even for libraries' multi-line errors
        self.reasons.append(message)
        self.places.add(str(where))
        if not quiet:
            log.warning(message)

    def by_file(self) -> list[str]:
        """One line per file for skipped records (keys 'file#index'): how many, and why, by reason."""
        groups: dict[str, Counter] = {}
        for message in self.reasons:
            where, _, reason = message.partition(": skipped: ")
            groups.setdefault(where.rsplit("#", 1)[0], Counter())[reason] += 1
        return [
            f"{where}: skipped {sum(c.values())} record(s): "
            + "; ".join(f"{reason} ({n})" for reason, n in c.most_common())
            for where, c in groups.items()
        ]

    @property
    def count(self) -> int:
        return len(self.reasons)

    def summary(self, what: str) -> str:
        return f"{self.seen - self.count} of {self.seen} {what} used, {self.count} skipped"


def _umask() -> int:
    """The process umask, read without changing it where the OS allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # the portable way sets it; put it straight back
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The permission bits a new file gets under the process umask (0644 under the usual 022)."""
    return 0o666 & ~_umask()


def write_new_file(path: Path, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Call write(tmp) on a temporary file beside path, then move it into place atomically.

    Refuses to replace an existing file unless overwrite is set, so a second run never silently
    clobbers the first one's outputs. The file gets the permissions the umask gives (0644 under the
    usual 022), not mkstemp's private 0600, so a shared run folder stays readable. Any OSError
    (disk full, no permission) leaves no file under the real name and is re-raised naming it.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists (pass overwrite=true to replace it)")
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(Path(tmp))
        os.chmod(tmp, file_mode())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    except OSError as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise OSError(err.errno, f"cannot write: {err.strerror or err}", str(path)) from err
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_new_text(path: Path, text: str, overwrite: bool = False) -> Path:
    """write_new_file for text, UTF-8."""
    return write_new_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite)


def safe_name(text: str, max_length: int = 80) -> str:
    """A file name built from user input (a tag, a prompt, a record id) that stays one plain name.

    Anything but letters, digits, '.', '_' and '-' becomes '_'; leading dots are dropped, so the
    result can never be '..', an absolute path, a hidden file or hold a separator or NUL.
    """
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", text)[:max_length].lstrip(".")
    return cleaned or "_"


def safe_child(folder: Path, name: str) -> Path:
    """folder / name, refusing any name that would land outside folder."""
    if not name or name in (".", "..") or "\x00" in name or "/" in name or "\\" in name:
        raise ValueError(f"{name!r}: not a plain file name (it would leave {folder})")
    return Path(folder) / name
