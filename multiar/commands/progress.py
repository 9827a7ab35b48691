"""One progress line on stderr for long commands: samples done / total, tokens per second and the time
left; redrawn in place on a terminal, a plain line every `every` (share of the total) otherwise.
Nothing is shown for a run shorter than `after` seconds."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    def __init__(
        self,
        total: int,
        what: str = "samples",
        enabled: bool = True,
        done: int = 0,
        stream: TextIO | None = None,
        after: float = 3.0,
        every: float = 0.1,
    ) -> None:
        self.total, self.what, self.enabled, self.stream = total, what, enabled, stream or sys.stderr
        self.first = done  # a resumed run's rate counts what this process did
        self.started = time.perf_counter()
        self.after, self.every = after, every
        self.tty = self.stream.isatty()
        self.drawn = 0.0  # when the line was last drawn
        self.next_share = every
        self.open = False  # a terminal line without its newline yet

    def line(self, done: int, tokens: int) -> str:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        rate = (done - self.first) / elapsed
        left = (self.total - done) / rate if rate > 0 else float("nan")
        eta = duration(left) if left == left else "?"
        return (
            f"{self.what} {done:,}/{self.total:,} ({100 * done / max(self.total, 1):.0f}%)"
            f"  {tokens / elapsed:,.0f} tok/s  {duration(elapsed)} elapsed, ETA {eta}"
        )

    def update(self, done: int, tokens: int) -> None:
        """done: items finished in all; tokens: tokens produced by this process."""
        now = time.perf_counter()
        if not self.enabled or now - self.started < self.after:
            return
        if self.tty:
            if now - self.drawn >= 0.2 or done == self.total:
                self.stream.write("\r" + self.line(done, tokens) + "\x1b[K")
                self.stream.flush()
                self.drawn, self.open = now, True
        elif done >= self.next_share * self.total:
            while self.next_share * self.total <= done:
                self.next_share += self.every
            self.stream.write(self.line(done, tokens) + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.open:
            self.stream.write("\n")
            self.stream.flush()
            self.open = False
