"""Load on a real `multiar serve` subprocess (127.0.0.1) from one light asyncio process (httpx): the load
generator shares the machine's cores with the server, so every figure here includes its cost.

- closed loop: 16 clients, each sending requests back to back, exactly 128 new tokens each
  (min_new_tokens = max_new_tokens = 128), seeded -> output tokens/s and requests lost (must be 0);
- open loop: Poisson arrivals at several rates (fractions of the closed loop's request rate, past it to
  find where throughput stops growing) -> TTFT (first SSE token event) and TPOT, median and p99;
- soak: many requests, some cancelled (the client disconnects mid-stream) -> lost, slots leaked (the
  busy-slot gauge after the load), resident memory of the server (VmRSS) after warm-up and at the end.

For (a) slots=16 and (b) slots=1 on one run, and (c) with --llama-server BINARY, llama.cpp's C++ server
(`llama-server --parallel 16`, continuous batching) on the same weights exported as an f32 GGUF
(`multiar export format=gguf`), fed the same token ids (its /completion endpoint, `ignore_eos` and
`n_predict` for exactly 128 tokens, temperature 1 with its other samplers off). Usage:

    python benchmarks/serve_load.py runs/protein_small --json benchmarks/serve_load.json
    python benchmarks/serve_load.py runs/protein_small --only soak --soak 200   # a short soak
    python benchmarks/serve_load.py runs/protein_small --llama-server /path/to/llama-server
    python benchmarks/serve_load.py runs/protein_small --llama-server /path/to/llama-server --alternate 6
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

AMINO = "ACDEFGHIKLMNPQRSTVWY"
NEW_TOKENS = 128
# a first start compiles the captured steps: 2-3 minutes on a 2-core AVX512 EPYC, past 3 on an AVX2 one
READY_S = 600.0


@dataclass
class Server:
    """A `multiar serve` subprocess and its address."""

    proc: subprocess.Popen
    url: str
    log: Path
    dtype: str = ""

    def rss_kib(self) -> int:
        text = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", text).group(1))

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: Path, slots: int, log_dir: Path, *extra: str, ready_s: float = READY_S) -> Server:
    """`multiar serve runs=[run] slots=...` on a free loopback port, once /health says ready."""
    port = free_port()
    log = log_dir / f"serve_slots{slots}_{port}.log"
    exe = Path(sys.executable).parent / "multiar"
    cmd = [str(exe), "serve", f"runs=[{run}]", "host=127.0.0.1", f"port={port}", f"slots={slots}", *extra]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    server = wait_ready(Server(proc, f"http://127.0.0.1:{port}", log), "multiar serve", ready_s)
    line = r"KV cache [\d.]+ MiB \((\S+)\), (\S+) weights, rows attention (\w+), (\w+) steps"
    found = re.search(line, log.read_text())
    server.dtype = (
        "{1} weights, {0} keys/values, {2} attention, {3} steps".format(*found.groups()) if found else "?"
    )
    return server


def wait_ready(server: Server, name: str, ready_s: float) -> Server:
    """server once its /health answers 200; RuntimeError (its log's tail) when it exits or times out."""
    deadline = time.monotonic() + ready_s
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{name} exited {server.proc.returncode}: {server.log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    stop_server(server)
    raise RuntimeError(f"{name} not ready after {ready_s} s")


def stop_server(server: Server, timeout: float = 30.0) -> int | None:
    """SIGTERM (drain), then SIGKILL if it has not exited within timeout."""
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(10)
    return server.proc.returncode


@dataclass
class Outcome:
    """One request seen from the client: status, tokens, when the first and last token events came."""

    status: str = "lost"  # ok, cancelled (by this client), rejected (429), lost (anything else)
    tokens: int = 0
    start: float = 0.0
    first: float | None = None
    last: float | None = None
    detail: str = ""
    trace: list[tuple[float, int]] | None = None  # (when, how many) per token event, where asked
    server: dict[str, Any] | None = None  # the server's timings of it (its final event's "timings")

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.start

    @property
    def tpot(self) -> float | None:
        if self.first is None or self.last is None or self.tokens < 2:
            return None
        return (self.last - self.first) / (self.tokens - 1)


def body(seed: int, new_tokens: int, prompt_len: int = 16) -> dict[str, Any]:
    rng = random.Random(seed)
    prompt = "M" + "".join(rng.choice(AMINO) for _ in range(prompt_len - 1))
    return {"prompt": prompt, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "seed": seed,
            "temperature": 1.0, "stream": True, "files": False}  # fmt: skip


# llama-server's /completion body for body()'s request: the same token ids (protein: <bos> + one per
# letter), exactly new_tokens tokens, temperature 1 and every other sampler neutral (its defaults are
# top-k 40, top-p 0.95, min-p 0.05), no prompt cache (multiar serve has none)
def llama_body(payload: dict[str, Any]) -> dict[str, Any]:
    return {"prompt": protein_ids(payload["prompt"]), "n_predict": payload["max_new_tokens"], "ignore_eos": True,
            "seed": payload["seed"], "temperature": payload["temperature"], "top_k": 0, "top_p": 1.0,
            "min_p": 0.0, "typical_p": 1.0, "repeat_penalty": 1.0, "stream": True, "return_tokens": True,
            "cache_prompt": False}  # fmt: skip


def protein_ids(prompt: str) -> list[int]:
    from multiar.domains import build_domain

    global _PROTEIN
    _PROTEIN = _PROTEIN or build_domain("protein")
    return _PROTEIN.prompt_ids(prompt)


_PROTEIN: Any = None


async def llama_request(client: httpx.AsyncClient, url: str, payload: dict[str, Any]) -> Outcome:
    """body()'s request to llama-server's POST /completion (stream): the same Outcome fields."""
    out, want = Outcome(start=time.perf_counter()), payload["max_new_tokens"]
    try:
        async with client.stream("POST", f"{url}/completion", json=llama_body(payload)) as r:
            if r.status_code != 200:
                out.detail = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return out
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line[6:] == "[DONE]":
                    continue
                event = json.loads(line[6:])
                if event.get("tokens"):
                    now = time.perf_counter()
                    out.first = out.first if out.first is not None else now
                    out.last, out.tokens = now, out.tokens + len(event["tokens"])
                if event.get("stop"):
                    out.status = "ok" if out.tokens == want else "lost"
                    break
    except (httpx.HTTPError, json.JSONDecodeError) as err:  # a broken stream: this request is lost
        out.detail = f"{type(err).__name__}: {err}"
    return out


async def send(client: httpx.AsyncClient, url: str, payload: dict[str, Any], api: str) -> Outcome:
    return await (
        stream_request(client, url, payload) if api == "multiar" else llama_request(client, url, payload)
    )


async def stream_request(
    client: httpx.AsyncClient,
    url: str,
    payload: dict[str, Any],
    cancel_after: int | None = None,
    trace: list[tuple[float, int]] | None = None,
) -> Outcome:
    """POST /v1/generate with stream=true; cancel_after: disconnect after that many tokens; trace: a
    list the token events' (time, count) are appended to."""
    out = Outcome(start=time.perf_counter(), trace=trace)
    try:
        async with client.stream("POST", f"{url}/v1/generate", json=payload) as r:
            if r.status_code != 200:
                out.status = "rejected" if r.status_code == 429 else "lost"
                out.detail = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return out
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "ids" in event:
                    now = time.perf_counter()
                    out.first = out.first if out.first is not None else now
                    out.last, out.tokens = now, out.tokens + len(event["ids"])
                    if out.trace is not None:
                        out.trace.append((now, len(event["ids"])))
                    if cancel_after is not None and out.tokens >= cancel_after:
                        out.status = "cancelled"
                        return out  # leaving the block closes the connection mid-stream
                elif "error" in event:
                    out.detail = str(event["error"])
                elif "samples" in event:
                    out.status = "ok" if event["samples"][0]["new_tokens"] == out.tokens else "lost"
                    out.server = event.get("timings")
    except (httpx.HTTPError, json.JSONDecodeError) as err:  # a broken stream: this request is lost
        out.detail = f"{type(err).__name__}: {err}"
    return out


def client(limit: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
    return httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits)


async def closed_loop(url: str, clients: int, per_client: int, api: str = "multiar") -> dict[str, Any]:
    """clients x per_client requests of exactly NEW_TOKENS tokens, each client back to back."""

    async def one_client(k: int, http: httpx.AsyncClient) -> list[Outcome]:
        return [await send(http, url, body(1000 * k + i, NEW_TOKENS), api) for i in range(per_client)]

    async with client(clients) as http:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_client(k, http) for k in range(clients)))
        seconds = time.perf_counter() - t0
    outcomes = [o for r in results for o in r]
    ok = [o for o in outcomes if o.status == "ok"]
    tokens = sum(o.tokens for o in ok)
    return {"clients": clients, "requests": len(outcomes), "seconds": round(seconds, 2),
            "output_tokens": tokens, "tokens_per_s": round(tokens / seconds, 1),
            "lost": len(outcomes) - len(ok), "exact_128": all(o.tokens == NEW_TOKENS for o in ok),
            **latency(ok)}  # fmt: skip


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def latency(outcomes: list[Outcome]) -> dict[str, Any]:
    """TTFT and TPOT median and p99, in milliseconds."""
    ttft = [o.ttft for o in outcomes if o.ttft is not None]
    tpot = [o.tpot for o in outcomes if o.tpot is not None]

    def ms(v: float | None) -> float | None:
        return None if v is None else round(1000 * v, 1)

    return {"ttft_ms_median": ms(statistics.median(ttft)) if ttft else None, "ttft_ms_p99": ms(pct(ttft, 0.99)),
            "tpot_ms_median": ms(statistics.median(tpot)) if tpot else None, "tpot_ms_p99": ms(pct(tpot, 0.99))}  # fmt: skip


