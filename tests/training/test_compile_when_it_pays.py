"""compile=auto in training: the first steps timed eager, the decision by compile_choice's rule, the compiled
steps timed and kept, a slower compiled step dropped; end to end, a run that compiles mid-way trains the
same weights as an eager one."""

from __future__ import annotations

import contextlib
import itertools
import logging
from types import SimpleNamespace

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Timer
from safetensors.torch import load_file

from multiar.engine.compile_choice import read_measured
from multiar.engine.model import ModelConfig
from multiar.training import compile_when_it_pays as cwp

CONFIG = ModelConfig(vocab_size=32, n_layer=1, n_head=2, n_embd=16)
BATCH = torch.zeros(4, 9, dtype=torch.long)  # (B, T + 1): the step's inputs are (4, 8)


def fake_module():
    weight = torch.nn.Parameter(torch.ones(3))
    model = SimpleNamespace(config=CONFIG, forward=lambda idx: idx, attention="sdpa")
    module = SimpleNamespace(model=model, device=torch.device("cpu"), forward_blocks=model.forward)
    module.parameters = lambda: [weight]
    module.zero_grad = lambda set_to_none=True: None
    module._loss = lambda batch, forward: ((weight * forward(batch[:, :-1]).float().mean()).sum(), None)
    return module


def fake_trainer(steps: float, world_size: int = 1, callbacks=(), precision: str = "32-true"):
    plugin = SimpleNamespace(forward_context=contextlib.nullcontext)
    return SimpleNamespace(
        estimated_stepping_batches=steps,
        global_step=0,
        accumulate_grad_batches=1,
        world_size=world_size,
        precision=precision,
        precision_plugin=plugin,
        callbacks=list(callbacks),
    )


@pytest.fixture
def clock(monkeypatch):
    """run(chooser, trainer, module, seconds, batches): `batches` training batches of BATCH, the clock
    reading 0 then each entry of seconds in turn at each pair of readings (a batch's start and end, the
    compile's trial's: it comes right after the deciding batch); Lightning counts the step before
    on_train_batch_end. compile_blocks returns a marked function that calls the eager forward."""
    compiled_calls = []

    def compile_blocks(model):
        def compiled(idx):
            compiled_calls.append(idx.shape)
            return model.forward(idx)

        return compiled

    monkeypatch.setattr(cwp, "compile_blocks", compile_blocks)

    def run(chooser, trainer, module, seconds: list[float], batches: int, batch=BATCH) -> None:
        ticks = itertools.chain.from_iterable((0.0, s) for s in seconds)
        monkeypatch.setattr(cwp, "perf_counter", ticks.__next__)
        for i in range(batches):
            chooser.on_train_batch_start(trainer, module, batch, i)
            trainer.global_step += 1
            chooser.on_train_batch_end(trainer, module, None, batch, i)

    run.compiled_calls = compiled_calls
    return run


def test_a_short_run_stays_eager_and_a_long_one_compiles_before_anything_is_measured(tmp_path, clock, caplog):
    caplog.set_level(logging.INFO, logger="multiar")
    # under bf16 autocast 12 x 30 s of eager steps repay a first compile, in fp32 (a smaller saving) 36 x 30 s:
    # at 1 s a step, 360 (1,080) steps left after the 4 timed do not
    for precision, eager_s in (("bf16-mixed", 360), ("32-true", 1080)):
        for steps, compiled in ((eager_s + 4, False), (eager_s + 5, True)):
            chooser, module = cwp.CompileWhenItPays(tmp_path / "cache.json"), fake_module()
            trainer = fake_trainer(steps, precision=precision)
            clock(chooser, trainer, module, [5.0, 1.0, 1.0, 1.0, 9.0], batches=4)
            assert chooser.decision.compile is compiled and chooser.decision.steps == steps - 4
            assert chooser.decision.eager_ms == 1000.0  # the first (warm-up) step is not counted
            assert (module.forward_blocks != module.model.forward) is compiled
    assert "not compiling the training step: 360 steps x 1000.00 ms eager = 360 s <= 12 x 30 s" in caplog.text
    assert "compile=auto: compiling the training step: 361 steps" in caplog.text
    assert "1080 steps x 1000.00 ms eager = 1080 s <= 36 x 30 s" in caplog.text
    assert clock.compiled_calls == [
        (4, 8),
        (4, 8),
    ]  # each trial: forward (and backward) on the deciding batch


def test_the_compiled_steps_are_kept_and_decide_the_next_run(tmp_path, clock):
    cache = tmp_path / "cache.json"
    chooser, module, trainer = cwp.CompileWhenItPays(cache), fake_module(), fake_trainer(10_000)
    # 4 eager steps of 1 s, the trial's 30 s (the compile), then 4 warm-up and 16 compiled steps of 0.5 s
    clock(chooser, trainer, module, [1.0] * 4 + [30.0] + [0.5] * 20, batches=24)
    key = cwp.training_key(module, BATCH, trainer)
    assert "train 32-true | batch 4x9 / 1" in key and key.endswith("| attention sdpa | compiled blocks")
    other = fake_module()
    other.model.attention = "matmul"  # the other attention's step: these figures are not its own
    assert cwp.training_key(other, BATCH, trainer) != key
    assert read_measured(cache, key) | {"format": 0} == {"format": 0, "compiled_ms": 500.0, "compile_s": 30.0}
    assert chooser.state()["this_run"] == {"compile_s": 30.0, "compiled_ms": 500.0}
    assert (
        chooser.clock is None and module.forward_blocks is not module.model.forward
    )  # timing stopped, graph kept
    # the next run decides from those figures: 0.5 s saved a step must repay 2 x 30 s
    for steps, compiled in ((124, False), (125, True)):
        again, module = cwp.CompileWhenItPays(cache), fake_module()
        clock(again, fake_trainer(steps), module, [1.0] * 4 + [30.0], batches=4)
        assert again.decision.compile is compiled and again.decision.compiled_ms == 500.0


