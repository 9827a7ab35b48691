"""The continuous-batching engine behind `multiar serve`: one thread owns one model and `slots` rows of
preallocated KV cache. Requests wait in a bounded FIFO queue, join between decode steps when a slot is
free (a request of n samples takes up to n slots), are prefilled in chunks of at most `prefill_chunk`
tokens per step while the running rows keep decoding, and leave when they end; a freed slot is reused at
once. A step runs captured (engine.captured_step: the decoding rows' tokens and the prompt chunks', each
naming its cache row, in one compiled graph) or eager (every slot up to the last busy one, so a decoding
row above a freed slot moves down into it). Each row has its own sampling settings, generator,
processors and stops (engine.rows.RowSettings, engine.sampling.Sampler): the one decode loop's per-row
machinery, in slots. Rows with the same sampling settings are sampled in one vectorized call (each row's number from its own generator). A row with a
per-token check (a grammar, checked_draw.TokenCheck) is processed and drawn (`checks`): on a worker
thread beside the batch (overlap), sitting out the steps until its token is ready (its slot is fed as an
idle one's, its logits unused), so a slow check costs its own row, not the others; or, where no core is
free beside the forward's intra-op threads, on the engine thread (inline): drawn with the other rows in
their batched sampling, then its checks asked about its draw and a refused one redrawn as the
decode loop redraws (checked_draw.redraw_refused), so it costs the others its checks and nothing
more. (A worker running beside the forward preempts one of its threads, and every barrier then waits for it, and one that the engine
waits for costs two thread wake-ups a token: measured in-process, the others lost 11.5% waiting, 6.9%
inline, for checks taking 5.9% of a core.) Three inline checks in a row slower than a forward move their
row's later checks to the worker; a step's events are sent after its inline checks, so the event loop
they wake does not take the GIL from them. Knows no HTTP."""

from __future__ import annotations

import collections
import concurrent.futures
import gc
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor

from multiar.engine.captured_step import CapturedStep
from multiar.engine.checked_draw import checked_sample, redraw_refused
from multiar.engine.model import GPT
from multiar.engine.rows import Rows, RowSettings, Token, flatten_banned, process_row, window_tail
from multiar.engine.rows_attention import RowsAttention
from multiar.engine.sampling import Sampler, probabilities, sample_groups
from multiar.engine.segments import Segments

log = logging.getLogger("multiar")


class QueueFull(Exception):
    """The waiting queue holds max_queue requests: come back later (HTTP 429)."""


class Closed(Exception):
    """The engine is draining or stopped: no new requests (HTTP 503)."""


@dataclass
class SampleSpec:
    """One sample of a request: the row it continues, its own settings and sampler."""

    prompt: list[int]
    settings: RowSettings
    sampler: Sampler


@dataclass
class Event:
    """What a request hears from the engine thread: kind "tokens" (new ids of sample `sample`), "end"
    (the sample ended: `end`, all its `ids`, `logps` per sampled id, EOS's last when it ended there) or
    "error" (the request failed: `message`)."""

    kind: str
    sample: int = 0
    ids: list[int] = field(default_factory=list)
    end: str | None = None
    logps: list[float] = field(default_factory=list)
    message: str = ""


@dataclass
class Job:
    """A request in the engine: its samples, where its events go (called on the engine thread), its
    deadline (time.monotonic), and the engine's count of its samples started and ended."""

    samples: list[SampleSpec]
    emit: Callable[[Event], None]
    deadline: float | None = None
    cancelled: bool = False
    started: int = 0
    ended: int = 0
    failed: bool = False
    submitted: float = field(default_factory=time.monotonic)
    admitted: float | None = None  # when its first sample took a slot
    first_token: float | None = None


CHECK_WAIT = 0.05  # seconds the engine waits at most for a checked row's draw when no other row has work
SLOW_STREAK = 3  # inline checks in a row longer than a forward that move a row's checks to the worker

# seconds between the full garbage collections the engine threads run between their steps (one process
# wide; engines made with full_gc), where `multiar serve` turns CPython's own off: its automatic ones
# came every 25-160 s under load and held every stream 18-254 ms, scanning the cycles the requests'
# configs leave (OmegaConf nodes); one a second scans a second's worth (benchmarks/README.md, serve)
FULL_GC_INTERVAL = 1.0
_full_gc = threading.Lock()
_full_gc_at = [0.0]  # monotonic time of the last


