"""The request side of `multiar serve`, between the HTTP routes and the engines: a request's events from
the engine thread into asyncio, its result or its SSE stream, cancelled when the client leaves, and the
OpenAI completions mapping. Never touches a model."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import threading
import time
import uuid
import weakref
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from symusic import Score

from multiar.commands.serve_engine import Event, Job
from multiar.commands.serve_requests import Plan, RequestError, Served, finish, notes_view

Disconnected = Callable[[], Awaitable[bool]]


@dataclass
class Files:
    """Files the server wrote, by opaque id; the oldest go past `keep`, and with the last linked file of
    a request its whole folder (`folders`: the keys each request folder still has linked)."""

    keep: int
    paths: OrderedDict[str, tuple[Path, Path]] = field(default_factory=OrderedDict)  # key: file, folder
    folders: dict[Path, set[str]] = field(default_factory=dict)

    def add(self, path: Path, folder: Path) -> str:
        key = uuid.uuid4().hex
        self.paths[key] = (path, folder)
        self.folders.setdefault(folder, set()).add(key)
        while len(self.paths) > self.keep:
            old, (gone, owner) = self.paths.popitem(last=False)
            gone.unlink(missing_ok=True)
            left = self.folders[owner]
            left.discard(old)
            if not left:
                del self.folders[owner]
                shutil.rmtree(owner, ignore_errors=True)
        return key

    def get(self, key: str) -> Path | None:
        found = self.paths.get(key)
        return found[0] if found is not None else None


def discard(flow: Flow) -> None:
    """The request's folder, when none of it is linked (files=false, failed, cancelled): removed."""
    shutil.rmtree(flow.plan.prepared.out_dir, ignore_errors=True)


@dataclass
class Outcomes:
    """Requests by outcome, for /metrics."""

    counts: Counter = field(default_factory=Counter)


class Inbox:
    """Events from the engine threads into one event loop, with one wake-up of the loop per batch: a step
    emits an event for each of its running rows, and waking the loop for each (a write to its self-pipe,
    a pass of its selector) cost the loop and the engine thread a share of a core at 16 streams."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.lock = loop, threading.Lock()
        self.items: list[tuple[asyncio.Queue[Event], Event]] = []

    def put(self, queue: asyncio.Queue[Event], event: Event) -> None:  # any thread
        with self.lock:
            self.items.append((queue, event))
            if len(self.items) > 1:  # a wake-up is on its way and will take this one too
                return
        with contextlib.suppress(RuntimeError):  # the loop is gone (shutdown): nobody listens
            self.loop.call_soon_threadsafe(self.deliver)

    def deliver(self) -> None:  # on the loop
        with self.lock:
            items, self.items = self.items, []
        for queue, event in items:
            queue.put_nowait(event)


_inboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Inbox] = weakref.WeakKeyDictionary()


def inbox() -> Inbox:
    """The running loop's inbox."""
    loop = asyncio.get_running_loop()
    box = _inboxes.get(loop)
    if box is None:
        box = _inboxes[loop] = Inbox(loop)
    return box


