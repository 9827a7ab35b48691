"""The decoding rows' attention of a mixed step: attend_rows is SDPA with each row's mask; the compiled way
and the operator give the SDPA way's logits for rows at any positions (one row, a row at position 0, a
prompt chunk beside them), the compiled one never compiling again once built; the choice is measured,
cached and narrowed."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from multiar.engine import cpu_matvec, rows_attention
from multiar.engine.choice_cache import write_cache
from multiar.engine.model import GPT, ModelConfig
from multiar.engine.rows_attention import (
    RowsAttention,
    attend_rows,
    build_way,
    cache_key,
    choose_rows_attention,
    operator_attend,
)
from multiar.engine.segments import Segments
from multiar.errors import first_line


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=40, block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()


@pytest.fixture(scope="module")
def operator(model) -> RowsAttention:
    if cpu_matvec.library() is None:
        pytest.skip("no C++ compiler here: serve measures SDPA and the compiled way")
    return build_way(model, "operator")


@pytest.fixture(scope="module")
def compiled(model) -> RowsAttention:
    torch._dynamo.reset()  # graphs other tests compiled for attend_rows would hide a gap in the warm-up
    try:
        return build_way(model, "compiled")
    except Exception as err:  # noqa: BLE001 (inductor needs a C++ compiler; serve then measures SDPA alone)
        pytest.skip(f"torch.compile does not run here: {first_line(err)}")


def test_attend_rows_is_sdpa_with_each_rows_mask():
    torch.manual_seed(1)
    d, nh, n, hs = 5, 3, 11, 8
    q, k, v = torch.randn(d, nh, hs), torch.randn(d, nh, n, hs), torch.randn(d, nh, n, hs)
    positions = torch.tensor([0, 10, 3, 7, 5])
    mask = (torch.arange(n)[None] <= positions[:, None])[:, None, None]  # (d, 1, 1, n)
    want = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask)[:, :, 0]
    assert torch.allclose(attend_rows(q, k, v, positions), want, atol=1e-6)
    # bf16 keys and values: read as they are, attended in fp32
    got = attend_rows(q, k.bfloat16(), v.bfloat16(), positions)
    assert got.dtype == torch.float32 and torch.allclose(got, want, atol=0.05)


def mixed_step_logits(
    model: GPT, way: RowsAttention, rows: int, positions: list[int], chunk: bool = True
) -> torch.Tensor:
    """A prompt's worth of history for each row, then one mixed step: `rows` decoding rows at their
    positions and (chunk) a 5-id prompt chunk entering row `rows`; without one the cache has just the
    decoding rows (a view of all of it when a row is at the last position)."""
    torch.manual_seed(2)
    cache_rows = rows + 1 if chunk else rows
    model.setup_caches(max_batch_size=cache_rows, max_seq_length=64, kv_dtype=way.kv_dtype)
    with torch.inference_mode():
        for b, p in enumerate(positions):  # each row's earlier ids, as a chunk of its own
            if p:
                model.forward_segments(
                    torch.randint(3, 40, (p,)), Segments(0, torch.zeros(0, dtype=torch.long), [(b, 0, p)])
                )
        ids = torch.randint(3, 40, (rows + 5 * chunk,))
        step = Segments(rows, torch.tensor(positions), [(rows, 0, 5)] if chunk else [], way.attend)
        return model.forward_segments(ids, step)


CASES = {
    "four rows": ([9, 0, 30, 4], True),
    "one row": ([17], True),
    "position 0": ([0], True),
    "a row at the last position": ([63, 5], True),
    "every cache row, one at the last position": ([63, 1, 2, 3], False),
    "one row at the last position": ([63], False),
}


@pytest.mark.parametrize("case", CASES)
def test_compiled_way_gives_the_sdpa_ways_logits(model, compiled, case):
    positions, chunk = CASES[case]
    sdpa = build_way(model, "sdpa")
    want = mixed_step_logits(model, sdpa, len(positions), positions, chunk)
    with torch.compiler.set_stance("fail_on_recompile"):  # built once: a step never compiles again
        got = mixed_step_logits(model, compiled, len(positions), positions, chunk)
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_operator_way_gives_the_sdpa_ways_logits(model, operator, case):
    positions, chunk = CASES[case]
    want = mixed_step_logits(model, build_way(model, "sdpa"), len(positions), positions, chunk)
    got = mixed_step_logits(model, operator, len(positions), positions, chunk)
    assert operator.kv_dtype == torch.float32 and torch.allclose(got, want, atol=1e-5)


def test_operator_way_over_a_bf16_cache_gives_sdpas_logits_with_bf16_weights(model, operator, monkeypatch):
    """As the compiled way: bf16 weights, keys and values kept in bf16 and attended in fp32."""
    import multiar.engine.precision as precision

    monkeypatch.setattr(precision, "has_amx", lambda: False)
    half = copy.deepcopy(model).to(torch.bfloat16)
    way = build_way(half, "operator")
    assert way.kv_dtype == torch.bfloat16
    want = mixed_step_logits(half, build_way(half, "sdpa"), 4, [9, 0, 30, 4])
    got = mixed_step_logits(half, way, 4, [9, 0, 30, 4])
    assert got.dtype == torch.bfloat16 and torch.allclose(got.float(), want.float(), atol=0.05)


def test_compiled_way_over_a_bf16_cache_gives_sdpas_logits_with_bf16_weights(model, monkeypatch):
    """bf16 weights: the compiled way keeps keys and values in bf16 (what the projections give), SDPA
    in fp32 (a CPU without AMX: the rule pinned, so every machine checks the same); the same values
    either way, attended in fp32."""
    import multiar.engine.precision as precision

    monkeypatch.setattr(precision, "has_amx", lambda: False)
    half = copy.deepcopy(model).to(torch.bfloat16)
    try:
        compiled = build_way(half, "compiled")
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"torch.compile does not run here: {first_line(err)}")
    assert compiled.kv_dtype == torch.bfloat16
    want = mixed_step_logits(half, build_way(half, "sdpa"), 4, [9, 0, 30, 4])
    got = mixed_step_logits(half, compiled, 4, [9, 0, 30, 4])
    assert torch.allclose(got.float(), want.float(), atol=0.05)


def test_choice_is_measured_cached_and_narrowed(model, tmp_path, monkeypatch):
    """The fastest of the ways that run here, cached once every way that applies was timed (an entry of
    fewer ways, from before a way was added, is measured again; the operator does not apply off a CPU's
    fp32 and bf16); a way that cannot run is left out, and forcing it is an error."""
    cache = tmp_path / "decode_layout.json"
    timed = []

    def timer(ways):
        timed.append(sorted(ways))
        return {w: {"sdpa": 0.004, "compiled": 0.002, "operator": 0.003}[w] for w in ways}

    monkeypatch.setattr(rows_attention, "compiled_attend_rows", lambda *a: lambda *b: None)
    monkeypatch.setattr(rows_attention, "operator_runs", lambda keys: True)
    picked = choose_rows_attention(model, 16, "auto", cache, timer)
    assert (picked.way, picked.how, picked.step_ms) == (
        "compiled",
        "measured",
        {"sdpa": 4.0, "compiled": 2.0, "operator": 3.0},
    )
    assert picked.kv_dtype == torch.float32 and "compiled 2.00, operator 3.00, sdpa 4.00" in picked.log_line()
    again = choose_rows_attention(model, 16, "auto", cache, timer)
    assert (again.way, again.how, len(timed)) == ("compiled", "cached", 1)
    assert choose_rows_attention(model, 8, "auto", cache, timer).how == "measured"  # another slot count
    write_cache(
        cache, cache_key(model, 12), {"picked": "compiled", "step_ms": {"sdpa": 4.0, "compiled": 2.0}}
    )
    assert choose_rows_attention(model, 12, "auto", cache, timer).how == "measured"  # two ways' entry
    assert choose_rows_attention(model, 12, "auto", cache, timer).how == "cached"
    # fp16 weights (or a GPU): the operator does not apply, so a pick of the other two is cached
    fp16 = copy.deepcopy(model).half()
    assert choose_rows_attention(fp16, 16, "auto", cache, timer).how == "measured"
    assert timed[-1] == ["compiled", "sdpa"]
    assert choose_rows_attention(fp16, 16, "auto", cache, timer).how == "cached"
    forced = choose_rows_attention(model, 16, "sdpa", cache, timer)
    assert (forced.way, forced.how, forced.attend, forced.kv_dtype) == ("sdpa", "forced", None, None)
    operator = choose_rows_attention(model, 16, "operator", cache, timer)
    assert (operator.way, operator.attend, operator.kv_dtype) == ("operator", operator_attend, torch.float32)

    def no_compiler(*_):
        raise RuntimeError("InductorError: no C++ compiler\nmore")

    monkeypatch.setattr(rows_attention, "compiled_attend_rows", no_compiler)
    monkeypatch.setattr(rows_attention, "operator_runs", lambda keys: False)
    alone = choose_rows_attention(model, 4, "auto", cache, timer)
    assert (alone.way, alone.how, timed[-1]) == ("sdpa", "measured", ["sdpa"])
    assert choose_rows_attention(model, 4, "auto", cache, timer).how == "measured"  # not cached
    with pytest.raises(RuntimeError, match="no C"):
        choose_rows_attention(model, 4, "compiled", cache, timer)
    with pytest.raises(RuntimeError, match="the attention operator does not run here"):
        choose_rows_attention(model, 4, "operator", cache, timer)
    with pytest.raises(ValueError, match="auto, sdpa, compiled or operator"):
        choose_rows_attention(model, 4, "flash", cache, timer)