async def open_loop(
    url: str, rate: float, requests: int, seed: int, api: str = "multiar", slots: int = 16
) -> dict[str, Any]:
    """requests arriving as a Poisson process of rate req/s, each NEW_TOKENS tokens; with how many were
    in flight when each was sent (what tells a slot wait from a slow step in the TTFT tail)."""
    rng = random.Random(seed)
    tasks = []
    async with client(requests) as http:
        t0 = time.perf_counter()
        for i in range(requests):
            tasks.append(asyncio.create_task(send(http, url, body(seed * 10_000 + i, NEW_TOKENS), api)))
            await asyncio.sleep(rng.expovariate(rate))
        outcomes = await asyncio.gather(*tasks)
        seconds = time.perf_counter() - t0
    ok = [o for o in outcomes if o.status == "ok"]
    rejected = sum(o.status == "rejected" for o in outcomes)  # 429 when the queue is full: pushback, not loss
    tokens = sum(o.tokens for o in ok)
    return {"rate_req_s": round(rate, 3), "requests": requests, "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1), "rejected_429": rejected,
            "lost": requests - len(ok) - rejected, **latency(ok), **arrivals(ok, slots)}  # fmt: skip


def arrivals(outcomes: list[Outcome], slots: int) -> dict[str, Any]:
    """How many requests were in flight (sent, last token not yet in) when each was sent: the mean, the
    most, the share of arrivals that found every slot taken, and the in-flight count at the arrival of
    the slowest-to-first-token 1%; and from the server's own timings of each request (multiar's final
    event): the share that waited in its queue longer than 1.5 steps (a slot wait, or a step held up),
    the wait of those, and the slowest 1%'s TTFT split into planning, queue, engine (admitted to first
    token drawn) and the rest (HTTP both ways)."""
    timed = [o for o in outcomes if o.last is not None and o.ttft is not None]
    if not timed:
        return {}
    found = [sum(1 for q in timed if q is not o and q.start <= o.start < q.last) for o in timed]
    tail = sorted(zip((o.ttft for o in timed), found, timed, strict=True), key=lambda t: t[0], reverse=True)
    tail = tail[: max(1, len(timed) // 100)]
    out = {"in_flight_at_arrival_mean": round(statistics.mean(found), 1),
           "in_flight_at_arrival_max": max(found),
           "arrivals_with_every_slot_taken": round(sum(k >= slots for k in found) / len(found), 3),
           "in_flight_at_slowest_1pct_arrivals": [k for _, k, _ in tail]}  # fmt: skip
    server = [o.server for o in timed if o.server and o.server.get("queue_s") is not None]
    tpot = [t for o in timed if (t := o.tpot) is not None]
    if server and tpot:
        # a request waits for the step running when it came anyway: past 1.5 steps it waited for a slot,
        # or for a step held up (a long prompt chunk, the GIL)
        step = statistics.median(tpot)
        waited = [t["queue_s"] for t in server if t["queue_s"] > 1.5 * step]
        out["server_queued_past_1_5_steps"] = round(len(waited) / len(server), 3)
        out["server_queue_ms_of_those_median"] = (
            round(1000 * statistics.median(waited), 1) if waited else None
        )
        out["slowest_1pct_ttft_split_ms"] = [
            split(o) for _, _, o in tail if o.server and o.server.get("first_token_s") is not None
        ]
    return out


def split(o: Outcome) -> dict[str, float]:
    """A request's TTFT (client) in the server's parts, ms: plan, queue, engine (slot to first token),
    other (the body's way in, the first event's way out)."""
    t = o.server or {}
    plan, queue, first = t.get("plan_s") or 0.0, t.get("queue_s") or 0.0, t.get("first_token_s") or 0.0
    ttft = o.ttft or 0.0
    return {"ttft": round(1000 * ttft, 1), "plan": round(1000 * plan, 1), "queue": round(1000 * queue, 1),
            "engine": round(1000 * (first - plan - queue), 1), "other": round(1000 * (ttft - first), 1)}  # fmt: skip


async def metric(url: str, name: str) -> float:
    return (await metric_values(url, [name]))[0]


async def metric_values(url: str, names: list[str]) -> list[float]:
    """The values of these /metrics lines (one model's), from one read of the page; NaN where absent."""
    async with httpx.AsyncClient(timeout=10) as http:
        text = (await http.get(f"{url}/metrics")).text
    found = [re.search(rf"^{name}{{[^}}]*}} (\S+)$", text, re.M) for name in names]
    return [float(f.group(1)) if f else float("nan") for f in found]


STEP_ROWS = ("multiar_steps_total", "multiar_step_rows_computed_total", "multiar_step_rows_decoding_total")


def step_rows(url: str, api: str) -> list[float] | None:
    """multiar's step counters (steps, rows computed, rows decoding), None for another server."""
    return asyncio.run(metric_values(url, list(STEP_ROWS))) if api == "multiar" else None


def step_rows_between(before: list[float] | None, after: list[float] | None) -> dict[str, float]:
    """Per step over a round: rows the forward computed and rows decoding (a gap between busy slots is
    computed too)."""
    if not before or not after or after[0] <= before[0]:
        return {}
    steps, computed, decoding = (a - b for a, b in zip(after, before, strict=True))
    return {"steps": int(steps), "rows_computed_per_step": round(computed / steps, 2),
            "rows_decoding_per_step": round(decoding / steps, 2)}  # fmt: skip


@dataclass
class SoakResult:
    requests: int = 0
    ok: int = 0
    cancelled: int = 0
    rejected: int = 0
    lost: int = 0
    lost_details: list[str] = field(default_factory=list)
    busy_slots_after: float = float("nan")
    queue_after: float = float("nan")
    rss_kib: list[tuple[int, int]] = field(default_factory=list)  # (requests done, VmRSS KiB)
    seconds: float = 0.0


async def soak(server: Server, requests: int, concurrency: int = 24, cancel_share: float = 0.2,
               seed: int = 7, warmup: int | None = None) -> dict[str, Any]:  # fmt: skip
    """requests of 8-48 tokens from `concurrency` clients, cancel_share of them cancelled mid-stream;
    VmRSS sampled every requests/20 from the end of warm-up (requests/10, at least 20)."""
    rng = random.Random(seed)
    plan = [(rng.randint(8, 48), rng.random() < cancel_share) for _ in range(requests)]
    res, done, t0 = SoakResult(requests=requests), 0, time.perf_counter()
    warmup = warmup if warmup is not None else max(20, requests // 10)
    every = max(1, requests // 20)
    work = iter(range(requests))

    async def worker(http: httpx.AsyncClient) -> None:
        nonlocal done
        for i in work:
            new, cancel = plan[i]
            o = await stream_request(
                http, server.url, body(seed * 100_000 + i, new), new // 2 if cancel else None
            )
            setattr(res, o.status, getattr(res, o.status) + 1)
            if o.status == "lost" and len(res.lost_details) < 5:
                res.lost_details.append(o.detail)
            done += 1
            if done >= warmup and (done - warmup) % every == 0:
                res.rss_kib.append((done, server.rss_kib()))

    async with client(concurrency) as http:
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
    res.seconds = round(time.perf_counter() - t0, 1)
    for _ in range(100):  # the slots of cancelled requests free within a step; bounded wait
        res.busy_slots_after = await metric(server.url, "multiar_busy_slots")
        if res.busy_slots_after == 0:
            break
        await asyncio.sleep(0.05)
    res.queue_after = await metric(server.url, "multiar_queue_length")
    res.rss_kib.append((done, server.rss_kib()))
    return soak_summary(res)


def soak_summary(res: SoakResult) -> dict[str, Any]:
    first, last = res.rss_kib[0][1], res.rss_kib[-1][1]
    peak = max(r for _, r in res.rss_kib)
    return {"requests": res.requests, "ok": res.ok, "cancelled": res.cancelled, "rejected_429": res.rejected,
            "lost": res.lost, "lost_details": res.lost_details, "busy_slots_after": res.busy_slots_after,
            "queue_after": res.queue_after, "seconds": res.seconds,
            "rss_mib_after_warmup": round(first / 1024, 1), "rss_mib_end": round(last / 1024, 1),
            "rss_mib_peak": round(peak / 1024, 1), "rss_growth_pct": round(100 * (last - first) / first, 2),
            "rss_samples": res.rss_kib}  # fmt: skip


def measure(run: Path, slots: int, args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    """Closed loop, then open loop at fractions of the closed loop's request rate (and the soak when
    asked) on one `multiar serve slots=...` subprocess."""
    server = start_server(run, slots, log_dir, f"max_queue={args.max_queue}", *args.serve_args)
    return loads(server, {"slots": slots, "dtype": server.dtype}, slots, args, "multiar")


def measure_llama(
    binary: Path, run: Path, slots: int, args: argparse.Namespace, log_dir: Path
) -> dict[str, Any]:
    """The same closed and open loops on llama.cpp's server, the run's weights exported as f32 GGUF."""
    gguf = log_dir / f"serve_load_{os.getpid()}.gguf"
    gguf.unlink(missing_ok=True)
    exe = Path(sys.executable).parent / "multiar"
    subprocess.run(
        [str(exe), "export", f"run={run}", "format=gguf", f"out={gguf}", "gguf_type=f32"], check=True
    )
    try:
        server = start_llama_server(binary, gguf, slots, log_dir)
        version = subprocess.run([str(binary), "--version"], capture_output=True, text=True)
        found = re.search(r"version: (.+)", version.stdout + version.stderr)
        head = {"server": "llama-server", "version": found.group(1) if found else "?", "slots": slots,
                "dtype": "f32 (GGUF)", "threads": os.cpu_count()}  # fmt: skip
        return loads(server, head, slots, args, "llama")
    finally:
        gguf.unlink(missing_ok=True)


def alternate(
    binary: Path, run: Path, rounds: int, args: argparse.Namespace, log_dir: Path
) -> dict[str, Any]:
    """(a) `multiar serve slots=16` and (c) llama-server --parallel 16, both up, their closed loops
    alternated `rounds` times (who goes first alternates too): this VM's speed drifts ~30% between
    minutes, so one run of each, minutes apart, says little; the ratio of the medians is the figure."""
    gguf = log_dir / f"serve_load_{os.getpid()}.gguf"
    gguf.unlink(missing_ok=True)
    exe = Path(sys.executable).parent / "multiar"
    subprocess.run(
        [str(exe), "export", f"run={run}", "format=gguf", f"out={gguf}", "gguf_type=f32"], check=True
    )
    servers: dict[str, Server] = {}
    rates: dict[str, list[float]] = {"multiar_slots16": [], "llama_server": []}
    if args.also_args:
        rates["multiar_slots16_also"] = []
    lost = 0
    try:
        servers["multiar_slots16"] = start_server(
            run, 16, log_dir, f"max_queue={args.max_queue}", *args.serve_args
        )
        if args.also_args:  # a second multiar server, its keys changed: an A/B in the same rounds
            servers["multiar_slots16_also"] = start_server(
                run, 16, log_dir, f"max_queue={args.max_queue}", *args.serve_args, *args.also_args
            )
        servers["llama_server"] = start_llama_server(binary, gguf, args.llama_slots, log_dir)
        for r in range(rounds):
            order = list(rates) if r % 2 == 0 else list(reversed(rates))
            for name in order:
                api = "llama" if name == "llama_server" else "multiar"
                row = asyncio.run(closed_loop(servers[name].url, 16, args.per_client, api))
                rates[name].append(row["tokens_per_s"])
                lost += row["lost"]
                print(f"round {r}: {name} {row['tokens_per_s']} tokens/s", flush=True)
    finally:
        for server in servers.values():
            stop_server(server)
        gguf.unlink(missing_ok=True)
    medians = {k: round(statistics.median(v), 1) for k, v in rates.items()}
    out = {"rounds": rounds, "per_client": args.per_client, "tokens_per_s": rates, "median": medians,
           "lost": lost, "multiar_dtype": servers["multiar_slots16"].dtype,
           "ratio_a_over_c": round(medians["multiar_slots16"] / medians["llama_server"], 3)}  # fmt: skip
    if args.also_args:
        out["also_args"], out["also_dtype"] = args.also_args, servers["multiar_slots16_also"].dtype
        out["ratio_also_over_c"] = round(medians["multiar_slots16_also"] / medians["llama_server"], 3)
    return out


def start_llama_server(
    binary: Path, gguf: Path, slots: int, log_dir: Path, ready_s: float = READY_S
) -> Server:
    """llama-server on a free loopback port, `--parallel slots` with a context of the model's length per
    slot, all cores, no web UI; once /health says ok."""
    import gguf as gguf_lib

    context = int(gguf_lib.GGUFReader(str(gguf)).fields["llama.context_length"].contents())
    port = free_port()
    log = log_dir / f"llama_server_{slots}_{port}.log"
    threads = str(os.cpu_count())
    cmd = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "--parallel", str(slots),
           "--ctx-size", str(slots * context), "--no-kv-unified", "--threads", threads, "--threads-batch", threads,
           "--no-webui", "--cache-ram", "0"]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    return wait_ready(Server(proc, f"http://127.0.0.1:{port}", log, "f32"), "llama-server", ready_s)


def loads(
    server: Server, out: dict[str, Any], slots: int, args: argparse.Namespace, api: str
) -> dict[str, Any]:
    name = "llama-server" if api == "llama" else f"slots={slots}"
    try:
        cpu0 = server.cpu_seconds()
        if "closed" in args.only:
            out["closed_loop"] = asyncio.run(closed_loop(server.url, 16, args.per_client, api))
            print(f"{name} closed: {out['closed_loop']}", flush=True)
        if "open" in args.only and "closed_loop" in out:
            capacity = out["closed_loop"]["tokens_per_s"] / NEW_TOKENS  # requests/s the closed loop served
            out["open_loop"] = []
            for k, share in enumerate(args.shares if slots > 1 else args.shares_one):
                extra: dict[str, Any] = {}
                if args.recalibrate and k > 0:
                    # this VM's speed drifts by tens of percent within minutes: a rate set from the first
                    # closed loop can be 0.8 of what the server does now; measured again right before
                    again = asyncio.run(closed_loop(server.url, 16, args.per_client, api))
                    capacity = again["tokens_per_s"] / NEW_TOKENS
                    extra["closed_loop_before"] = again
                n = max(args.min_open, round(share * capacity * args.open_seconds))
                if share == 0.5:  # the rate the TTFT target is judged at: enough requests for a p99
                    n = max(n, args.half_requests)
                steal0, rows0 = steal_seconds(), step_rows(server.url, api)
                row = asyncio.run(open_loop(server.url, share * capacity, n, 100 + k, api, slots))
                row["cpu_steal_s"] = round(steal_seconds() - steal0, 2)
                row |= step_rows_between(rows0, step_rows(server.url, api))
                out["open_loop"].append({"share_of_closed_rate": share, **extra, **row})
                print(f"{name} open {share}: {row}", flush=True)
            if args.recalibrate:  # the server's speed after the last round, to see the drift within it
                out["closed_loop_after"] = asyncio.run(closed_loop(server.url, 16, args.per_client, api))
        if "soak" in args.only and slots > 1 and api == "multiar":
            out["soak"] = asyncio.run(soak(server, args.soak))
            print(f"{name} soak: { {k: v for k, v in out['soak'].items() if k != 'rss_samples'} }")
        out["server_cpu_s"] = round(server.cpu_seconds() - cpu0, 1)
    finally:
        out["exit_code_after_sigterm"] = stop_server(server)
    return out


async def beside_rows(
    url: str, code: Callable[[int, bool], dict[str, Any]], rounds: int
) -> list[dict[str, float]]:
    """15 plain rows decoding all along (each client back to back) while a 16th row runs alone in turn:
    none (a pause as long as the last 16th row took), plain, constrained, `rounds` times. Per turn: the
    plain rows' tokens/s over its span (their token events by time), the check CPU seconds the server
    counted meanwhile, and the 16th row's own tokens/s. Adjacent turns are seconds apart, so the
    machine's drifting speed (this VM's moves 20-30% over minutes) is nearly the same in each."""
    plain: list[tuple[float, int]] = []
    stop = asyncio.Event()

    async def plain_client(k: int, http: httpx.AsyncClient) -> None:
        i = 0
        while not stop.is_set():
            await stream_request(http, url, code(1000 * k + i, False), trace=plain)
            i += 1

    def rate(t0: float, t1: float) -> float:
        return sum(n for t, n in plain if t0 < t <= t1) / (t1 - t0)

    turns: list[dict[str, float]] = []
    async with client(16) as http:
        clients = [asyncio.create_task(plain_client(k, http)) for k in range(15)]
        await asyncio.sleep(3.0)  # every plain row running, past its prefill
        span = 2.0
        for r in range(rounds):
            for kind in ("none", "plain", "constrained"):
                before = await asyncio.to_thread(check_seconds, url)
                held = await asyncio.to_thread(check_seconds, url, "wall")
                t0 = time.perf_counter()
                if kind == "none":
                    await asyncio.sleep(span)
                    row = Outcome(tokens=0)
                else:
                    row = await stream_request(http, url, code(99 + r, kind == "constrained"))
                t1 = time.perf_counter()
                cpu = await asyncio.to_thread(check_seconds, url) - before
                wall = await asyncio.to_thread(check_seconds, url, "wall") - held
                span = t1 - t0
                own = (
                    (row.tokens - 1) / (row.last - row.first)
                    if row.tokens > 1 and row.last and row.first
                    else 0.0
                )
                turns.append({"kind": kind, "plain_tps": rate(t0, t1), "seconds": span, "check_cpu_s": cpu,
                              "check_wall_s": wall, "row_tps": own})  # fmt: skip
        stop.set()
        await asyncio.gather(*clients)
    return turns


def constrained_cost(
    run: Path, log_dir: Path, *extra: str, rounds: int = 8, tokens: int = 2 * NEW_TOKENS
) -> dict[str, Any]:
    """Tokens/s of 15 plain rows alone, beside a 16th plain row and beside a 16th grammar-constrained one
    (a code run, slots=16, `tokens` new tokens a request), interleaved turns (`beside_rows`); medians of
    each kind, the drops paired within a round, and the constrained row's own cost: its checks' CPU
    seconds over its turn's span, as a share of one core (the share of the step's critical path it
    takes where the forward's threads fill every core) and of all the machine's cores."""
    server = start_server(run, 16, log_dir, *extra)
    prompts = ["def f(x):\n", "import os\n", "class A:\n", "x = [", "for i in range(3):\n"]

    def code(k: int, constrain: bool) -> dict[str, Any]:
        return {"prompt": prompts[k % len(prompts)], "max_new_tokens": tokens, "min_new_tokens": tokens,
                "seed": k, "temperature": 1.0, "stream": True, "files": False, "constrain": constrain}  # fmt: skip

    try:
        turns = asyncio.run(beside_rows(server.url, code, rounds))
    finally:
        stop_server(server)
    kinds = {k: [t for t in turns if t["kind"] == k] for k in ("none", "plain", "constrained")}
    names = {
        "none": "plain_15",
        "plain": "plain_15_beside_1_plain",
        "constrained": "plain_15_beside_1_constrained",
    }
    out: dict[str, Any] = {
        names[k]: round(statistics.median(t["plain_tps"] for t in v), 1) for k, v in kinds.items()
    }
    out["constrained_row_tokens_per_s"] = round(
        statistics.median(t["row_tps"] for t in kinds["constrained"]), 1
    )
    out["rounds"], out["new_tokens"], out["serve_args"] = rounds, tokens, list(extra)
    out["per_round"] = {names[k]: [round(t["plain_tps"], 1) for t in v] for k, v in kinds.items()}
    own = [t["check_cpu_s"] / t["seconds"] for t in kinds["constrained"]]
    out["check_cpu_share_of_one_core"] = round(statistics.median(own), 3)
    out["check_cpu_share"] = round(statistics.median(own) / len(os.sched_getaffinity(0)), 3)
    # what the checks held the engine thread for (inline: running them, wait: waiting; overlap: 0)
    out["check_wall_share"] = round(
        statistics.median(t["check_wall_s"] / t["seconds"] for t in kinds["constrained"]), 3
    )
    rounds = zip(kinds["none"], kinds["plain"], kinds["constrained"], strict=True)
    drops = [(1 - c["plain_tps"] / a["plain_tps"], 1 - c["plain_tps"] / p["plain_tps"],
              1 - p["plain_tps"] / a["plain_tps"]) for a, p, c in rounds]  # fmt: skip
    out["plain_drop"] = round(statistics.median(d[0] for d in drops), 3)
    # the grammar's part of it: beside the constrained row against beside the same row unconstrained
    out["plain_drop_vs_plain_16th"] = round(statistics.median(d[1] for d in drops), 3)
    out["plain_drop_vs_plain_16th_per_round"] = [round(d[1], 3) for d in drops]
    out["plain_drop_of_a_plain_16th"] = round(statistics.median(d[2] for d in drops), 3)
    return out


def check_seconds(url: str, kind: str = "cpu") -> float:
    """The server's multiar_check_<kind>_seconds_total (/metrics; cpu or wall), all models."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    prefix = f"multiar_check_{kind}_seconds_total{{"
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def bf16_batch_drift(run: Path, log_dir: Path, rows: int = 16) -> dict[str, Any]:
    """dtype=bf16, greedy: each of `rows` prompts alone (batch of 1) and all together; how many requests
    (and tokens) differ, and where the first difference falls."""
    server = start_server(run, rows, log_dir, "dtype=bf16")

    def greedy(k: int) -> dict[str, Any]:
        return body(k, NEW_TOKENS) | {"temperature": 0.0, "stream": False}

    async def ids(bodies: list[dict[str, Any]]) -> list[list[int]]:
        async with client(len(bodies)) as http:
            rs = await asyncio.gather(*(http.post(f"{server.url}/v1/generate", json=b) for b in bodies))
        return [[*r.json()["samples"][0]["text"]] for r in rs]

    try:
        alone = [asyncio.run(ids([greedy(k)]))[0] for k in range(rows)]
        together = asyncio.run(ids([greedy(k) for k in range(rows)]))
    finally:
        stop_server(server)
    firsts = [next((i for i, (a, b) in enumerate(zip(x, y, strict=False)) if a != b), None)
              for x, y in zip(alone, together, strict=True)]  # fmt: skip
    differing = sum(a != b for x, y in zip(alone, together, strict=True) for a, b in zip(x, y, strict=False))
    return {"dtype": server.dtype, "requests": rows, "requests_that_differ": sum(f is not None for f in firsts),
            "first_difference_at": [f for f in firsts if f is not None],
            "tokens_that_differ": differing, "tokens": sum(len(x) for x in alone),
            "note": "greedy, text positions compared (protein: one letter per token, prompt included)"}  # fmt: skip


def steal_seconds() -> float:
    """CPU time the hypervisor took from this VM's cores so far (/proc/stat's steal column), 0 where absent."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def machine() -> dict[str, Any]:
    from multiar.engine.precision import cpu_model  # imports torch: not at the load generator's start

    threads = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY") if k in os.environ}
    return {"cpu": cpu_model(), "cores": os.cpu_count(),
            "loadavg_at_start": os.getloadavg(), "server_env": threads or "torch's default threads",
            "note": "the load generator (one asyncio process) and the server share these cores; anything "
                    "else running shows in the load averages"}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("--slots", type=int, nargs="*", default=[16, 1])
    p.add_argument("--only", nargs="+", default=["closed", "open", "soak"])
    p.add_argument("--per-client", type=int, default=2, help="closed loop: requests per client")
    p.add_argument("--shares", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0, 1.25])
    p.add_argument("--shares-one", type=float, nargs="+", default=[0.5, 1.0])
    p.add_argument("--open-seconds", type=float, default=20.0, help="open loop: about this long per rate")
    p.add_argument("--min-open", type=int, default=12)
    p.add_argument(
        "--half-requests",
        type=int,
        default=600,
        help="requests at least at share 0.5: a p99 of ~170 is their second largest, of 600 their sixth",
    )
    p.add_argument(
        "--recalibrate",
        action="store_true",
        help="a closed loop before each open-loop round after the first (its rate sets that round's), one after the last",
    )
    p.add_argument("--soak", type=int, default=2000)
    p.add_argument("--max-queue", type=int, default=64)
    p.add_argument("--json", type=Path)
    p.add_argument(
        "--serve-args", nargs="*", default=[], help="more multiar serve keys, e.g. stream_interval=0"
    )
    p.add_argument(
        "--code-run", type=Path, help="a code run: 15 plain rows with and without a constrained one"
    )
    p.add_argument("--rounds", type=int, default=12, help="--code-run: rounds of the interleaved turns")
    p.add_argument("--llama-server", type=Path, help="llama.cpp's llama-server binary: measured as (c)")
    p.add_argument("--llama-slots", type=int, default=16, help="llama-server --parallel")
    p.add_argument(
        "--also-args",
        nargs="*",
        default=[],
        help="with --alternate: a second multiar server with these keys too, in the same rounds",
    )
    p.add_argument("--bf16", action="store_true", help="tokens that differ between batch sizes in bf16")
    p.add_argument(
        "--alternate",
        type=int,
        default=0,
        help="with --llama-server: only closed loops of (a) and (c), alternated this many rounds",
    )
    args = p.parse_args(argv)
    log_dir = Path(os.environ.get("TMPDIR", "/tmp"))
    result: dict[str, Any] = {"run": str(args.run), "new_tokens": NEW_TOKENS, "machine": machine()}
    result["serve_args"] = args.serve_args
    if args.alternate:
        if args.llama_server is None:
            p.error("--alternate needs --llama-server")
        result["alternated"] = alternate(args.llama_server, args.run, args.alternate, args, log_dir)
        args.slots, args.llama_server = [], None
    result["configs"] = [measure(args.run, s, args, log_dir) for s in args.slots]
    if args.llama_server is not None:
        result["llama_cpp_server"] = measure_llama(
            args.llama_server, args.run, args.llama_slots, args, log_dir
        )
    else:
        result["llama_cpp_server"] = "not measured (no --llama-server binary given)"
    if args.code_run is not None:
        result["constrained_row"] = constrained_cost(
            args.code_run, log_dir, *args.serve_args, rounds=args.rounds
        )
        print(f"constrained: {result['constrained_row']}", flush=True)
    if args.bf16:
        result["bf16_batch_drift"] = bf16_batch_drift(args.run, log_dir)
        print(f"bf16: {result['bf16_batch_drift']}", flush=True)
    result["machine"]["loadavg_at_end"] = os.getloadavg()
    text = json.dumps(result, indent=1)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
