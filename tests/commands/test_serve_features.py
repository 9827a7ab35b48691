"""`multiar serve` request features: a music prompt as base64 MIDI with prompt_bars and notes streamed
over SSE, request_timeout, max_new_tokens capped by max_tokens, CORS off by default and on with
cors_origins=, and fill-in-the-middle through /v1/completions' suffix on a code run trained with
fim_rate > 0 (slow: it trains one)."""

from __future__ import annotations

import base64
import json
import time

import pytest
from conftest import TINY, bundled_files, copy_fixture_run
from fastapi.testclient import TestClient

from multiar.commands.serve import build_state
from multiar.commands.serve_app import AppState, create_app
from multiar.config import load_config
from multiar.errors import ConfigError
from multiar.schema import validate
from multiar.training.run import train


def serve_config(run, tmp, *extra):
    # the rows' attention and the step pinned like the dtype: measuring and compiling them costs each server
    # seconds (a captured step a minute), and the compiled ways have tests of their own
    # (engine/test_rows_attention, engine/test_captured_step, commands/test_serve_engine, test_serve_step)
    keys = [f"runs=[{run}]", "dtype=fp32", "attention=sdpa", "step=eager", "slots=4", f"files_dir={tmp}"]
    return load_config("serve", [*keys, *extra])


def stop(state):
    for s in state.models.values():
        s.engine.stop()


def sse_events(client, path, body):
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200, r.read()
        return [line[6:] for line in r.iter_lines() if line.startswith("data: ")]


@pytest.fixture(scope="module")
def music_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("servemusic")
    data = tmp / "midi"
    data.mkdir()
    for f in bundled_files("music", 8):
        (data / f.name).write_bytes(f.read_bytes())
    overrides = [*TINY, "domain=music", f"data.paths=[{data}]", f"run_dir={tmp / 'run'}", "trainer.max_steps=2",
                 "trainer.val_check_interval=2", "data.val_fraction=0.25", "domain.settings.bpe_vocab_size=520",
                 "model.block_size=128"]  # fmt: skip
    train(load_config("train", overrides))
    return tmp / "run"


def test_music_prompt_midi_with_prompt_bars_streams_notes(music_run, tmp_path):
    state, app = build_state(serve_config(music_run, tmp_path))
    midi = base64.b64encode(bundled_files("music", 9)[-1].read_bytes()).decode()
    body = {"prompt_midi": midi, "prompt_bars": 2, "max_new_tokens": 40, "min_new_tokens": 40, "seed": 1,
            "stream": True}  # fmt: skip
    try:
        with TestClient(app) as client:
            events = sse_events(client, "/v1/generate", body)
            assert client.post("/v1/generate", json=body | {"prompt": "x.mid"}).status_code == 422
            assert client.post("/v1/generate", json=body | {"prompt_midi": "bm90IG1pZGk="}).status_code == 422
            assert client.post("/v1/generate", json=body | {"prompt_bars": 0}).status_code == 422
            plain = body | {"stream": False, "files": False, "max_new_tokens": 4, "min_new_tokens": 0}
            assert client.post("/v1/generate", json=plain).status_code == 200
            folders = list(next(iter(state.models.values())).files_dir.iterdir())
            assert len(folders) == 1  # the streamed request's (linked); the refused and files=false ones went
    finally:
        stop(state)
    assert events[-1] == "[DONE]"
    final = json.loads(events[-2])
    tokens = [json.loads(e) for e in events[:-2]]
    assert sum(len(t["ids"]) for t in tokens) == 40 == final["samples"][0]["new_tokens"]
    streamed = [n for t in tokens for n in t["notes"]]
    assert streamed and tokens[-1]["note_count"] == len(streamed)  # each note once, as it completes
    assert all({"start", "duration", "pitch", "velocity", "track"} <= set(n) for n in streamed)
    sample = final["samples"][0]
    assert sample["notes"] and "token_errors" in sample
    assert {f["name"].rsplit(".", 1)[-1] for f in final["files"]} >= {"mid", "png"}


@pytest.fixture(scope="module")
def protein_run(tmp_path_factory):
    return copy_fixture_run(tmp_path_factory.mktemp("serveprotein"))


def test_request_timeout_ends_the_rows(protein_run, tmp_path):
    # 1 s: long enough for a first token on a loaded machine, far less than 20,000 tokens anywhere
    state, app = build_state(serve_config(protein_run, tmp_path, "request_timeout=1", "max_tokens=20000"))
    engine = next(iter(state.models.values())).engine
    try:
        with TestClient(app) as client:
            t0 = time.monotonic()
            r = client.post("/v1/generate", json={"prompt": "MK", "max_new_tokens": 20000, "min_new_tokens": 20000,
                                                  "files": False, "n": 2})  # fmt: skip
            assert r.status_code == 200, r.text
            assert time.monotonic() - t0 < 10
            assert [s["end"] for s in r.json()["samples"]] == ["timeout", "timeout"]
            assert all(0 < s["new_tokens"] < 20000 for s in r.json()["samples"])
            assert engine.busy == 0
    finally:
        stop(state)
    state, app = build_state(serve_config(protein_run, tmp_path, "max_tokens=7"))
    try:
        with TestClient(app) as client:
            r = client.post("/v1/generate", json={"prompt": "MK", "max_new_tokens": 50, "min_new_tokens": 50,
                                                  "files": False})  # fmt: skip
            assert r.json()["samples"][0]["new_tokens"] == 7
            r = client.post("/v1/completions", json={"prompt": "MK", "max_tokens": 50, "ignore_eos": True})
            assert r.json()["usage"]["completion_tokens"] == 7
            assert r.json()["choices"][0]["finish_reason"] == "length"
    finally:
        stop(state)


