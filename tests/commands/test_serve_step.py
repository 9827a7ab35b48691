"""How a served model's steps run (commands.serve_step): step=auto builds the eager and the captured way
from the same weights, times them and keeps the faster, caching the choice so a later start builds only
the winner; a captured step that does not build leaves eager; step=eager measures nothing. The captured
step here is its function run uncompiled (compiling it has tests of its own: engine/test_captured_step,
commands/test_serve_engine), so the test checks the choice, not inductor."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import copy_fixture_run

from multiar.commands import serve_step
from multiar.config import load_config
from multiar.engine.captured_step import step_rows
from multiar.run_folder import load_run
from multiar.schema import validate


class UncompiledStep:
    def __init__(self, model, slots) -> None:
        self.model = model

    def __call__(self, ids, rows, positions, kv_len, logits_at):
        return step_rows(self.model, ids, rows, positions, kv_len, logits_at)


class BrokenStep:
    def __init__(self, model, slots) -> None:
        raise RuntimeError("InductorError: no C++ compiler\nmore lines")


@pytest.fixture(scope="module")
def protein_run(tmp_path_factory):
    return copy_fixture_run(tmp_path_factory.mktemp("servestep"))


def cfg(*keys):
    return validate("serve", load_config("serve", ["runs=[r]", "slots=4", "attention=sdpa", *keys]))


def timer_preferring(winner, seen):
    """Seconds per step with `winner` the faster; records each step's logits (they must agree)."""

    def timer(steps):
        seen.update({name: step().float() for name, step in steps.items()})
        return {name: (0.001 if name == winner else 0.002) for name in steps}

    return timer


@pytest.mark.parametrize("winner", ["captured", "eager"])
def test_auto_keeps_the_faster_step_built_from_the_same_weights_and_caches_it(
    protein_run, tmp_path, monkeypatch, winner
):
    monkeypatch.setattr(serve_step, "CapturedStep", UncompiledStep)
    built, build = {}, serve_step.build

    def recorded_build(run, cfg, step, *args, **kwargs):
        model, attention = build(run, cfg, step, *args, **kwargs)
        built[step] = model
        return model, attention

    monkeypatch.setattr(serve_step, "build", recorded_build)
    cache = tmp_path / "decode_layout.json"
    seen = {}
    with torch.inference_mode():
        served = serve_step.served_model(
            load_run(protein_run), cfg("dtype=bf16"), cache, timer_preferring(winner, seen)
        )
    assert (served.step, served.how) == (winner, "measured")
    assert served.step_ms == {winner: 1.0, ({"eager", "captured"} - {winner}).pop(): 2.0}
    # both ways decode the same weights: the eager copy was laid out apart from the captured one
    assert torch.allclose(seen["eager"], seen["captured"], atol=0.05)  # bf16, two layouts
    assert served.model is built[winner] and built["eager"] is not built["captured"]
    assert all(
        isinstance(m, torch.nn.Linear)
        for m in (built["captured"].blocks[0].attn.qkv, built["captured"].lm_head)
    )
    loser = built[({"eager", "captured"} - {winner}).pop()]
    assert loser.blocks[0].attn.kv_cache is None  # the candidate not kept holds no KV cache
    entry = next(v for k, v in json.loads(cache.read_text()).items() if k.startswith("serve step"))
    assert entry["picked"] == winner

    # a later start reads the choice and builds the winner only
    built.clear()
    again = serve_step.served_model(
        load_run(protein_run), cfg("dtype=bf16"), cache, timer_preferring("eager", {})
    )
    assert (again.step, again.how, again.step_ms) == (winner, "cached", served.step_ms)
    assert list(built) == [winner]

    # ... and a cached captured step that no longer builds here leaves eager
    monkeypatch.setattr(serve_step, "CapturedStep", BrokenStep)
    built.clear()
    fallback = serve_step.served_model(
        load_run(protein_run), cfg("dtype=bf16"), cache, timer_preferring("x", {})
    )
    assert (fallback.step, list(built)[-1]) == ("eager", "eager")
    assert fallback.how == ("only candidate" if winner == "captured" else "cached")


def test_a_captured_step_that_does_not_build_leaves_eager(protein_run, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(serve_step, "CapturedStep", BrokenStep)
    with caplog.at_level(logging.WARNING, logger="multiar"):
        served = serve_step.served_model(
            load_run(protein_run), cfg(), tmp_path / "c.json", timer_preferring("x", {})
        )
    assert (served.step, served.how) == ("eager", "only candidate")
    assert (
        "serve: a captured step does not build here (InductorError: no C++ compiler): eager steps"
        in caplog.text
    )
    assert not (tmp_path / "c.json").exists()  # measured again once it builds


@pytest.mark.parametrize(
    "keys, step, how", [(["step=eager"], "eager", "forced"), (["layout=packed"], "eager", "only candidate")]
)
def test_a_pinned_step_or_packed_weights_measure_nothing(protein_run, tmp_path, monkeypatch, keys, step, how):
    monkeypatch.setattr(serve_step, "CapturedStep", BrokenStep)

    def timer(steps):
        raise AssertionError("measured")

    served = serve_step.served_model(load_run(protein_run), cfg(*keys), tmp_path / "c.json", timer)
    assert (served.step, served.how) == (step, how)