def collect_between_steps() -> float:
    """A full collection if FULL_GC_INTERVAL has passed since the end of the last one any engine ran; its
    seconds."""
    if time.monotonic() - _full_gc_at[0] < FULL_GC_INTERVAL or not _full_gc.acquire(blocking=False):
        return 0.0
    try:
        start = time.monotonic()
        if start - _full_gc_at[0] < FULL_GC_INTERVAL:  # another engine's ran while this one looked
            return 0.0
        gc.collect()
        _full_gc_at[0] = time.monotonic()  # from its end: a slow one is not followed by another at once
        return _full_gc_at[0] - start
    finally:
        _full_gc.release()


TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class Stats:
    """The engine's counters, read by /metrics (plain ints and floats: reads from another thread are safe)."""

    tokens: int = 0
    steps: int = 0
    # rows a step's forward computed (an eager step: every slot up to the last one in use, a gap between
    # busy slots too; a captured step: the decoding rows) against rows that were decoding in it: their
    # ratio is the forward's waste
    rows_computed: int = 0
    rows_decoding: int = 0
    moved: int = 0  # rows packed into a lower slot
    # CPU time the per-token checks took on the worker thread (a grammar's own cost; torch's intra-op
    # threads, if a check's ops used them, are not in it: a lower bound)
    check_seconds: float = 0.0
    # wall time the engine thread spent on checks (inline: running them; wait: waiting for them): what
    # they held the batch for, the CPU time above plus whatever the machine's other threads took meanwhile
    check_wall_seconds: float = 0.0
    gc_seconds: float = 0.0  # full garbage collections this engine's thread ran between its steps
    ttft_counts: list[int] = field(default_factory=lambda: [0] * (len(TTFT_BUCKETS) + 1))  # last: +Inf
    ttft_sum: float = 0.0

    def observe_ttft(self, seconds: float) -> None:
        at = next((i for i, le in enumerate(TTFT_BUCKETS) if seconds <= le), len(TTFT_BUCKETS))
        self.ttft_counts[at] += 1
        self.ttft_sum += seconds


class Checked(NamedTuple):
    """A checked row's draw from the worker: its token, whether it had none valid, the token's log
    probability, or the error its processors raised; and the worker's CPU seconds for it."""

    token: int
    dead: bool
    logp: float
    error: str | None = None
    cpu: float = 0.0


@torch.inference_mode()  # its tensors come from the engine thread's inference mode
def check_row(
    logits: Tensor, ids: Tensor, own: RowSettings, sampler: Sampler, ban_eos: int | None
) -> Checked:
    """One row with a per-token check, on the worker: its processors on its logits (V,) given its ids
    (1, n), EOS banned (ban_eos) under min_new_tokens, then a token its checks accept (checked_sample,
    with its own settings and generator): what `Rows.process` and `Rows.draw` give the decode loop."""
    start = time.thread_time()
    try:
        row, banned = flatten_banned(process_row(own.processors, ids, logits[None], ban_eos))
        checks = own.checks
        listed = ids[0].tolist()

        def sound(_: int, token: int) -> bool:
            return all(c.sound(listed, token) for c in checks)

        s = sampler
        token, dead = checked_sample(
            row, banned, sound, s.temperature, s.top_k, s.top_p, s.generator, s.min_p
        )
        logp = torch.log_softmax(logits.float(), dim=-1)[int(token[0])]
        return Checked(int(token[0]), bool(dead[0]), float(logp), cpu=time.thread_time() - start)
    except Exception as err:  # noqa: BLE001 (a row's processor failing fails that row alone)
        return Checked(0, True, 0.0, f"{type(err).__name__}: {err}", time.thread_time() - start)


def checks_way(checks: str, device: torch.device | None = None) -> str:
    """inline, wait or overlap for the serve key `checks`; auto: overlap off the CPU (the forward holds no
    CPU threads there) or where a core is left beside torch's intra-op threads for the worker, else
    inline."""
    if checks != "auto":
        return checks
    if device is not None and device.type != "cpu":
        return "overlap"
    usable = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    return "overlap" if torch.get_num_threads() < len(usable) else "inline"


