"""`multiar serve` as a real subprocess under load (benchmarks/serve_load.py's client): a short soak with
cancellations mixed in loses nothing, leaks no slot and leaves the server's memory flat; SIGTERM drains
(the running request finishes, new ones get 503, the process exits). The slow tier soaks 200 requests."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import copy_fixture_run

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from serve_load import Outcome, Server, arrivals, soak, start_server, stop_server  # noqa: E402


@pytest.fixture
def server(tmp_path):
    run = copy_fixture_run(tmp_path)
    s = start_server(
        run,
        4,
        tmp_path,
        "dtype=fp32",
        "step=eager",
        "attention=sdpa",
        "max_queue=16",
        "drain_timeout=20",
        ready_s=180,  # its start imports torch and loads the model in a fresh process
    )
    yield s
    stop_server(s, timeout=20)


def long_stream(s: Server, seen: threading.Event, out: dict) -> None:
    body = {"prompt": "MK", "max_new_tokens": 1000, "min_new_tokens": 1000, "stream": True, "files": False}
    with httpx.stream("POST", f"{s.url}/v1/generate", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                seen.set()
                if "samples" in event:
                    out["new_tokens"] = event["samples"][0]["new_tokens"]
                    out["end"] = event["samples"][0]["end"]


def test_short_soak_then_sigterm_drains(server):
    result = asyncio.run(soak(server, 30, concurrency=8, cancel_share=0.3, warmup=10))
    assert result["lost"] == 0 and result["rejected_429"] == 0, result["lost_details"]
    assert result["cancelled"] > 0 and result["ok"] + result["cancelled"] == 30
    assert result["busy_slots_after"] == 0 and result["queue_after"] == 0
    assert result["rss_growth_pct"] <= 25  # the benchmark's 2,000-request soak holds it to 5%
    seen, out = threading.Event(), {}
    client = threading.Thread(target=long_stream, args=(server, seen, out), daemon=True)
    client.start()
    assert seen.wait(30)
    server.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    status = None
    while time.monotonic() < deadline and status != 503:
        status = httpx.post(f"{server.url}/v1/generate", json={"prompt": "M", "files": False}).status_code
    assert status == 503
    assert httpx.get(f"{server.url}/health").json()["status"] == "draining"
    client.join(30)
    assert out == {"new_tokens": 1000, "end": "length"}
    server.proc.wait(20)  # exits once drained (uvicorn re-raises SIGTERM after its shutdown)
    assert server.proc.returncode is not None


@pytest.mark.slow
def test_soak_of_200_requests_with_cancellations(server):
    result = asyncio.run(soak(server, 200, concurrency=12, cancel_share=0.2))
    assert result["lost"] == 0 and result["rejected_429"] == 0, result["lost_details"]
    assert result["busy_slots_after"] == 0 and result["queue_after"] == 0
    assert result["rss_growth_pct"] <= 10


def test_open_loop_counts_the_requests_in_flight_at_each_arrival():
    """serve_load's open loop says how many requests each arrival found in flight (sent, last token not
    in): the slow tail's arrivals that found every slot taken waited for a slot, not for a slow step."""

    def sent(start: float, ttft: float, last: float) -> Outcome:
        return Outcome(status="ok", tokens=2, start=start, first=start + ttft, last=last)

    # two slots: the third request arrives while both earlier ones run, the fourth after they ended
    outcomes = [sent(0.0, 0.01, 1.0), sent(0.1, 0.01, 1.1), sent(0.2, 0.9, 2.0), sent(3.0, 0.01, 3.5)]
    got = arrivals(outcomes, slots=2)
    assert got["in_flight_at_arrival_max"] == 2
    assert got["in_flight_at_arrival_mean"] == round((0 + 1 + 2 + 0) / 4, 1)
    assert got["arrivals_with_every_slot_taken"] == 0.25
    assert got["in_flight_at_slowest_1pct_arrivals"] == [2]  # the slowest to its first token waited


def test_open_loop_splits_the_slowest_first_tokens_by_the_servers_timings():
    """From the server's timings of each request (its final event): the share queued longer than 1.5
    steps (the median TPOT), and the slowest 1%'s TTFT as plan, queue, engine and HTTP (the rest)."""

    def sent(start: float, ttft: float, queue: float) -> Outcome:
        timings = {"plan_s": 0.002, "queue_s": queue, "first_token_s": 0.002 + queue + 0.01, "total_s": 1.0}
        return Outcome(status="ok", tokens=11, start=start, first=start + ttft, last=start + ttft + 0.1,
                       server=timings)  # fmt: skip

    outcomes = [sent(k * 0.5, 0.02, 0.005) for k in range(9)] + [sent(5.0, 0.2, 0.17)]
    got = arrivals(outcomes, slots=4)
    assert got["server_queued_past_1_5_steps"] == 0.1  # a step: 10 ms; 5 ms queued is one step's wait
    assert got["server_queue_ms_of_those_median"] == 170.0
    assert got["slowest_1pct_ttft_split_ms"] == [
        {"ttft": 200.0, "plan": 2.0, "queue": 170.0, "engine": 10.0, "other": 18.0}
    ]