def test_cors_is_off_by_default_and_on_with_cors_origins(protein_run, tmp_path):
    preflight = {"Origin": "https://page.example", "Access-Control-Request-Method": "POST"}
    for extra, allowed in (((), None), (("cors_origins=[https://page.example]",), "https://page.example")):
        state, app = build_state(serve_config(protein_run, tmp_path, *extra))
        try:
            with TestClient(app) as client:
                r = client.options("/v1/generate", headers=preflight)
                assert r.headers.get("access-control-allow-origin") == allowed
                r = client.get("/v1/models", headers={"Origin": "https://page.example"})
                assert r.status_code == 200 and r.headers.get("access-control-allow-origin") == allowed
                other = client.get("/v1/models", headers={"Origin": "https://evil.example"})
                assert other.headers.get("access-control-allow-origin") is None
        finally:
            stop(state)


def test_cors_is_outermost_preflights_and_refusals_carry_its_headers():
    origin = "https://page.example"
    app = create_app(AppState(models={}, api_key="k", ready=True), cors_origins=[origin])
    with TestClient(app) as client:
        preflight = {"Origin": origin, "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization"}  # fmt: skip
        r = client.options("/v1/generate", headers=preflight)
        assert r.status_code == 200 and r.headers.get("access-control-allow-origin") == origin
        r = client.post("/v1/generate", json={}, headers={"Origin": origin})
        assert r.status_code == 401 and r.headers.get("access-control-allow-origin") == origin
        deep = b"[" * 200_000
        headers = {"Origin": origin, "Authorization": "Bearer k"}
        r = client.post("/v1/generate", content=deep, headers=headers)
        assert r.status_code == 400 and r.headers.get("access-control-allow-origin") == origin


@pytest.fixture(scope="module")
def fim_code_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("servefim")
    overrides = [*TINY, "domain=code", "data.max_documents=20", f"run_dir={tmp / 'run'}", "trainer.max_steps=2",
                 "domain.settings.fim_rate=0.5", "domain.settings.vocab_size=400"]  # fmt: skip
    train(load_config("train", overrides))
    return tmp / "run"


@pytest.mark.slow  # training a code run with FIM: ~20 s on 2 shared cores
def test_fill_in_the_middle_through_completions_suffix(fim_code_run, tmp_path):
    state, app = build_state(serve_config(fim_code_run, tmp_path))
    prefix, suffix = "def add(a, b):\n    ", "\n    return c\n"
    try:
        with TestClient(app) as client:
            r = client.post("/v1/completions", json={"prompt": prefix, "suffix": suffix, "max_tokens": 12,
                                                     "temperature": 0, "seed": 1})  # fmt: skip
            assert r.status_code == 200, r.text
            g = client.post("/v1/generate", json={"prompt_prefix": prefix, "prompt_suffix": suffix,
                                                  "max_new_tokens": 12, "temperature": 0, "seed": 1,
                                                  "files": False})  # fmt: skip
            assert g.status_code == 200, g.text
            f = client.post("/v1/generate", json={"prompt": "def f(x):\n", "max_new_tokens": 6, "seed": 2})
            assert f.status_code == 200, f.text
            report = next(x for x in f.json()["files"] if x["name"] == "syntax_report.tsv")
            line = client.get(report["url"]).text.splitlines()[0].split("\t")
            assert line[2] == f.json()["samples"][0]["end"]  # the end reason, as generate writes it
            served = next(iter(state.models.values()))
            domain = served.run.domain
    finally:
        stop(state)
    sample = g.json()["samples"][0]
    middle = r.json()["choices"][0]["text"]
    assert middle == sample["middle"]  # the completion is the middle alone
    assert sample["text"].startswith(prefix) and sample["text"].endswith(suffix)
    assert sample["text"] == prefix + middle + suffix
    assert r.json()["usage"]["prompt_tokens"] > len(domain.encode(prefix))  # prefix, suffix and FIM ids


def test_serve_takes_auto_or_a_rows_attention_way_and_names_the_key_otherwise():
    from multiar.engine.rows_attention import WAYS
    from multiar.schema import ROWS_ATTENTION_SETTINGS

    assert ("auto", *WAYS) == ROWS_ATTENTION_SETTINGS
    assert validate("serve", load_config("serve", ["runs=[r]"])).attention == "auto"
    for way in WAYS:
        assert validate("serve", load_config("serve", ["runs=[r]", f"attention={way}"])).attention == way
    with pytest.raises(ConfigError, match="attention.*auto, sdpa, compiled or operator"):
        validate("serve", load_config("serve", ["runs=[r]", "attention=flash"]))
    assert validate("serve", load_config("serve", ["runs=[r]"])).checks == "auto"
    assert validate("serve", load_config("serve", ["runs=[r]", "checks=wait"])).checks == "wait"
    assert validate("serve", load_config("serve", ["runs=[r]", "checks=inline"])).checks == "inline"
    with pytest.raises(ConfigError, match="checks.*auto, inline, wait or overlap"):
        validate("serve", load_config("serve", ["runs=[r]", "checks=thread"]))


def test_serve_takes_auto_eager_or_captured_steps_and_captured_needs_nn_linear():
    assert validate("serve", load_config("serve", ["runs=[r]"])).step == "auto"
    assert validate("serve", load_config("serve", ["runs=[r]", "step=eager"])).step == "eager"
    with pytest.raises(ConfigError, match="step.*auto, eager or captured"):
        validate("serve", load_config("serve", ["runs=[r]", "step=graph"]))
    with pytest.raises(ConfigError, match="layout.*packed Linear"):
        validate("serve", load_config("serve", ["runs=[r]", "step=captured", "layout=packed"]))