class SlotEngine:
    """`slots` rows of one model's KV cache serving requests continuously (see the module's doc)."""

    def __init__(
        self,
        model: GPT,
        *,
        slots: int,
        max_queue: int,
        prefill_chunk: int,
        eos_id: int | None,
        max_tokens: int,
        window_starts: Sequence[bool] | None = None,
        stream_interval: float = 0.0,
        attention: RowsAttention | None = None,
        captured: bool = False,
        checks: str = "auto",
        check_wait: float | None = None,
        full_gc: bool = False,
    ):
        self.model, self.slots, self.max_queue, self.chunk = model, slots, max_queue, prefill_chunk
        self.interval = stream_interval
        self.full_gc = full_gc  # run the process's full garbage collections between steps (serve's are off)
        self.unsent: list[list[int]] = [[] for _ in range(slots)]  # drawn ids not yet in an event
        self.sent_at: list[float] = [0.0] * slots  # when the row's last token event went
        self.block = model.config.block_size
        self.keep, self.window_starts = self.block // 2, window_starts
        self.attention = attention or RowsAttention("sdpa", None, None, "default")
        model.eval()
        model.setup_caches(max_batch_size=slots, max_seq_length=self.block, kv_dtype=self.attention.kv_dtype)
        # every step (decoding rows and prompt chunks) as one compiled graph (engine.captured_step),
        # built here
        self.captured = CapturedStep(model, slots) if captured else None
        device = model.wte.weight.device
        self.rows = Rows([[0]] * slots, 1, device=device, width=self.block + max_tokens + 1, eos_id=eos_id)
        self.rows.ends = ["idle"] * slots
        self.rows.finished_t.fill_(True)
        self.job: list[Job | None] = [None] * slots
        self.sample: list[int] = [0] * slots
        self.phase: list[str] = ["idle"] * slots  # idle, prefill, run, check (its draw on the worker)
        self.checked: list[bool] = [False] * slots  # whether the row has a per-token check
        self.checking: dict[int, concurrent.futures.Future[Checked]] = {}
        self.checker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="multiar-check")
        self.checks = checks_way(checks, model.wte.weight.device)
        self.fresh: set[int] = set()  # rows whose check began after the last forward
        self.slow: set[int] = set()  # inline: rows whose check took longer than a forward (now on the worker)
        self.streak: dict[int, int] = {}  # inline: a row's checks in a row slower than a forward
        # what a fresh check is waited for (checks=wait): check_wait seconds, or a running mean of the
        # forward's wall time (a check slower than a forward would more than double the others' step)
        self.check_wait, self.forward_seconds = check_wait, 0.01
        self.pending: list[list[int]] = [[] for _ in range(slots)]  # ids still to prefill
        self.filled: list[int] = [0] * slots  # cache positions filled
        self.logps: list[list[float]] = [[] for _ in range(slots)]
        self.samplers: list[Sampler] = [Sampler() for _ in range(slots)]
        self.queue: collections.deque[Job] = collections.deque()
        self.lock = threading.Condition()
        self.accepting, self.running = True, True
        self.stats = Stats()
        self.thread = threading.Thread(target=self.serve_forever, name="multiar-engine", daemon=True)

    # ---- the HTTP side's calls (any thread) ----
    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job) -> None:
        """Queue job; QueueFull when max_queue wait already, Closed when draining."""
        with self.lock:
            if not (self.accepting and self.running):
                raise Closed("the server is shutting down")
            if len(self.queue) >= self.max_queue:
                raise QueueFull(f"{len(self.queue)} requests are waiting (max_queue)")
            self.queue.append(job)
            self.lock.notify()

    def cancel(self, job: Job) -> None:
        """The client left: its rows end at the next step, its queued samples never start."""
        job.cancelled = True
        with self.lock:
            self.lock.notify()

    @property
    def busy(self) -> int:
        return sum(p != "idle" for p in self.phase)

    @property
    def waiting(self) -> int:
        return len(self.queue)

    def drain(self, timeout: float) -> bool:
        """Stop taking requests and wait up to timeout seconds for the running and queued ones to end;
        whether they did. Then the thread stops."""
        with self.lock:
            self.accepting = False
        end = time.monotonic() + timeout
        while (self.busy or self.queue) and time.monotonic() < end:
            time.sleep(0.02)
        idle = not (self.busy or self.queue)
        self.stop()
        return idle

    def stop(self) -> None:
        with self.lock:
            self.running = False
            self.lock.notify()
        if self.thread.is_alive() and threading.current_thread() is not self.thread:
            self.thread.join(timeout=10)

    # ---- the engine thread ----
    def serve_forever(self) -> None:
        while self.running:
            with self.lock:
                if self.running and not (self.queue or self.busy):
                    self.lock.wait(FULL_GC_INTERVAL if self.full_gc else 0.5)
            if not self.running:
                break
            if self.full_gc:
                self.stats.gc_seconds += collect_between_steps()  # outside the lock: submits go on
            if not (self.queue or self.busy):
                continue
            try:
                self.step()
            except Exception as err:  # noqa: BLE001 (a failed step fails its requests; serving goes on)
                log.exception("serve: a decode step failed")
                for b in range(self.slots):
                    if self.job[b] is not None:
                        self.fail(self.job[b], f"{type(err).__name__}: {err}")
        self.fail_all("the server stopped")
        self.checker.shutdown(wait=False, cancel_futures=True)

    @torch.inference_mode()
    def step(self) -> None:
        """One step: admit, drop the cancelled and late, one forward for the running rows and a chunk
        of the prompts entering, then sample every row that has logits."""
        self.admit()
        self.drop_gone()
        self.collect_checks(wait=not any(p in ("run", "prefill") for p in self.phase))
        if self.captured is None:  # a captured step computes the decoding rows only, wherever they are
            self.pack()
        logits: dict[int, torch.Tensor] = {}
        running = [b for b in range(self.slots) if self.phase[b] == "run"]
        for b in [b for b in running if self.filled[b] >= self.block]:  # the window slides
            ids = self.rows.seq[b, : self.rows.length.values[b]].tolist()
            self.start_prefill(b, window_tail(ids[-self.keep :], self.keep, self.window_starts))
        running = [b for b in running if self.phase[b] == "run"]
        start = time.perf_counter()
        logits.update(self.advance(running))
        self.forward_seconds += 0.1 * (time.perf_counter() - start - self.forward_seconds)
        if logits:
            self.sample_rows(sorted(logits), torch.stack([logits[b] for b in sorted(logits)]))
        self.stats.steps += 1

    def admit(self) -> None:
        """Fill free slots from the head of the queue, FIFO, one sample per slot."""
        with self.lock:
            for b in range(self.slots):
                while self.queue and (
                    self.queue[0].cancelled or self.queue[0].started >= len(self.queue[0].samples)
                ):
                    job = self.queue.popleft()
                    if job.cancelled and job.started == 0:
                        job.emit(Event("error", message="cancelled"))
                if not self.queue:
                    return
                if self.phase[b] != "idle":
                    continue
                job = self.queue[0]
                i, job.started = job.started, job.started + 1
                job.admitted = job.admitted or time.monotonic()
                if job.started == len(job.samples):  # all its samples run: it waits no more
                    self.queue.popleft()
                spec = job.samples[i]
                self.job[b], self.sample[b], self.samplers[b] = job, i, spec.sampler
                self.rows.refill(b, spec.prompt, spec.settings)
                self.checked[b] = bool(self.rows.checks(b))
                self.logps[b] = []
                self.start_prefill(b, spec.prompt)

    def pack(self) -> None:
        """Move the highest decoding rows into the idle slots below them: an eager step computes every slot
        up to the last busy one, so rows left high by the requests that ended below them cost a full
        batch's step at half the load (benchmarks/README.md, serve). A row on the worker (its check) or
        still prefilling stays until it decodes."""
        while True:
            idle = next((b for b in range(self.slots) if self.phase[b] == "idle"), None)
            top = max((b for b in range(self.slots) if self.phase[b] != "idle"), default=-1)
            if idle is None or top < idle or self.phase[top] != "run" or top in self.checking:
                return
            self.move(top, idle)

    def move(self, src: int, dst: int) -> None:
        """Row src's request continues in slot dst: its cache rows, ids and per-row state."""
        n = self.filled[src]
        for block in self.model.blocks:
            cache = block.attn.kv_cache
            assert cache is not None
            cache.k[dst, :, :n] = cache.k[src, :, :n]
            cache.v[dst, :, :n] = cache.v[src, :, :n]
        self.rows.move(src, dst)
        self.stats.moved += 1
        for per_row in (self.job, self.sample, self.phase, self.checked, self.pending, self.filled,
                        self.logps, self.samplers, self.unsent, self.sent_at):  # fmt: skip
            per_row[dst] = per_row[src]
        if src in self.slow:
            self.slow.discard(src)
            self.slow.add(dst)
        if src in self.streak:
            self.streak[dst] = self.streak.pop(src)
        self.free(src)  # its checked flag, log probabilities and sampler are set anew when a request joins

    def free(self, b: int) -> None:
        """Slot b takes the next request: no job, nothing to prefill or stream, no check state."""
        self.unsent[b], self.sent_at[b] = [], 0.0  # the next row's first tokens: at once
        self.job[b], self.phase[b], self.pending[b], self.filled[b] = None, "idle", [], 0
        self.checking.pop(b, None)  # a draw still on the worker is dropped when it comes
        self.slow.discard(b)
        self.streak.pop(b, None)

    def start_prefill(self, b: int, ids: list[int]) -> None:
        self.phase[b], self.pending[b], self.filled[b] = "prefill", list(ids), 0

    def drop_gone(self) -> None:
        """End the rows of requests that were cancelled or ran past their deadline."""
        now = time.monotonic()
        for b in range(self.slots):
            job = self.job[b]
            if job is None:
                continue
            late = job.deadline is not None and now > job.deadline
            if job.cancelled or late or job.failed:
                self.finish(b, self.rows.end(b, "cancelled" if job.cancelled else "timeout"))

    def advance(self, running: list[int]) -> dict[int, torch.Tensor]:
        """One forward (engine.segments): each running row's last id at its position, and up to
        prefill_chunk prompt ids of the rows waiting for them, oldest first. The logits of each running
        row and of each row whose prompt is now all in its cache."""
        placeholders = [min(f, self.block - 1) for f in self.filled]  # before the chunks move them on
        chunks, budget = [], self.chunk
        for b in sorted((b for b in range(self.slots) if self.phase[b] == "prefill"), key=self.age):
            if budget <= 0:
                break
            take, self.pending[b] = self.pending[b][:budget], self.pending[b][budget:]
            chunks.append((b, self.filled[b], take))
            self.filled[b] += len(take)
            budget -= len(take)
        if not (running or chunks):
            return {}
        self.stats.rows_decoding += len(running)
        if self.captured is not None:
            out = self.captured_forward(running, chunks)
        else:
            out = self.segments_forward(running, chunks, placeholders)
        logits = {b: out[j] for j, b in enumerate(running)}
        for b in running:
            self.filled[b] += 1
        for j, (b, _, _) in enumerate(chunks):
            if not self.pending[b]:
                self.phase[b], logits[b] = "run", out[len(running) + j]
        return logits

    def last_ids(self, rows: torch.Tensor) -> torch.Tensor:
        """Each of these rows' last id, (len(rows),)."""
        return self.rows.seq[self.rows.index[rows], (self.rows.length.tensor[rows] - 1).clamp_min(0)]

    def captured_forward(self, running: list[int], chunks: list[tuple[int, int, list[int]]]) -> torch.Tensor:
        """The captured graph's step: the running rows' tokens and the chunks' as one list, each naming
        its cache row and position -> logits (running rows, then each chunk's last token)."""
        device = self.rows.seq.device
        rows = running + [b for b, _, take in chunks for _ in take]
        positions = [self.filled[b] for b in running] + [p for _, at, take in chunks for p in range(at, at + len(take))]  # fmt: skip
        ends = list(itertools.accumulate((len(take) for _, _, take in chunks), initial=len(running)))[1:]
        ids = [self.last_ids(torch.tensor(running, device=device))] if running else []
        ids += [torch.tensor(take, device=device) for _, _, take in chunks]
        self.stats.rows_computed += len(running)
        return self.captured(
            torch.cat(ids),
            torch.tensor(rows, device=device),
            torch.tensor(positions, device=device),
            max(positions) + 1,
            torch.tensor([*range(len(running)), *(e - 1 for e in ends)], device=device),
        )

    def segments_forward(
        self, running: list[int], chunks: list[tuple[int, int, list[int]]], placeholders: list[int]
    ) -> torch.Tensor:
        """The eager step (engine.segments): every slot up to the last one in use, then the chunks; a slot
        not decoding writes a placeholder it fills again before reading it (a prefilling row: its chunk,
        in the same step; a checking row: the one after its ids, or its last, which its slide then
        refills) -> logits (running rows, then each chunk's last token)."""
        device = self.rows.seq.device
        d = max(b for b in range(self.slots) if self.phase[b] != "idle") + 1 if running else 0
        positions = torch.tensor(placeholders[:d], dtype=torch.long, device=device)
        ids = [self.last_ids(torch.arange(d, device=device))]
        ids += [torch.tensor(take, device=device) for _, _, take in chunks]
        self.stats.rows_computed += d
        segments = Segments(
            d, positions, [(b, at, len(take)) for b, at, take in chunks], self.attention.attend
        )
        out = self.model.forward_segments(torch.cat(ids), segments)  # (d + len(chunks), V)
        return out[[*running, *range(d, d + len(chunks))]]

    def age(self, b: int) -> float:
        job = self.job[b]
        return job.submitted if job is not None else 0.0

    def sample_rows(self, ready: list[int], logits: torch.Tensor) -> None:
        """Process, sample and append one token for each ready row; stream its events. A row with a
        per-token check is drawn with the others and its checks asked about its draw (inline), or goes
        to the worker (overlap, wait, or a slow grammar's row: phase "check") and takes its token when
        it is drawn."""
        aside = [j for j, b in enumerate(ready) if self.checked[b] and not self.inline(b)]
        rows = [(ready[j], logits[j].clone()) for j in aside]
        if self.checks == "overlap":  # the worker starts while the others are sampled
            for b, row in rows:
                self.start_check(b, row)
        if len(aside) < len(ready):
            keep = [j for j in range(len(ready)) if j not in aside]
            self.sample_drawn([ready[j] for j in keep], logits[keep] if aside else logits)
        if self.checks != "overlap":  # after them: waited for at the next step's start
            for b, row in rows:
                if self.job[b] is not None:  # not freed by another row of its request failing
                    self.start_check(b, row)

    def inline(self, b: int) -> bool:
        """Whether row b's checks run on the engine thread, with its draw among the others'."""
        return self.checks == "inline" and b not in self.slow

    def sample_drawn(self, ready: list[int], logits: torch.Tensor) -> None:
        """Process, sample and append one token for each ready row, in one batch (the plain rows' and the
        inline-checked rows'): each checked row's draw is then asked of its checks and, refused, redrawn
        as the decode loop redraws (`settle_row`), so its events and the others' go out after its checks
        ran (the event loop they wake does not take the GIL from them)."""
        rows = self.rows
        checked = [j for j, b in enumerate(ready) if self.checked[b]]
        if checked:  # checked rows last: their processors are timed as their checks' cost
            order = [j for j in range(len(ready)) if not self.checked[ready[j]]] + checked
            ready, logits = [ready[j] for j in order], logits[order]
        first = len(ready) - len(checked)
        processed, dead, failed = (
            rows.process_rows(logits[:first], ready[:first]) if first else (None, None, {})
        )
        shared = (0.0, 0.0)
        if checked:
            clock, wall = time.thread_time(), time.perf_counter()
            own, own_dead, own_failed = rows.process_rows(logits[first:], ready[first:])
            if processed is not None and dead is not None:
                own, own_dead = torch.cat([processed, own]), torch.cat([dead, own_dead])
            processed, dead = own, own_dead
            failed |= own_failed
            shared = (
                (time.thread_time() - clock) / len(checked),
                (time.perf_counter() - wall) / len(checked),
            )
        assert processed is not None and dead is not None
        token = sample_groups(processed, [self.samplers[b] for b in ready])
        for j in range(first, len(ready)):
            b = ready[j]
            if b not in failed:
                error = self.settle_row(b, processed[j : j + 1], token[j : j + 1], dead[j : j + 1], shared)
                if error is not None:
                    failed[b] = error
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, token[:, None])[:, 0].tolist()
        for b, message in failed.items():
            self.fail(self.job[b], message)
        keep = [j for j, b in enumerate(ready) if self.job[b] is not None]  # a failed job's rows are freed
        if keep:
            ready = [ready[j] for j in keep]
            self.take(ready, token[keep], dead[keep], [logp[j] for j in keep])

    def settle_row(
        self, b: int, processed: Tensor, token: Tensor, dead: Tensor, shared: tuple[float, float]
    ) -> str | None:
        """Row b's checks on its draw (token (1,) and dead (1,), from its processed logits (1, V); set in
        place to a sound token, redrawn as `checked_sample` redraws, or dead), counted with its share of
        the checked rows' processing (CPU, wall seconds); the error a check raised, else None.
        SLOW_STREAK checks in a row longer than a forward (a row's first also builds its prompt's state,
        and is not counted; nor is one a pause of the machine stretched: it takes three) move the row's
        later checks to the worker."""
        clock, wall = time.thread_time(), time.perf_counter()
        error = None
        try:
            checks, n, s = self.rows.checks(b), self.rows.length.values[b], self.samplers[b]
            listed = self.rows.seq[b, :n].tolist()

            def sound(_: int, candidate: int) -> bool:
                return all(c.sound(listed, candidate) for c in checks)

            if not (bool(dead[0]) or sound(0, int(token[0]))):
                greedy = s.temperature <= 0
                dist = (
                    processed
                    if greedy
                    else probabilities(processed, s.temperature, s.top_k, s.top_p, s.min_p)
                )
                redraw_refused(dist, token, dead, sound, greedy, s.generator, refused=[0])
        except Exception as err:  # noqa: BLE001 (a row's check failing fails that row alone)
            error = f"{type(err).__name__}: {err}"
        self.stats.check_seconds += time.thread_time() - clock + shared[0]
        took = time.perf_counter() - wall + shared[1]
        self.stats.check_wall_seconds += took
        self.streak[b] = self.streak.get(b, -1) + 1 if took > self.bound() else 0
        if self.streak[b] >= SLOW_STREAK:
            self.slow.add(b)
        return error

    def start_check(self, b: int, logits: torch.Tensor) -> None:
        """Row b's processors and checked draw on the worker, from a copy of its ids; it sits out."""
        rows, own = self.rows, self.rows.own[b]
        assert own is not None
        n = rows.length.values[b]
        early = rows.eos_id is not None and n - rows.prompt_lens[b] < own.min_new_tokens
        ids = rows.seq[b : b + 1, :n].clone()
        args = (logits, ids, own, self.samplers[b], rows.eos_id if early else None)
        self.phase[b] = "check"
        self.fresh.add(b)
        self.checking[b] = self.checker.submit(check_row, *args)

    def bound(self) -> float:
        """What a check may hold the batch for: check_wait, or the forward's running mean."""
        return self.forward_seconds if self.check_wait is None else self.check_wait

    def collect_checks(self, wait: bool) -> None:
        """The checked rows whose token is drawn rejoin the batch with it (wait: block for one when no
        other row has work this step, for at most CHECK_WAIT seconds: a hanging check never holds the
        engine, whose next step drops the rows cancelled or late meanwhile; with checks=wait, the checks
        begun since the last forward are waited for up to one forward's time, older ones not). A row whose request failed
        (another of its rows' check raised) is freed already: it takes nothing."""
        fresh, self.fresh = [f for b, f in self.checking.items() if b in self.fresh], set()
        if not self.checking:
            return
        if wait:
            futures = list(self.checking.values())
            concurrent.futures.wait(futures, CHECK_WAIT, return_when=concurrent.futures.FIRST_COMPLETED)
        elif self.checks == "wait" and fresh:  # a check that overran its wait before is not waited for
            start = time.perf_counter()
            concurrent.futures.wait(fresh, self.bound())
            self.stats.check_wall_seconds += time.perf_counter() - start
        done = {b: f.result() for b, f in list(self.checking.items()) if f.done()}
        self.stats.check_seconds += sum(r.cpu for r in done.values())
        for b, result in done.items():
            if self.checking.pop(b, None) is None or self.job[b] is None:
                continue  # freed when an earlier row of its request failed
            self.phase[b] = "run"
            if result.error is not None:
                self.fail(self.job[b], result.error)
        ready = [b for b, r in done.items() if r.error is None and self.job[b] is not None]
        if ready:
            device = self.rows.seq.device
            token = torch.tensor([done[b].token for b in ready], device=device)
            dead = torch.tensor([done[b].dead for b in ready], device=device)
            self.take(ready, token, dead, [done[b].logp for b in ready])

    def take(self, ready: list[int], token: torch.Tensor, dead: torch.Tensor, logp: list[float]) -> None:
        """Append the ready rows' tokens (and dead flags), keep their log probabilities, stream events."""
        rows = self.rows
        events = rows.append_rows(token, dead, ready)
        for b, lp in zip(ready, logp, strict=True):
            self.logps[b].append(lp)
        self.stats.tokens += len(ready)
        # a row whose stop rule raised ended with it ("error"): its request fails, after hearing its
        # tokens (found before dispatch frees the row)
        failing = {id(j): (j, m) for b, m in rows.failed.items() if (j := self.job[b]) is not None}
        self.dispatch(events)
        for job, message in failing.values():
            self.fail(job, message)

    def dispatch(self, events: list[Token]) -> None:
        """Tokens to their requests, one event per row with what it drew since its last one, at most
        every stream_interval seconds (a row's first tokens and its last go at once); ended rows finish."""
        for e in events:
            if e.token is not None and self.job[e.row] is not None:  # not a row its request's failure freed
                self.unsent[e.row].append(e.token)
        ended = {e.row for e in events if e.token is None}
        now = time.monotonic()
        for b in {e.row for e in events}:  # the ended rows among them
            job = self.job[b]
            if job is None or not self.unsent[b]:
                continue
            if job.first_token is None:
                job.first_token = now
                self.stats.observe_ttft(now - job.submitted)
            elif b not in ended and now - self.sent_at[b] < self.interval:
                continue
            job.emit(Event("tokens", self.sample[b], self.unsent[b]))
            self.unsent[b], self.sent_at[b] = [], now
        for b in ended:
            self.finish(b, [])

    def finish(self, b: int, events: list[Token]) -> None:
        """Row b ended: the slot is free at once, then its request hears the end (unless it failed)."""
        job, rows = self.job[b], self.rows
        ids, end, sample = list(rows.new[b]), rows.ends[b], self.sample[b]
        logps = self.logps[b][: len(ids) + (end == "eos")]
        # what the row still held back (a stop's possible start) when it was cut goes to the stream too
        unsent = self.unsent[b] + [e.token for e in events if e.token is not None]
        self.free(b)
        rows.ends[b], rows.finished_t[b] = end or "idle", True
        if job is not None:
            job.ended += 1
            if not job.failed:
                if unsent:  # a row cut between its events (cancelled, late): the stream still gets them
                    job.emit(Event("tokens", sample, unsent))
                job.emit(Event("end", sample, ids, end, logps))

    def fail(self, job: Job | None, message: str) -> None:
        """The request fails alone: one error event, its rows freed, its queued samples dropped."""
        if job is None or job.failed:
            return
        job.failed = True
        job.emit(Event("error", message=message))
        for b in range(self.slots):
            if self.job[b] is job:
                self.rows.end(b, "error")
                self.finish(b, [])
        with self.lock:
            if job in self.queue:
                self.queue.remove(job)

    def fail_all(self, message: str) -> None:
        for b in range(self.slots):
            self.fail(self.job[b], message)
        with self.lock:
            queued, self.queue = list(self.queue), collections.deque()
        for job in queued:
            self.fail(job, message)

    def describe(self) -> dict[str, Any]:
        """Slots, KV cache memory, the weights' and the cache's dtypes, the rows' attention: the line
        printed at start."""
        cache = self.model.blocks[0].attn.kv_cache
        assert cache is not None
        kv = 2 * cache.k.numel() * cache.k.element_size() * len(self.model.blocks)
        return {
            "slots": self.slots,
            "kv_mib": kv / 2**20,
            "dtype": str(self.model.wte.weight.dtype),
            "kv_dtype": str(cache.k.dtype),
            "attention": self.attention.way,
            "checks": self.checks,
        }
