"""`multiar serve`'s HTTP API on a tiny protein run (fp32): greedy /v1/generate equals `multiar
generate`, SSE streams end with the sample and [DONE], OpenAI completions, files by opaque id, metrics,
JSON errors (429 when full, 401 without the key, 413, 404, 422), a non-loopback host without a key
refused, a client that leaves frees its slot, and fuzzed bodies never get a 500."""

from __future__ import annotations

import json
import re
import socket
import threading
import time

import httpx
import pytest
import torch
from conftest import TINY, proteome_subset, serve_on_loopback
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from multiar.cli import main
from multiar.commands.generate import sample_to_files
from multiar.commands.serve import build_state
from multiar.commands.serve_api import Files
from multiar.commands.serve_engine import Job, SampleSpec
from multiar.config import load_config
from multiar.engine.rows import RowSettings
from multiar.engine.sampling import Sampler
from multiar.training.run import train


@pytest.fixture(scope="module")
def protein_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    data = proteome_subset(tmp / "data", per_file=20)
    overrides = [*TINY, "domain=protein", f"data.paths=[{data}]", "data.tags=header:OX",
                 f"run_dir={tmp / 'protein'}", "trainer.max_steps=2", "trainer.val_check_interval=2"]  # fmt: skip
    train(load_config("train", overrides))
    return tmp / "protein"


def serve_config(run, tmp, *extra):
    # the rows' attention and the step pinned like the dtype: measuring and compiling them costs each server
    # seconds (a captured step a minute), and the compiled ways have tests of their own
    # (engine/test_rows_attention, engine/test_captured_step, commands/test_serve_engine, test_serve_step)
    keys = [f"runs=[{run}]", "dtype=fp32", "attention=sdpa", "step=eager", "slots=4", f"files_dir={tmp}"]
    return load_config("serve", [*keys, *extra])


@pytest.fixture(scope="module")
def app(protein_run, tmp_path_factory):
    state, app = build_state(serve_config(protein_run, tmp_path_factory.mktemp("files"), "max_queue=2"))
    with TestClient(app) as client:
        yield state, client
    for s in state.models.values():
        s.engine.stop()


def test_greedy_generate_equals_the_generate_command(app, protein_run, tmp_path):
    _, client = app
    body = {"model": "protein", "prompt": "MKT", "n": 2, "max_new_tokens": 20, "temperature": 0.0, "seed": 3}
    r = client.post("/v1/generate", json=body)
    assert r.status_code == 200, r.text
    got = r.json()
    cli = load_config("generate", [f"run={protein_run}", f"out={tmp_path}", "dtype=fp32", "prompt=MKT", "n=2",
                                   "max_new_tokens=20", "temperature=0", "seed=3", "progress=false"])  # fmt: skip
    sample_to_files(cli)
    want = [
        line for line in (tmp_path / "samples.fasta").read_text().splitlines() if not line.startswith(">")
    ]
    assert [s["text"] for s in got["samples"]] == want
    assert all("ppl" in s and "end" in s for s in got["samples"])
    names = {f["name"] for f in got["files"]}
    assert {"samples.fasta", "samples.csv"} <= names
    link = next(f["url"] for f in got["files"] if f["name"] == "samples.fasta")
    assert client.get(link).text.splitlines()[1] == want[0]
    assert client.get("/v1/files/not-an-id").status_code == 404


