"""attention= for training (training.fastest_attention): rank 0 decides and every process takes its
answer; a failed measurement leaves SDPA; the dtype timed is the one the step's matmuls run in."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import torch

from multiar.engine.model import GPT, ModelConfig
from multiar.training import fastest_attention as fa

CONFIG = ModelConfig(vocab_size=32, block_size=16, n_layer=1, n_head=2, n_embd=16)


def fake(rank: int, sent: list):
    """A trainer whose strategy records what rank `rank` broadcasts and hands back rank 0's answer."""

    def broadcast(obj, src=0):
        sent.append(obj)
        return {"attention": "matmul", "how": "measured", "ms": {"sdpa": 2.0, "matmul": 1.0}, "shape": "s"}

    strategy = SimpleNamespace(broadcast=broadcast)
    trainer = SimpleNamespace(is_global_zero=rank == 0, precision="bf16-mixed", strategy=strategy)
    module = SimpleNamespace(model=GPT(CONFIG), device=torch.device("cpu"))
    return trainer, module


def test_rank_0_measures_and_every_rank_takes_its_answer(monkeypatch, tmp_path):
    asked = []
    monkeypatch.setattr(
        fa, "choose_attention", lambda *a: asked.append(a) or {"attention": "sdpa", "how": "x"}
    )
    sent = []
    trainer, module = fake(1, sent)
    fa.FastestAttention("auto", 8, tmp_path / "c.json").on_train_start(trainer, module)
    assert asked == [] and sent == [None] and module.model.attention == "matmul"  # rank 1: no timing
    trainer, module = fake(0, sent)
    callback = fa.FastestAttention("auto", 8, tmp_path / "c.json")
    callback.on_train_start(trainer, module)
    assert asked[0][1:4] == (CONFIG, 8, torch.bfloat16) and sent[-1] == {"attention": "sdpa", "how": "x"}
    assert callback.state()["setting"] == "auto" and module.model.attention == "matmul"


def test_a_failed_measurement_leaves_sdpa(monkeypatch, caplog):
    def broken(*args):
        raise RuntimeError("out of memory\nmore")

    monkeypatch.setattr(fa, "choose_attention", broken)
    trainer, module = fake(0, [])
    trainer.strategy.broadcast = lambda obj, src=0: obj  # one process
    callback = fa.FastestAttention("auto", 8, None)
    with caplog.at_level(logging.WARNING, logger="multiar"):
        callback.on_train_start(trainer, module)
    assert module.model.attention == "sdpa" and callback.choice["how"] == "measurement failed: out of memory"
    assert "attention=auto: the measurement failed (out of memory): SDPA" in caplog.text


def test_the_dtype_timed_is_the_steps():
    assert fa.step_dtype("bf16-mixed", torch.float32) == torch.bfloat16
    assert fa.step_dtype("bf16-true", torch.bfloat16) == torch.bfloat16
    assert fa.step_dtype("16-mixed", torch.float32) == torch.float16
    assert fa.step_dtype("32-true", torch.float32) == torch.float32


def test_a_resumed_auto_run_keeps_its_checkpoints_attention(monkeypatch):
    def broken(*args):
        raise AssertionError("a resumed run is not measured again")

    monkeypatch.setattr(fa, "choose_attention", broken)
    trainer, module = fake(0, sent := [])
    saved = fa.FastestAttention("auto", 8, None)
    saved.choice = {
        "attention": "matmul",
        "how": "measured",
        "ms": {"sdpa": 2.0, "matmul": 1.0},
        "shape": "s",
    }
    resumed = fa.FastestAttention("auto", 8, None)
    resumed.load_state_dict(saved.state_dict())  # what Lightning does with the checkpoint's callback state
    resumed.on_train_start(trainer, module)
    assert module.model.attention == "matmul" and resumed.choice["how"] == "resumed" and sent == []
    forced = fa.FastestAttention("sdpa", 8, None)  # a setting given on the command line wins
    forced.load_state_dict(saved.state_dict())
    monkeypatch.setattr(fa, "choose_attention", lambda setting, *a: {"attention": setting, "how": "forced"})
    trainer.strategy.broadcast = lambda obj, src=0: obj
    forced.on_train_start(trainer, module)
    assert module.model.attention == "sdpa"