class Flow:
    """One request's events, from the engine thread into this event loop."""

    def __init__(self, served: Served, plan: Plan, timeout: float | None, received: float | None = None):
        self.served, self.plan = served, plan
        self.received = time.monotonic() if received is None else received  # the request read, unplanned
        self.inbox = inbox()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.held: Event | None = None  # taken from the queue by merged(), not yet handed on
        deadline = time.monotonic() + timeout if timeout else None
        self.job = Job(plan.specs, self.emit, deadline)
        self.results: list[tuple[list[int], str | None, list[float]] | None] = [None] * len(plan.specs)

    def emit(self, event: Event) -> None:  # on the engine thread
        self.inbox.put(self.queue, event)

    def submit(self) -> None:
        self.served.engine.submit(self.job)  # QueueFull, Closed: the route answers 429, 503

    def cancel(self) -> None:
        self.served.engine.cancel(self.job)

    async def events(self, gone: Disconnected) -> AsyncIterator[Event]:
        """The request's events until every sample ended or it failed; cancels when the client left."""
        left = len(self.results)
        try:
            while left:
                try:  # most events are waiting already: no timer for those
                    event = self.take() or await asyncio.wait_for(self.queue.get(), 0.25)
                    event = self.merged(event)
                except asyncio.TimeoutError:  # TimeoutError from 3.11 on; not on 3.10
                    if await gone():
                        self.cancel()
                        raise RequestError("the client disconnected", 499, "cancelled") from None
                    continue
                if event.kind == "error":
                    raise RequestError(f"the request failed: {event.message}", 500, "server_error")
                if event.kind == "end":
                    self.results[event.sample] = (event.ids, event.end, event.logps)
                    left -= 1
                yield event
        finally:
            if left:
                self.cancel()

    def take(self) -> Event | None:
        """The next event if one is waiting (the one merged() held back first), else None."""
        if self.held is not None:
            event, self.held = self.held, None
            return event
        return self.queue.get_nowait() if self.queue.qsize() else None

    def merged(self, event: Event) -> Event:
        """event with the token events of its sample waiting right behind it: a stream that fell behind
        the engine catches up in one SSE event instead of one per step; the first event that does not
        merge waits for the next take()."""
        while event.kind == "tokens" and (following := self.take()) is not None:
            if following.kind != "tokens" or following.sample != event.sample:
                self.held = following
                break
            event = Event("tokens", event.sample, event.ids + following.ids)
        return event

    async def result(self) -> dict[str, Any]:
        done = [r for r in self.results if r is not None]
        return await asyncio.to_thread(finish, self.served, self.plan, done)

    def timings(self) -> dict[str, float | None]:
        """Where the request's time went, seconds from its body being read (monotonic clock): planned
        (its keys checked, its rows built), waited in the queue for its first sample's slot, first
        token sent (null when none was: tokens held back for a stop sequence go later), all done."""
        job, t0 = self.job, self.received

        def since(t: float | None) -> float | None:
            return None if t is None else round(t - t0, 6)

        queued = None if job.admitted is None else round(job.admitted - job.submitted, 6)
        return {"plan_s": since(job.submitted), "queue_s": queued, "first_token_s": since(job.first_token),
                "total_s": since(time.monotonic())}  # fmt: skip


def links(flow: Flow, result: dict[str, Any], files: Files) -> list[dict[str, str]]:
    """The report's files as opaque links; without any, the request's folder goes at once."""
    report, folder = result.get("report") or {}, flow.plan.prepared.out_dir
    out = [
        {"name": Path(p).name, "url": f"/v1/files/{files.add(Path(p), folder)}"}
        for p in report.get("files", [])
    ]
    if not out:
        discard(flow)
    return out


def sse(data: Any) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