def test_sse_stream_and_completions(app):
    _, client = app
    with client.stream("POST", "/v1/generate", json={"prompt": "MK", "max_new_tokens": 8, "min_new_tokens": 8,
                                                     "stream": True, "files": False}) as r:  # fmt: skip
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    final = json.loads(events[-2])
    assert len(final["samples"][0]["text"]) == 2 + 8
    t = final["timings"]
    assert 0 <= t["plan_s"] <= t["plan_s"] + t["queue_s"] <= t["first_token_s"] <= t["total_s"], t
    assert sum(len(json.loads(e)["ids"]) for e in events[:-2]) == 8
    r = client.post("/v1/completions", json={"model": "protein", "prompt": "MK", "max_tokens": 5, "min_tokens": 5,
                                             "n": 2, "seed": 1})  # fmt: skip
    assert r.status_code == 200, r.text
    out = r.json()
    assert [len(c["text"]) for c in out["choices"]] == [5, 5] and out["usage"]["completion_tokens"] == 10
    with client.stream("POST", "/v1/completions", json={"prompt": "MK", "max_tokens": 4, "ignore_eos": True,
                                                        "stream": True}) as r:  # fmt: skip
        chunks = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert chunks[-1] == "[DONE]"
    assert "".join(c["text"] for e in chunks[:-1] for c in json.loads(e)["choices"]) and len(chunks) >= 4
    assert client.get("/v1/models").json()["data"][0]["id"] == "protein"
    assert client.get("/health").json()["status"] == "ready"
    metrics = client.get("/metrics").text
    assert 'multiar_busy_slots{model="protein"} 0' in metrics and "multiar_ttft_seconds_bucket" in metrics
    counters = {
        name: float(re.search(rf'^{name}{{model="protein"}} (\S+)$', metrics, re.M).group(1))
        for name in (
            "multiar_steps_total",
            "multiar_step_rows_computed_total",
            "multiar_step_rows_decoding_total",
            "multiar_gc_seconds_total",
        )
    }
    # rows were decoded, and a step computed at least the rows decoding in it
    assert 0 < counters["multiar_step_rows_decoding_total"] <= counters["multiar_step_rows_computed_total"]
    assert counters["multiar_steps_total"] > 0


def test_unseeded_requests_draw_fresh_seeds_and_report_them(app):
    _, client = app
    body = {"prompt": "MK", "max_new_tokens": 24, "min_new_tokens": 24, "temperature": 1.0, "files": False}
    first, second = (client.post("/v1/generate", json=body).json() for _ in range(2))
    assert first["seed"] != second["seed"]
    assert first["samples"][0]["text"] != second["samples"][0]["text"]
    again = client.post("/v1/generate", json=body | {"seed": first["seed"]}).json()
    assert again["seed"] == first["seed"] and again["samples"] == first["samples"]
    body = {"prompt": "MK", "max_tokens": 24, "min_tokens": 24, "temperature": 1.0}
    one, two = (client.post("/v1/completions", json=body).json() for _ in range(2))
    assert one["seed"] != two["seed"] and one["choices"][0]["text"] != two["choices"][0]["text"]
    again = client.post("/v1/completions", json=body | {"seed": one["seed"]}).json()
    assert again["choices"] == one["choices"]


def test_errors_are_json(app):
    state, client = app
    for body, status in (
        ({"model": "nope"}, 404),
        ({"prompt": "MK", "out": "/etc"}, 422),
        ({"prompt": "MK", "temperature": "hot"}, 422),
        ({"prompt": "MK", "n": 1000}, 422),
        ({"prompt_file": "/etc/passwd"}, 422),
        ({"prompt": "MK", "filters": {"workers": 4}}, 422),  # no processes forked from the server
        ({"prompt": "MK", "filters": {"candidates": 3}}, 422),  # the shared novelty index's is the server's
    ):
        r = client.post("/v1/generate", json=body)
        assert r.status_code == status, (body, r.text)
        assert set(r.json()["error"]) == {"message", "type"}
    same = {"prompt": "MK", "max_new_tokens": 4, "files": False, "filters": {"workers": 1, "candidates": 8}}
    assert client.post("/v1/generate", json=same).status_code == 200
    assert client.post("/v1/generate", content=b"{not json").status_code == 400
    assert client.post("/v1/generate", content=b"x" * (state.max_body_bytes + 1)).status_code == 413
    assert client.get("/nowhere").json()["error"]["type"]


def listed(folder):
    return set(folder.iterdir()) if folder.exists() else set()


