"""Files in and out, the one way: walking input paths, skipping and counting bad input (`Skips`), writing
outputs atomically without clobbering (`write_new_file`), and file names built from user input."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("multiar")


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


# write_new_file's temporary names: "." + the file's name + "." + mkstemp's 8 random characters + ".tmp"
PARTIAL_WRITE = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def remove_partial_writes(folder: Path) -> int:
    """Delete the temporaries write_new_file leaves in folder (not below it) when its process is killed
    mid-write (SIGKILL runs no cleanup); how many. A resumed run calls it on its own output folder, where
    a kill can cut the journal's or a sample file's write, so the folder ends as an uninterrupted run's."""
    stale = [p for p in Path(folder).glob(".*.tmp") if p.is_file() and PARTIAL_WRITE.match(p.name)]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


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


class Appender:
    """An output file that grows by appending, for outputs too large to rewrite (generate's
    samples.fasta): each `write` is one write call (whole records stay whole when the process is
    killed), `sync` puts the bytes on disk and returns the file's size, `resume` cuts the file back to
    such a size and appends after it. Like write_new_file it refuses to replace an existing file
    unless overwrite, and the file gets the permissions the umask gives."""

    def __init__(self, path: Path, overwrite: bool = False) -> None:
        self.path, self.overwrite = Path(path), overwrite
        self.fd: int | None = None

    def _open(self, size: int | None = None) -> int:
        if self.fd is None:
            if size is None and self.path.exists() and not self.overwrite:
                raise FileExistsError(f"{self.path}: already exists (pass overwrite=true to replace it)")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | (os.O_TRUNC if size is None else 0)
            try:
                self.fd = os.open(self.path, flags, 0o666)  # the umask decides, as for write_new_file
                if size is not None:
                    os.truncate(self.path, size)
            except OSError as err:
                raise OSError(err.errno, f"cannot write: {err.strerror or err}", str(self.path)) from err
        return self.fd

    def write(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def write_bytes(self, data: bytes) -> None:
        """Append data in one call (a short write goes on where it stopped). A failed write (a full
        disk) cuts the file back to where it was, so no half record stays, and names the file."""
        fd = self._open()
        before = os.fstat(fd).st_size
        try:
            while data:
                data = data[os.write(fd, data) :]
        except OSError as err:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, before)
            raise OSError(err.errno, f"cannot write: {err.strerror or err}", str(self.path)) from err

    def sync(self) -> int:
        fd = self._open()
        try:
            os.fsync(fd)
        except OSError as err:
            raise OSError(err.errno, f"cannot write: {err.strerror or err}", str(self.path)) from err
        return os.fstat(fd).st_size

    def resume(self, size: int) -> None:
        """Append after the first size bytes of the existing file (a killed run's tail is cut)."""
        self.close()
        self._open(size)

    def close(self) -> None:
        if self.fd is not None:
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = None