async def generate_stream(
    flow: Flow, gone: Disconnected, files: Files, outcomes: Outcomes
) -> AsyncIterator[bytes]:
    """SSE for /v1/generate: token batches per sample (music: the notes completed so far; code and
    protein: the text of the sample's new ids so far), the final event with the samples, then [DONE]."""
    domain, text = flow.served.run.domain, flow.served.text
    seen: dict[int, list[int]] = {}
    notes: dict[int, int] = {}
    try:
        async for event in flow.events(gone):
            if event.kind != "tokens":
                continue
            ids = seen.setdefault(event.sample, [])
            ids += event.ids
            out: dict[str, Any] = {"sample": event.sample, "ids": event.ids}
            if text:  # code, protein: the new ids' text so far (a page shows it), one decode per event,
                # on the loop: a tokenizer decodes a sample's ids in microseconds, less than a thread hop
                out["text"] = domain.decode(ids)[0]
            else:  # music: the notes completed so far, from a decode on a worker (a Score takes longer)
                head = flow.plan.prepared.work.prompts[event.sample // flow.plan.prepared.work.n]
                artifact = (await asyncio.to_thread(domain.decode, head + ids))[0]
                if isinstance(artifact, Score):
                    out |= notes_view(artifact, notes.get(event.sample, 0))
                    notes[event.sample] = out["note_count"]
            yield sse(out)
        result = await flow.result()
    except RequestError as err:
        outcomes.counts[err.kind] += 1
        discard(flow)
        yield sse({"error": {"message": str(err), "type": err.kind}})
        yield sse("[DONE]")
        return
    except BaseException:  # the client left (the stream closed) or the server failed: nothing linked
        discard(flow)
        raise
    outcomes.counts["ok"] += 1
    final = {k: result[k] for k in ("samples", "metrics", "seed")} | {"files": links(flow, result, files)}
    yield sse(final | {"timings": flow.timings()})
    yield sse("[DONE]")


async def generate_result(flow: Flow, gone: Disconnected, files: Files) -> dict[str, Any]:
    try:
        async for _ in flow.events(gone):
            pass
        result = await flow.result()
    except BaseException:  # failed, cancelled, timed out: nothing of it is linked
        discard(flow)
        raise
    final = {k: result[k] for k in ("samples", "metrics", "seed")} | {"files": links(flow, result, files)}
    return final | {"timings": flow.timings()}


COMPLETION_KEYS = frozenset(
    {"model", "prompt", "suffix", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream"}
    | {"min_tokens", "ignore_eos", "top_k", "min_p", "repetition_penalty", "user", "logprobs", "echo"}
)


def completion_body(body: dict[str, Any], served: Served) -> dict[str, Any]:
    """An OpenAI completions request as a generate request (text out, no files)."""
    unknown = sorted(set(body) - COMPLETION_KEYS)
    if unknown:
        raise RequestError(f"{unknown[0]}: not a completions key")
    if body.get("echo") or body.get("logprobs"):
        raise RequestError("echo and logprobs are not supported")
    prompt = body.get("prompt", "")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise RequestError("prompt: one string")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop or []
    if not (isinstance(stops, list) and all(isinstance(s, str) and s for s in stops)) or len(stops) > 4:
        raise RequestError("stop: a string or up to 4 strings")
    domain = served.run.domain
    out: dict[str, Any] = {
        "files": False,
        "include_prompt": False,
        "min_new_tokens": body.get("min_tokens", 0),
    }
    out["max_new_tokens"] = body.get("max_tokens", 16)
    for key, name in (("temperature", "temperature"), ("top_p", "top_p"), ("n", "n"), ("seed", "seed")):
        if body.get(key) is not None:
            out[name] = body[key]
    for key in ("top_k", "min_p", "repetition_penalty", "ignore_eos"):
        if body.get(key) is not None:
            out[key] = body[key]
    if body.get("suffix") is not None:
        out["prompt_prefix"], out["prompt_suffix"] = prompt, body["suffix"]
    elif prompt:
        out["prompt"] = prompt
    try:
        out["stop_ids"] = [domain.prompt_ids(s)[1:] for s in stops]
    except (ValueError, OSError) as err:
        raise RequestError(f"stop: the {domain.name} domain cannot encode it ({err})") from None
    return out


def completion(flow: Flow, name: str, samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The OpenAI response of a finished completions request."""
    prompt_tokens = len(flow.plan.specs[0].prompt) if flow.plan.specs else 0
    new = sum(s["new_tokens"] for s in samples)
    choices = [
        {
            "text": s.get("middle", s.get("text", "")),
            "index": s["index"],
            "logprobs": None,
            "finish_reason": "length" if s["end"] in ("length", "max_len") else "stop",
        }
        for s in samples
    ]
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": new, "total_tokens": prompt_tokens + new}
    return {
        "id": f"cmpl-{uuid.uuid4().hex[:24]}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": name,
        "choices": choices,
        "usage": usage,
        "seed": flow.plan.prepared.cfg.seed,  # the request's, or the one drawn for it: sent again, the same
    }


async def completion_stream(
    flow: Flow, name: str, gone: Disconnected, outcomes: Outcomes
) -> AsyncIterator[bytes]:
    """SSE for /v1/completions: a text delta per token batch per choice, a last chunk with usage, [DONE]."""
    domain, cid = flow.served.run.domain, f"cmpl-{uuid.uuid4().hex[:24]}"
    ids: dict[int, list[int]] = {}
    texts: dict[int, str] = {}
    try:
        async for event in flow.events(gone):
            if event.kind == "tokens":
                ids.setdefault(event.sample, []).extend(event.ids)
                text = domain.decode(ids[event.sample])[0]  # on the loop: see generate_stream
                delta, texts[event.sample] = text[len(texts.get(event.sample, "")) :], text
                choice = {"text": delta, "index": event.sample, "logprobs": None, "finish_reason": None}
            else:
                reason = "length" if event.end in ("length", "max_len") else "stop"
                choice = {"text": "", "index": event.sample, "logprobs": None, "finish_reason": reason}
            yield sse({"id": cid, "object": "text_completion", "created": int(time.time()), "model": name,
                       "choices": [choice]})  # fmt: skip
        final = completion(flow, name, (await flow.result())["samples"])
        yield sse(final | {"id": cid, "choices": []})
        outcomes.counts["ok"] += 1
    except RequestError as err:
        outcomes.counts[err.kind] += 1
        yield sse({"error": {"message": str(err), "type": err.kind}})
    finally:
        discard(flow)  # completions write no files
    yield sse("[DONE]")