def test_request_folders_go_unless_linked_and_with_their_last_link(app, tmp_path):
    state, client = app
    files_dir = state.models["protein"].files_dir
    before = listed(files_dir)
    r = client.post("/v1/generate", json={"prompt": "MK", "max_new_tokens": 4, "files": False})
    assert r.status_code == 200 and r.json()["files"] == []
    r = client.post("/v1/completions", json={"prompt": "MK", "max_tokens": 4})
    assert r.status_code == 200
    assert listed(files_dir) == before
    kept = Files(keep=3)
    folders = [tmp_path / name for name in "abc"]
    for folder in folders:
        folder.mkdir()
    paths = [folders[0] / "x", folders[0] / "y", folders[1] / "x", folders[2] / "x"]
    for path in paths:
        path.write_text("data")
    keys = [kept.add(path, path.parent) for path in paths[:3]]
    assert all(f.exists() for f in folders) and kept.get(keys[0]) == paths[0]
    kept.add(paths[3], folders[2])  # evicts a/x: a keeps y
    assert folders[0].exists() and not paths[0].exists() and kept.get(keys[0]) is None
    kept.add(paths[2], folders[1])  # a second link into b evicts a/y, a's last: a goes whole
    assert not folders[0].exists() and set(kept.folders) == {folders[1], folders[2]}


class Slow:
    """A processor sleeping 1 ms a call: four rows of 1,000 tokens hold their slots for seconds."""

    def __call__(self, ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        time.sleep(0.001)
        return logits


def test_a_request_that_waited_for_a_slot_says_so_in_its_timings(app):
    """The response's timings: seconds from the body read to planned, waiting in the queue for a slot,
    first token, done; a request behind 4 busy slots waits until one frees (here: cancelled 0.3 s after
    the request was seen waiting)."""
    state, client = app
    engine = state.models["protein"].engine
    bos = state.models["protein"].run.domain.bos_id
    settings = RowSettings(1000, 1000, processors=[Slow()])
    jobs = [Job([SampleSpec([bos], settings, Sampler(1.0))], lambda e: None) for _ in range(4)]
    deadline = time.monotonic() + 5
    for k, job in enumerate(jobs):
        engine.submit(job)
        while engine.busy <= k and time.monotonic() < deadline:
            time.sleep(0.002)

    def free_one_later() -> None:
        while not engine.waiting and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(0.3)
        engine.cancel(jobs[0])

    threading.Thread(target=free_one_later, daemon=True).start()
    r = client.post(
        "/v1/generate", json={"prompt": "M", "max_new_tokens": 3, "min_new_tokens": 3, "files": False}
    )
    for job in jobs:
        engine.cancel(job)
    t = r.json()["timings"]
    assert 0 <= t["plan_s"] <= t["plan_s"] + t["queue_s"] <= t["first_token_s"] <= t["total_s"], t
    assert t["queue_s"] >= 0.29, t
    while engine.busy and time.monotonic() < deadline:
        time.sleep(0.01)


def test_full_queue_is_429_with_retry_after(app):
    state, client = app
    engine = state.models["protein"].engine
    bos = state.models["protein"].run.domain.bos_id
    jobs = [
        Job(
            [
                SampleSpec(  # held for seconds: no slot frees before the request is refused
                    [bos],
                    RowSettings(1000, 1000, processors=[Slow()]),
                    Sampler(1.0, generator=torch.Generator().manual_seed(k)),
                )
            ],
            print,
        )
        for k in range(6)
    ]
    deadline = time.monotonic() + 5
    for k, job in enumerate(jobs):  # 4 slots, then a queue of 2
        engine.submit(job)
        while k < 4 and engine.busy <= k and time.monotonic() < deadline:
            time.sleep(0.002)
    folders = listed(state.models["protein"].files_dir)
    r = client.post("/v1/generate", json={"prompt": "M", "max_new_tokens": 2})  # files: its outputs opened
    assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
    assert listed(state.models["protein"].files_dir) == folders  # the refused request's folder went
    assert r.json()["error"]["type"] == "rate_limit_error"
    for job in jobs:
        engine.cancel(job)
    while engine.busy and time.monotonic() < deadline:
        time.sleep(0.01)
    r = client.post("/v1/generate", json={"prompt": "M", "max_new_tokens": 2, "files": False})
    assert r.status_code == 200 and engine.busy == 0


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "prompt",
                "n",
                "max_new_tokens",
                "temperature",
                "top_k",
                "stop",
                "seed",
                "tags",
                "min_len",
                "template",
                "fixed",
                "stop_ids",
                "model",
                "options",
                "stream",
                "x",
            ]
        ),  # fmt: skip
        st.one_of(
            st.none(),
            st.integers(-5, 10**6),
            st.floats(allow_nan=True),
            st.text(max_size=12),
            st.lists(st.integers(-2, 50), max_size=3),
            st.booleans(),
            st.dictionaries(st.text(max_size=3), st.integers()),
        ),  # fmt: skip
        max_size=5,
    )
)
@example({"temperature": 3.4028235677973366e38})  # float32(t) is inf: once drew a banned token, ppl inf
def test_fuzzed_bodies_never_500(app, body):
    _, client = app
    body = {k: v for k, v in body.items() if k != "max_new_tokens" or not isinstance(v, int) or v < 50}
    body["files"] = False
    r = client.post("/v1/generate", content=json.dumps(body))  # NaN and Infinity as Python writes them
    assert r.status_code < 500, (body, r.text)
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"message", "type"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_key_disconnect_and_loopback(protein_run, tmp_path, monkeypatch, capsys):
    assert main(["serve", f"runs=[{protein_run}]", "host=0.0.0.0"]) == 2
    assert "MULTIAR_API_KEY" in capsys.readouterr().err
    monkeypatch.setenv("MULTIAR_API_KEY", "sekret")
    state, app = build_state(serve_config(protein_run, tmp_path))
    url, server, thread = serve_on_loopback(app)
    try:
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        auth = {"Authorization": "Bearer sekret"}
        # 1,000 tokens: busy for seconds, whatever holds this thread up before it looks (the row is
        # cancelled when the stream closes)
        body = {"prompt": "M", "max_new_tokens": 1000, "min_new_tokens": 1000, "stream": True, "files": False}
        engine = state.models[protein_run.name].engine
        step = engine.step

        def slowed() -> None:  # 1,000 steps take seconds however fast this CPU decodes the tiny model
            step()
            time.sleep(0.005)

        monkeypatch.setattr(engine, "step", slowed)
        with httpx.stream("POST", f"{url}/v1/generate", json=body, headers=auth) as r:
            assert r.status_code == 200
            next(r.iter_lines())
            assert engine.busy == 1
        deadline = time.monotonic() + 5
        while engine.busy and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.busy == 0
        r = httpx.post(
            f"{url}/v1/generate", json={"prompt": "M", "max_new_tokens": 3, "files": False}, headers=auth
        )
        assert r.status_code == 200
    finally:
        server.should_exit = True
        thread.join(10)
        for s in state.models.values():
            s.engine.stop()


