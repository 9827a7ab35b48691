"""The full-sequence pass's attention: batched matmuls (engine.model.matmul_attention) give SDPA's values
and gradients, and engine.attention_choice picks the faster where it may, once per machine and shape."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from multiar import schema
from multiar.engine import attention_choice as ac
from multiar.engine.matmul_attention import causal_bias, matmul_attention
from multiar.engine.model import GPT, ModelConfig

CONFIG = ModelConfig(vocab_size=40, block_size=32, n_layer=2, n_head=2, n_embd=32)


def test_matmul_attention_gives_sdpas_values_and_gradients():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 32, 8, requires_grad=True) for _ in range(3))
    grad = torch.randn(2, 3, 32, 8)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    want_grads = torch.autograd.grad(want, (q, k, v), grad)
    got = matmul_attention(q, k, v, causal_bias(32, torch.float32, q.device), 0.0)
    got_grads = torch.autograd.grad(got, (q, k, v), grad)
    assert torch.allclose(got, want, atol=1e-5)
    assert all(torch.allclose(g, w, atol=1e-5) for g, w in zip(got_grads, want_grads, strict=True))
    # dropout drops probabilities: the output changes, its shape does not
    dropped = matmul_attention(q, k, v, causal_bias(32, torch.float32, q.device), 0.5)
    assert dropped.shape == want.shape and not torch.allclose(dropped, want)


def test_a_model_on_matmul_attention_trains_on_it_and_keeps_sdpa_elsewhere(monkeypatch):
    import multiar.engine.model as model_module

    calls = []
    matmul = model_module.matmul_attention
    monkeypatch.setattr(
        model_module,
        "matmul_attention",
        lambda q, k, v, bias, dropout: (
            calls.append((q.size(2), bias.dtype, dropout)) or matmul(q, k, v, bias, dropout)
        ),
    )
    torch.manual_seed(0)
    model = GPT(CONFIG)
    idx = torch.randint(0, 40, (2, 20))  # fewer tokens than block_size
    want = model(idx)
    model.attention = "matmul"
    assert torch.allclose(model(idx), want, atol=1e-5) and calls == [(20, torch.float32, 0.0)] * 2
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the bias in the scores' dtype
        assert torch.allclose(model(idx).float(), want, atol=0.1) and calls[-1] == (20, torch.bfloat16, 0.0)
    calls.clear()
    with torch.no_grad():  # validation, scoring: SDPA's forward is the faster
        assert torch.allclose(model(idx), want, atol=1e-5)
    model.setup_caches(max_batch_size=2)  # prefill and decode: SDPA
    assert torch.allclose(model(idx, input_pos=0), want, atol=1e-5) and calls == []
    dropped = GPT(ModelConfig(**CONFIG.to_dict() | {"dropout": 0.5}))
    dropped.attention = "matmul"
    dropped.load_state_dict(model.state_dict())
    assert not torch.allclose(dropped(idx), want)
    assert calls == [(20, torch.float32, 0.5)] * 2  # attention dropout, on the probabilities


def test_auto_picks_the_faster_once_per_machine_and_shape(tmp_path):
    calls = []

    def timer(shape, dtype, device, dropout):
        calls.append((shape, dtype, dropout))
        return (
            {"sdpa": 0.014, "matmul": 0.006} if dtype == torch.bfloat16 else {"sdpa": 0.016, "matmul": 0.017}
        )

    cache, cpu = tmp_path / "cache.json", torch.device("cpu")
    bf16 = ac.choose_attention("auto", CONFIG, 8, torch.bfloat16, cpu, cache, timer)
    assert bf16 == {
        "attention": "matmul",
        "how": "measured",
        "ms": {"sdpa": 14.0, "matmul": 6.0},
        "shape": "8x2x32x16 bfloat16, dropout 0",
    }
    assert ac.log_line(bf16) == (
        "attention=auto: matmul (forward and backward 6.00 ms against sdpa 14.00, 8x2x32x16 bfloat16, "
        "dropout 0, measured)"
    )
    assert ac.choose_attention("auto", CONFIG, 8, torch.bfloat16, cpu, cache, timer)["how"] == "cached"
    assert ac.choose_attention("auto", CONFIG, 8, torch.float32, cpu, cache, timer)["attention"] == "sdpa"
    assert ac.choose_attention("auto", CONFIG, 4, torch.bfloat16, cpu, cache, timer)["how"] == "measured"
    dropout = ModelConfig(**CONFIG.to_dict() | {"dropout": 0.1})
    assert ac.choose_attention("auto", dropout, 8, torch.bfloat16, cpu, cache, timer)["how"] == "measured"
    assert calls == [
        ((8, 2, 32, 16), torch.bfloat16, 0.0),
        ((8, 2, 32, 16), torch.float32, 0.0),
        ((4, 2, 32, 16), torch.bfloat16, 0.0),
        ((8, 2, 32, 16), torch.bfloat16, 0.1),
    ]


def test_where_matmul_is_not_tried_and_settings_that_force(monkeypatch):
    def timer(*args):
        raise AssertionError("not measured")

    cpu = torch.device("cpu")
    forced = ac.choose_attention("matmul", CONFIG, 8, torch.float32, cpu, None, timer)
    assert forced == {"attention": "matmul", "how": "forced"}
    on_gpu = ac.choose_attention("auto", CONFIG, 8, torch.float32, torch.device("cuda"), None, timer)
    assert on_gpu["attention"] == "sdpa"
    # 2 layers x 4096 rows x 2 heads x 32 x 32 x 4 bytes of probabilities = 64 MiB: over a budget of 48 MiB;
    # 3072 rows (48 MiB) fit, unless dropout keeps its mask and the dropped probabilities too
    monkeypatch.setattr(ac, "SCORES_BUDGET", 48 * 2**20)
    big = ac.choose_attention("auto", CONFIG, 4096, torch.float32, cpu, None, timer)
    assert big["attention"] == "sdpa" and "0.1 GiB" in big["how"]
    dropout = ModelConfig(**CONFIG.to_dict() | {"dropout": 0.1})
    assert "not tried" in ac.choose_attention("auto", dropout, 3072, torch.float32, cpu, None, timer)["how"]
    with pytest.raises(AssertionError, match="not measured"):
        ac.choose_attention("auto", CONFIG, 3072, torch.float32, cpu, None, timer)
    with pytest.raises(ValueError, match="attention must be one of auto, sdpa, matmul"):
        ac.choose_attention("flash", CONFIG, 8, torch.float32, cpu, None, timer)
    assert schema.ATTENTION_SETTINGS == ac.SETTINGS


def test_the_timer_runs_both_kinds_and_leaves_the_random_stream_alone():
    torch.manual_seed(5)
    want = torch.rand(3)
    torch.manual_seed(5)
    seconds = ac.attention_seconds((1, 2, 16, 8), torch.float32, torch.device("cpu"), 0.1)
    assert set(seconds) == set(ac.KINDS) and all(0 < s < 1 for s in seconds.values())
    assert torch.equal(torch.rand(3), want)