def test_a_compiled_step_slower_than_eager_goes_back_to_eager(tmp_path, clock, caplog):
    chooser, module = cwp.CompileWhenItPays(tmp_path / "cache.json"), fake_module()
    clock(chooser, fake_trainer(10_000), module, [1.0] * 4 + [30.0] + [1.5] * 20, batches=24)
    assert module.forward_blocks is module.model.forward and chooser.clock is None
    assert "measured 1500.0 ms against 1000.0 eager: back to eager" in caplog.text
    later = cwp.CompileWhenItPays(tmp_path / "cache.json")  # and a later run does not compile
    clock(later, fake_trainer(10**9), fake_module(), [1.0] * 4, batches=4)
    assert not later.decision.compile


def test_a_compile_that_fails_leaves_the_run_eager(tmp_path, clock, monkeypatch, caplog):
    def broken(model):
        def compiled(idx):
            raise RuntimeError("InductorError: no C++ compiler\nmore")

        return compiled

    monkeypatch.setattr(cwp, "compile_blocks", broken)
    chooser, module = cwp.CompileWhenItPays(tmp_path / "cache.json"), fake_module()
    clock(chooser, fake_trainer(10**6), module, [1.0] * 4 + [30.0, 1.0], batches=5)
    assert module.forward_blocks is module.model.forward and not chooser.decision.compile
    assert chooser.clock is None and chooser.state()["this_run"] == {
        "failed": "InductorError: no C++ compiler"
    }
    assert (
        "the training step did not compile (InductorError: no C++ compiler): training eagerly" in caplog.text
    )


def test_a_smaller_last_batch_runs_eager_and_is_not_timed(tmp_path, clock):
    chooser, module, trainer = (
        cwp.CompileWhenItPays(tmp_path / "cache.json"),
        fake_module(),
        fake_trainer(10**6),
    )
    clock(chooser, trainer, module, [1.0] * 4 + [30.0], batches=4)
    last = torch.zeros(2, 9, dtype=torch.long)
    assert module.forward_blocks(last[:, :-1]).shape == (2, 8) and len(clock.compiled_calls) == 1
    module.forward_blocks(BATCH[:, :-1])
    assert len(clock.compiled_calls) == 2
    clock(chooser, trainer, module, [99.0], batches=1, batch=last)
    assert chooser.clock.times == []


def test_a_smaller_batch_among_the_first_is_not_timed(tmp_path, clock):
    chooser, module, trainer = (
        cwp.CompileWhenItPays(tmp_path / "cache.json"),
        fake_module(),
        fake_trainer(10**6),
    )
    clock(chooser, trainer, module, [5.0, 1.0, 1.0], batches=3)
    clock(chooser, trainer, module, [0.1], batches=1, batch=torch.zeros(2, 9, dtype=torch.long))
    assert chooser.decision is None and chooser.eager == [1.0, 1.0]
    clock(chooser, trainer, module, [1.0, 30.0], batches=1)
    assert chooser.decision.compile and chooser.decision.eager_ms == 1000.0


def test_runs_of_unknown_length_or_several_processes_stay_eager_and_max_time_bounds_the_steps(
    tmp_path, clock
):
    for trainer in (fake_trainer(10**9, world_size=2), fake_trainer(float("inf")), fake_trainer(-1)):
        chooser, module = cwp.CompileWhenItPays(tmp_path / "cache.json"), fake_module()
        clock(chooser, trainer, module, [1.0] * 4, batches=4)
        assert not chooser.decision.compile and module.forward_blocks is module.model.forward
    timer = Timer(duration={"seconds": 100})
    timer.time_remaining = lambda: 100.0  # seconds
    assert cwp.batches_left(fake_trainer(10**6, callbacks=[timer]), eager_s=0.5) == 200
    assert cwp.batches_left(fake_trainer(50), eager_s=0.5) == 50


def test_a_run_compiled_mid_way_trains_the_eager_runs_weights(tmp_path, monkeypatch):
    # the measured figures say compiling pays: steps 1-4 run eager, 5-6 compiled (inductor, a C++ compiler)
    from test_training_features import run_train

    monkeypatch.setattr(cwp, "read_measured", lambda *a: {"compiled_ms": 0.0, "compile_s": 0.0})
    calls, compile_blocks = [], cwp.compile_blocks

    def counted(model):  # the compiled forward, counting its calls
        compiled = compile_blocks(model)
        return lambda *args: calls.append(args[0].shape) or compiled(*args)

    monkeypatch.setattr(cwp, "compile_blocks", counted)
    steps = ("trainer.max_steps=6", "trainer.val_check_interval=6")
    run_train(tmp_path, "eager", *steps, "compile=false")
    run_train(tmp_path, "auto", *steps)  # compile=auto is the default
    used = yaml.safe_load((tmp_path / "auto" / "config.yaml").read_text())["compile_used"]
    assert used["setting"] == "auto" and used["compile"] is True and used["steps"] == 2
    assert len(calls) == 3  # the trial (on step 4's batch), steps 5 and 6; validation stayed eager
    eager = yaml.safe_load((tmp_path / "eager" / "config.yaml").read_text())["compile_used"]
    assert eager == {"setting": "false", "compile": False}
    a, b = (
        load_file(tmp_path / "eager" / "model.safetensors"),
        load_file(tmp_path / "auto" / "model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