def test_health_says_loading_while_models_load_and_a_failed_load_stops_the_server(
    protein_run, tmp_path, monkeypatch
):
    """`multiar serve` listens while its models load (on a thread that ends: see start_loading): /health
    is 503 "loading" and requests get 503; a load that fails stops the server with its one-line error."""
    import multiar.commands.serve as serve_command
    from multiar.errors import ConfigError

    gate = threading.Event()

    def slow_failing_load(cfg, files_dir, full_gc):
        gate.wait(30)
        raise ConfigError("run: broken weights")

    monkeypatch.setattr(serve_command, "load_models", slow_failing_load)
    port = free_port()
    cfg = serve_config(protein_run, tmp_path, f"port={port}")
    out = {}

    def run():
        try:
            serve_command.serve(cfg)
        except ConfigError as err:
            out["error"] = str(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    url, health = f"http://127.0.0.1:{port}", None
    deadline = time.monotonic() + 20
    while health is None and time.monotonic() < deadline:
        try:
            health = httpx.get(f"{url}/health")
        except httpx.TransportError:
            time.sleep(0.05)
    assert health is not None and health.status_code == 503 and health.json()["status"] == "loading"
    assert httpx.post(f"{url}/v1/generate", json={"prompt": "M"}).status_code == 503
    gate.set()
    thread.join(20)
    assert not thread.is_alive() and out == {"error": "run: broken weights"}


def test_a_stream_that_fell_behind_gets_its_waiting_tokens_in_one_event():
    """Token events of one sample waiting back to back merge into one (in order); an event of another
    sample or an end is never merged over, and comes next."""
    import asyncio

    from multiar.commands.serve_api import Flow
    from multiar.commands.serve_engine import Event

    async def run():
        flow = Flow.__new__(Flow)
        flow.queue, flow.held, flow.results = asyncio.Queue(), None, [None, None]
        waiting = [Event("tokens", 0, [1]), Event("tokens", 0, [2]), Event("tokens", 1, [3]),
                   Event("tokens", 1, [4]), Event("end", 0, [1, 2], "length"), Event("tokens", 1, [5])]  # fmt: skip
        for e in waiting:
            flow.queue.put_nowait(e)

        async def never_gone():
            return False

        seen = []
        async for e in flow.events(never_gone):
            seen.append((e.kind, e.sample, e.ids))
            if len(seen) == 4:
                flow.queue.put_nowait(Event("end", 1, [3, 4, 5], "length"))
        return seen

    assert asyncio.run(run()) == [
        ("tokens", 0, [1, 2]), ("tokens", 1, [3, 4]), ("end", 0, [1, 2]), ("tokens", 1, [5]),
        ("end", 1, [3, 4, 5]),
    ]  # fmt: skip


def test_loading_warms_each_model_then_freezes_and_counts_no_warm_up_tokens(protein_run, tmp_path):
    """The loader ran one small request per model (what a first request loads lazily is loaded), froze
    what it loaded out of the cyclic GC, and left the engine's counters at zero for the users."""
    import gc

    state, _ = build_state(serve_config(protein_run, tmp_path))
    try:
        engine = next(iter(state.models.values())).engine
        assert set(engine.rows.ends) - {"idle"}  # a slot served the warm-up request to its end
        assert engine.stats.tokens == 0 and engine.stats.steps == 0 and sum(engine.stats.ttft_counts) == 0
        assert gc.get_freeze_count() > 0
    finally:
        for s in state.models.values():
            s.engine.stop()


def test_serve_turns_automatic_full_collections_off_once_loaded_and_its_engines_run_them(
    protein_run, tmp_path
):
    """`multiar serve` loads with full_gc: once its models are loaded and frozen, CPython's automatic
    full collections are off (engines_collect) and the engines run them between their steps; /metrics
    counts their seconds. A process that loads without it keeps CPython's."""
    import gc

    before = gc.get_threshold()
    try:
        state, _ = build_state(serve_config(protein_run, tmp_path), full_gc=True)
        engine = next(iter(state.models.values())).engine
        try:
            assert engine.full_gc
            assert gc.get_threshold()[:2] == before[:2] and gc.get_threshold()[2] >= 1 << 30
            deadline = time.monotonic() + 10
            while engine.stats.gc_seconds == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert engine.stats.gc_seconds > 0
        finally:
            for s in state.models.values():
                s.engine.stop()
    finally:
        gc.set_threshold(*before)
    state, _ = build_state(serve_config(protein_run, tmp_path / "plain"))
    try:
        assert not next(iter(state.models.values())).engine.full_gc and gc.get_threshold() == before
    finally:
        for s in state.models.values():
            s.engine.stop()


def test_request_values_are_literal_never_config_interpolations(app, tmp_path, monkeypatch):
    """`${...}` in a request's strings stays text: no environment variable (a secret) or config value is
    resolved into the request, also behind backslashes."""
    from multiar.commands.serve_requests import request_config

    monkeypatch.setenv("MULTIAR_TEST_SECRET", "sekret")
    state, _ = app
    served = next(iter(state.models.values()))
    texts = ["${oc.env:MULTIAR_TEST_SECRET}", "a \\${x} b", "x\\\\${run}", "${run}"]
    for prompt, stop in (texts[:2], texts[2:]):
        cfg = request_config(served, {"prompt": prompt, "stop": stop, "seed": 1}, tmp_path, 1 << 20)
        assert (cfg.prompt, cfg.stop) == (prompt, stop)
