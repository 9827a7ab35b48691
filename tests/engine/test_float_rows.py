"""A float model's Linears at a few rows: the operator's numbers, which calls take it, the measured rule
(its choice, cache and pin), prepare_for_decoding naming it, and a compiled package's trace keeping it."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from multiar.engine import ahead_of_time, cpu_matvec, float_rows
from multiar.engine.choice_cache import CACHE_FILE
from multiar.engine.float_rows import choose_rows, rule_name, rule_rows, use_rule, without_linear_rules
from multiar.engine.layout import prepare_for_decoding
from multiar.engine.model import GPT, ModelConfig

needs_operator = pytest.mark.skipif(
    cpu_matvec.library() is None or not cpu_matvec.vectorized(),
    reason="engine.cpu_matvec's float loops are not built as vectors here",
)


def tiny(dtype: torch.dtype = torch.float32) -> GPT:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=64)
    return GPT(config).to(dtype).eval()


def counting_operator(monkeypatch) -> list[int]:
    """The row counts of the calls cpu_matvec.matvec serves."""
    calls, matvec = [], cpu_matvec.matvec

    def counted(x, w):  # noqa: ANN001, ANN202
        calls.append(x.size(0))
        return matvec(x, w)

    monkeypatch.setattr(cpu_matvec, "matvec", counted)
    return calls


def timer_until(most: int, calls: list[int] | None = None):  # noqa: ANN201
    """A rows timer on which the operator wins up to `most` rows and loses from there."""

    def timer(layers, rows):  # noqa: ANN001, ANN202
        if calls is not None:
            calls.append(rows)
        return (1.0, 0.5) if rows <= most else (1.0, 2.0)

    return timer


def test_rule_names_round_trip():
    for rows in (0, None, 1, 64):
        assert rule_rows(rule_name(rows)) == rows
    assert rule_name(0) == "linear" and rule_name(None) == "matvec"
    assert rule_name(16) == "matvec up to 16 rows"
    for bad in ("matvec up to many rows", "bf16 from 4 rows", ""):
        with pytest.raises(ValueError, match="not a rule"):
            rule_rows(bad)


@needs_operator
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_calls_up_to_the_rules_rows_take_the_operator_with_f_linears_numbers(dtype, monkeypatch):
    """A call of at most the rule's rows runs the operator (each weight read once for its rows), a call
    of more F.linear; both give F.linear's numbers within the dtype's rounding. Gradients and traces
    take F.linear whatever the rows."""
    model = tiny(dtype)
    linears = float_rows.float_linears(model)
    assert len(linears) == 2 * 4 + 1  # qkv, proj, gate_up, down per block; the head
    calls = counting_operator(monkeypatch)
    idx = torch.randint(0, 64, (1, 12))
    with torch.inference_mode():
        plain = model(idx)
    use_rule(linears, "matvec up to 8 rows")
    with torch.inference_mode():
        assert not calls and torch.equal(model(idx), plain)  # 12 rows: F.linear
        routed = model(idx[:, :8])
    assert calls and set(calls) == {8}
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(routed, plain[:, :8], **tol)
    calls.clear()
    model.train()
    loss = model(idx[:, :4]).float().logsumexp(-1).mean()  # gradients asked: F.linear, and a backward
    loss.backward()
    assert not calls and linears[0].weight.grad is not None
    use_rule(linears, "linear")
    assert all("forward" not in m.__dict__ for m in linears)


@needs_operator
def test_the_rule_is_measured_until_the_operator_loses_then_cached_and_pinned(tmp_path):
    """Timed from 1 row up until the operator loses (the counts past it not timed), kept in the cache
    under its digest (read back unmeasured), measured again for another version of the operator; a
    resume's pinned kernels name it, or (a journal from before the rule) F.linear's every call."""
    cache = tmp_path / CACHE_FILE
    model, timed = tiny(), []
    assert choose_rows(model, cache, timer=timer_until(16, timed)) == {"fp32 rows": "matvec up to 16 rows"}
    assert timed == [1, 2, 4, 8, 16, 32]
    assert all("forward" in m.__dict__ for m in float_rows.float_linears(model))
    entry = next(v for k, v in json.loads(cache.read_text()).items() if "fp32 rows" in k)
    assert entry["rule"] == "matvec up to 16 rows" and set(entry["ms_linear_matvec"]) == {
        "1", "2", "4", "8", "16", "32"
    }  # fmt: skip

    def untimed(layers, rows):  # noqa: ANN001, ANN202
        raise AssertionError("a cached rule is not timed again")

    assert choose_rows(tiny(), cache, timer=untimed) == {"fp32 rows": "matvec up to 16 rows"}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu_matvec, "source_digest", lambda: "another")
        assert choose_rows(tiny(), cache, timer=timer_until(0)) == {"fp32 rows": "linear"}
    assert choose_rows(tiny(), cache, timer=timer_until(1000)) == {"fp32 rows": "matvec up to 16 rows"}
    assert choose_rows(tiny(), None, timer=timer_until(1000)) == {"fp32 rows": "matvec"}  # every count

    pinned = tiny()
    assert choose_rows(pinned, cache, pinned={}, timer=untimed) == {"fp32 rows": "linear"}
    assert all("forward" not in m.__dict__ for m in float_rows.float_linears(pinned))
    rule = {"fp32 rows": "matvec up to 4 rows"}
    assert choose_rows(pinned, cache, pinned=rule, timer=untimed) == rule
    assert without_linear_rules({"fp32 rows": "linear", "int8 prefill": "int8"}) == {"int8 prefill": "int8"}
    assert without_linear_rules(rule) == rule


@needs_operator
def test_prepare_for_decoding_names_the_rule_and_times_candidates_with_it(tmp_path):
    """The eager candidates are timed with their rule set (a pick measured without it is not read
    back), and the choice names the rule of the model that runs; the log line keeps its step unit."""
    seen = {}

    def timer(models):  # noqa: ANN001, ANN202
        for name, m in models.items():
            seen[name] = any("forward" in x.__dict__ for x in m.modules())
        return {name: 0.001 * (i + 1) for i, name in enumerate(sorted(models))}

    model, choice = prepare_for_decoding(
        tiny(), dtype="fp32", layout="linear", cache_dir=tmp_path, timer=timer, rows_timer=timer_until(2)
    )
    assert choice.kernels == {"fp32 rows": "matvec up to 2 rows"}
    assert all("forward" in m.__dict__ for m in float_rows.float_linears(model))
    assert "kernels fp32 rows: matvec up to 2 rows" in choice.log_line()
    model, choice = prepare_for_decoding(
        tiny(), dtype="auto", cache_dir=tmp_path, timer=timer, rows_timer=timer_until(2)
    )
    assert seen and all(seen[name] for name in seen if name.endswith("/linear"))
    assert "ms per decode step" in choice.log_line()
    _, resumed = prepare_for_decoding(
        tiny(), dtype="fp32", layout="linear", cache_dir=tmp_path, timer=timer, kernels={}
    )
    assert resumed.kernels == {"fp32 rows": "linear"}  # a journal from before the rule


@needs_operator
def test_a_streamed_trace_puts_the_rule_back():
    """A streamed package's trace puts its own forward over each Linear's and, after, the rule's back
    (the prefill of a compiled model keeps the operator)."""
    model = tiny()
    linears = float_rows.float_linears(model)
    use_rule(linears, "matvec up to 8 rows")
    rules = [m.__dict__["forward"] for m in linears]
    with ahead_of_time._streamed_linears(model):
        assert all(m.forward.func is ahead_of_time._streamed for m in linears)
    assert [m.__dict__["forward"] for m in linears] == rules
    x = torch.randn(3, 64)
    with torch.inference_mode():
        torch.testing.assert_close(linears[0](x), F.linear(x, linears[0].weight), rtol=1e-4, atol=1e-5)


@needs_operator
def test_one_preparation_decides_each_dtypes_rule_once_and_compile_auto_times_it(tmp_path):
    """Without a cache file the rule is measured once per dtype in a preparation (every candidate and
    the model returned share it); a lone candidate (dtype and layout pinned) has it set before
    compile=auto times its eager step."""
    timed: list[tuple[torch.dtype, int]] = []

    def rows_timer(layers, rows):  # noqa: ANN001, ANN202
        timed.append((layers[0].weight.dtype, rows))
        return (1.0, 0.5) if rows <= 4 else (1.0, 2.0)

    def timer(models):  # noqa: ANN001, ANN202
        return {name: 0.001 for name in models}

    _, choice = prepare_for_decoding(tiny(), dtype="auto", timer=timer, rows_timer=rows_timer)
    firsts = [dtype for dtype, rows in timed if rows == 1]
    assert len(firsts) == len(set(firsts)) and torch.float32 in firsts
    assert choice.kernels == {rule_key_of(choice.dtype): "matvec up to 4 rows"}
    seen = []

    def eager_timer(models):  # noqa: ANN001, ANN202
        seen.extend(any("forward" in m.__dict__ for m in model.modules()) for model in models.values())
        return {name: 0.001 for name in models}

    _, lone = prepare_for_decoding(
        tiny(), dtype="fp32", layout="linear", compile="auto", steps=4, cache_dir=tmp_path,
        timer=eager_timer, rows_timer=rows_timer,
    )  # fmt: skip
    assert seen == [True] and lone.kernels == {"fp32 rows": "matvec up to 4 rows"}


def rule_key_of(dtype: str) -> str:
    return f"{dtype} rows"
