"""What the code domain measures and cuts in generated source: syntax and compile validity, lines copied
verbatim from the training files, and the end of the first top-level block (`stop_at=block`)."""

from __future__ import annotations

import ast
import hashlib
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

# a top-level line that continues the block before it rather than starting a new one
CONTINUES = ("else", "elif", "except", "finally", "case", ")", "]", "}")
COPIED_LINES = 4  # consecutive non-blank lines verbatim from one training file: a copy
FILE_BREAK = np.uint64(0)  # between files in the line index: no copied run crosses it


def parses(source: str) -> bool:
    """Whether source is syntactically valid Python."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SyntaxWarning)  # e.g. invalid escapes in sampled code
            ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # ValueError: null bytes
        return False
    return True


def compiles(source: str) -> bool:
    """Whether source compiles to bytecode (stricter than parsing: e.g. 'return' outside a function,
    'break' outside a loop, duplicate argument names)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SyntaxWarning)
            compile(source, "<sample>", "exec", dont_inherit=True)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return True


def line_hash(line: str) -> np.uint64:
    """A line's content without surrounding whitespace, as a 64-bit hash (never FILE_BREAK)."""
    digest = int.from_bytes(hashlib.blake2b(line.strip().encode(), digest_size=8).digest(), "little")
    return np.uint64(digest or 1)


def content_lines(text: str) -> list[str]:
    """The lines that carry code: blank lines are left out (they would join unrelated runs)."""
    return [line for line in text.splitlines() if line.strip()]


class LineIndex:
    """The training files' non-blank lines as hashes, in file order: finds the longest run of a sample's
    consecutive lines that stands verbatim, in the same order, in one training file."""

    def __init__(self, hashes: np.ndarray) -> None:
        self.hashes = hashes  # (n,) uint64, FILE_BREAK between files
        self.order = np.argsort(hashes, kind="stable")
        self.sorted = hashes[self.order]

    @classmethod
    def build(cls, texts: Iterable[str]) -> LineIndex:
        parts: list[np.uint64] = []
        for text in texts:
            parts += [line_hash(line) for line in content_lines(text)] + [FILE_BREAK]
        return cls(np.asarray(parts, dtype=np.uint64))

    def save(self, path: Path) -> None:
        with open(path, "wb") as f:
            np.save(f, self.hashes, allow_pickle=False)

    @classmethod
    def load(cls, path: Path) -> LineIndex:
        return cls(np.load(path, allow_pickle=False))

    def positions(self, h: np.uint64) -> np.ndarray:
        lo, hi = np.searchsorted(self.sorted, h, "left"), np.searchsorted(self.sorted, h, "right")
        return self.order[lo:hi]

    def longest_run(self, text: str) -> int:
        """The most consecutive non-blank lines of text found consecutively in one training file."""
        best, run = 0, {}  # run: training position -> length of the match ending there
        for line in content_lines(text):
            here = self.positions(line_hash(line))
            run = {int(p): run.get(int(p) - 1, 0) + 1 for p in here}
            best = max([best, *run.values()])
        return best


def block_end(text: str, start: int = 0, final: bool = False) -> int | None:
    """Where the top-level block that is open at offset `start` (the end of the prompt) ends: the start
    of the first complete non-blank line at column 0 after an indented line of that block, unless it
    continues the block (else, except, a closing bracket, ...). A line counts once its newline is
    there (or `final`: the text is all there is). None while the block is still open."""
    seen_header = seen_body = False
    offset = 0
    for line in text.splitlines(keepends=True):
        begin, offset = offset, offset + len(line)
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        top = not line[0].isspace()
        if top and seen_body and not stripped.startswith(CONTINUES):
            if begin >= start and (final or line.endswith(("\n", "\r"))):
                return begin
            if begin < start:  # the prompt holds whole blocks before the open one: a new block starts
                seen_header, seen_body = True, False
                continue
        seen_header |= top
        seen_body |= seen_header and not top
    return None


def mean_lines(samples: Sequence[str]) -> float:
    return sum(s.count("\n") + 1 for s in samples) / max(len(samples), 1)
