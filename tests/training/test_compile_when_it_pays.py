"""compile=auto in training: the first steps timed eager, the decision by compile_choice's rule, the compiled
steps timed and kept, a slower compiled step dropped; end to end, a run that compiles mid-way trains the
same weights as an eager one."""

from __future__ import annotations

import itertools
import logging
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file

from multiar.engine.compile_choice import read_measured
from multiar.engine.model import ModelConfig
from multiar.training import compile_when_it_pays as cwp

CONFIG = ModelConfig(vocab_size=32, n_layer=1, n_head=2, n_embd=16)


def fake_module():
    model = SimpleNamespace(config=CONFIG, forward=lambda idx: idx)
    return SimpleNamespace(model=model, device=torch.device("cpu"), forward_blocks=model.forward)


def fake_trainer(steps: int, world_size: int = 1):
    return SimpleNamespace(
        estimated_stepping_batches=steps,
        global_step=0,
        accumulate_grad_batches=1,
        world_size=world_size,
        precision="32-true",
    )


@pytest.fixture
def clock(monkeypatch):
    """run(chooser, trainer, module, seconds): one training batch per entry of seconds, each taking that
    long by the callback's clock (Lightning counts the step before on_train_batch_end); torch.compile
    marks the function instead of compiling it."""
    monkeypatch.setattr(cwp.torch, "compile", lambda f: ("compiled", f))

    def run(chooser, trainer, module, seconds: list[float]) -> None:
        ticks = itertools.chain.from_iterable((0.0, s) for s in seconds)
        monkeypatch.setattr(cwp, "perf_counter", ticks.__next__)
        batch = torch.zeros(4, 9, dtype=torch.long)
        for i, _ in enumerate(seconds):
            chooser.on_train_batch_start(trainer, module, batch, i)
            trainer.global_step += 1
            chooser.on_train_batch_end(trainer, module, None, batch, i)

    return run


def test_a_short_run_stays_eager_and_a_long_one_compiles_before_anything_is_measured(tmp_path, clock, caplog):
    caplog.set_level(logging.INFO, logger="multiar")
    # 4 x 60 s of eager steps repay a first compile: at 1 s a step, 244 steps left after the 4 timed do not
    for steps, compiled in ((244, False), (245, True)):
        chooser, module = cwp.CompileWhenItPays(tmp_path / "cache.json"), fake_module()
        clock(chooser, fake_trainer(steps), module, [5.0, 1.0, 1.0, 1.0])
        assert chooser.decision.compile is compiled and chooser.decision.steps == steps - 4
        assert chooser.decision.eager_ms == 1000.0  # the first (warm-up) step is not counted
        assert (module.forward_blocks != module.model.forward) is compiled
    assert "compile=auto: not compiling the training step: 240 steps x 1000.00 ms eager" in caplog.text
    assert "compile=auto: compiling the training step: 241 steps" in caplog.text


def test_the_compiled_steps_are_kept_and_decide_the_next_run(tmp_path, clock):
    cache = tmp_path / "cache.json"
    chooser, module, trainer = cwp.CompileWhenItPays(cache), fake_module(), fake_trainer(10_000)
    # 4 eager steps of 1 s, a compile of 30 s, then 4 warm-up and 16 compiled steps of 0.5 s
    clock(chooser, trainer, module, [1.0] * 4 + [30.0] + [0.5] * 20)
    key = chooser.clock.key
    assert "train 32-true | batch 4x9" in key
    assert read_measured(cache, key) | {"format": 1} == {"format": 1, "compiled_ms": 500.0, "compile_s": 30.0}
    assert chooser.state()["this_run"] == {"compile_s": 30.0, "compiled_ms": 500.0}
    # the next run decides from those figures: 0.5 s saved a step must repay 2 x 30 s
    for steps, compiled in ((124, False), (125, True)):
        again, module = cwp.CompileWhenItPays(cache), fake_module()
        clock(again, fake_trainer(steps), module, [1.0] * 4)
        assert again.decision.compile is compiled and again.decision.compiled_ms == 500.0


def test_a_compiled_step_slower_than_eager_goes_back_to_eager(tmp_path, clock, caplog):
    chooser, module = cwp.CompileWhenItPays(tmp_path / "cache.json"), fake_module()
    clock(chooser, fake_trainer(10_000), module, [1.0] * 4 + [30.0] + [1.5] * 20)
    assert module.forward_blocks is module.model.forward and chooser.clock is None
    assert "measured 1500.0 ms against 1000.0 eager: back to eager" in caplog.text
    later = cwp.CompileWhenItPays(tmp_path / "cache.json")  # and a later run does not compile
    clock(later, fake_trainer(10**9), fake_module(), [1.0] * 4)
    assert not later.decision.compile


def test_several_processes_stay_eager(tmp_path, clock):
    chooser, module = cwp.CompileWhenItPays(tmp_path / "cache.json"), fake_module()
    clock(chooser, fake_trainer(10**9, world_size=2), module, [1.0] * 4)
    assert not chooser.decision.compile and module.forward_blocks is module.model.forward


def test_a_run_compiled_mid_way_trains_the_eager_runs_weights(tmp_path, monkeypatch):
    # the measured figures say compiling pays: steps 1-4 run eager, 5-6 compiled (inductor, a C++ compiler)
    from test_training_features import run_train

    monkeypatch.setattr(cwp, "read_measured", lambda *a: {"compiled_ms": 0.0, "compile_s": 0.0})
    calls, compile = [], torch.compile

    def counted(f):  # the compiled forward, counting its calls
        compiled = compile(f)
        return lambda *args: calls.append(args[0].shape) or compiled(*args)

    monkeypatch.setattr(cwp.torch, "compile", counted)
    steps = ("trainer.max_steps=6", "trainer.val_check_interval=6")
    run_train(tmp_path, "eager", *steps, "compile=false")
    run_train(tmp_path, "auto", *steps)  # compile=auto is the default
    used = yaml.safe_load((tmp_path / "auto" / "config.yaml").read_text())["compile_used"]
    assert used["setting"] == "auto" and used["compile"] is True and used["steps"] == 2
    assert len(calls) == 2  # the last two training steps; validation stayed eager
    eager = yaml.safe_load((tmp_path / "eager" / "config.yaml").read_text())["compile_used"]
    assert eager == {"setting": "false", "compile": False}
    a, b = (
        load_file(tmp_path / "eager" / "model.safetensors"),
        load_file(tmp_path / "auto" / "model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
