"""Quantized calls of many rows: the dense path's numbers (int8, int4), which calls take it, the measured
rules (their choice, cache and pin), and prepare_for_decoding naming them among the kernels."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from multiar.engine import quantized_prefill
from multiar.engine.choice_cache import CACHE_FILE
from multiar.engine.layout import prepare_for_decoding
from multiar.engine.model import GPT, ModelConfig
from multiar.engine.quantize import Int4Linear, Int8Linear, quantize
from multiar.engine.quantized_prefill import (
    choose_prefill,
    fewest_dense_rows,
    rule_name,
    rule_rows,
    use_prefill,
)

PREFILL, ON_KERNEL = "int8 prefill", "int8"  # int8's key in DecodeChoice.kernels; its kernel-only rule

needs_kernel = pytest.mark.skipif(
    not hasattr(torch, "_weight_int8pack_mm"), reason="this torch has no int8 kernel"
)


def counting_kernel(layer: Int8Linear) -> list[int]:
    """Wrap layer's kernel: the row counts of the calls it serves."""
    calls, kernel = [], layer.kernel

    def counted(x, w, s):  # noqa: ANN001, ANN202
        calls.append(x.size(0))
        return kernel(x, w, s)

    layer.kernel = counted
    return calls


@needs_kernel
@pytest.mark.parametrize("bf16", [True, False])
def test_calls_of_many_rows_multiply_dense_with_the_kernels_numbers(bf16):
    """From dense_from rows on, a call dequantizes the weight for one GEMM (in the kernel's activation
    dtype); fewer rows, and every call when dense_from is 0, take the kernel. Both give the layer's
    numbers to the activations' rounding."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96, bias=False)
    layer = Int8Linear.from_linear(linear, bf16_activations=bf16)
    calls = counting_kernel(layer)
    x = torch.randn(40, 256)
    exact = x @ (layer.weight.float() * layer.scales[:, None]).t()  # the dequantized weight, fp32
    kernel_out = layer(x)
    layer.dense_from = 16
    small, big = layer(x[:15]), layer(x)
    assert calls == [40, 15]  # 40 rows took the dense GEMM once dense_from was set
    assert big.dtype == small.dtype == torch.float32 and big.shape == (40, 96)
    tolerance = 1e-2 if bf16 else 1e-5
    for out in (kernel_out, big):
        assert (out - exact).norm() / exact.norm() < tolerance
    assert (small - exact[:15]).norm() / exact[:15].norm() < tolerance
    layer.dense_from = 41
    layer(x)
    assert calls == [40, 15, 40]


def test_the_rule_starts_where_the_dense_gemm_wins_for_good():
    """The fewest rows from which dense is faster at that count and every larger one; a count where the
    kernel wins again resets it; none at all: 0 (the kernel always). Names round-trip."""
    t = {4: (1, 2), 8: (2, 1), 16: (3, 4), 32: (5, 3), 64: (9, 4)}  # (kernel, dense) seconds
    assert fewest_dense_rows(t) == 32  # 8 wins, 16 does not: from 32 on
    assert fewest_dense_rows({4: (1, 2), 8: (1, 2)}) == 0
    assert fewest_dense_rows({4: (2, 1), 8: (3, 1)}) == 4
    layer = Int8Linear(8, 8, bf16_activations=False)
    assert rule_name(0, layer) == ON_KERNEL and rule_rows(ON_KERNEL) == 0
    assert rule_rows(rule_name(32, layer)) == 32
    assert rule_rows("int4") == 0
    with pytest.raises(ValueError, match="prefill rule: 'fast' is not a rule"):
        rule_rows("fast")


def tiny_int8() -> GPT:
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, block_size=64, n_layer=2, n_head=2, n_embd=64)).eval()
    return quantize(model, "int8")


@needs_kernel
def test_the_rule_is_measured_once_cached_pinned_and_set_on_every_int8_layer(tmp_path):
    timed = []

    def timer(layers, rows):  # dense wins from 32 rows on
        timed.append((len(layers), rows))
        return (1.0, 2.0) if rows < 32 else (2.0, 1.0)

    model = tiny_int8()
    assert choose_prefill(model, tmp_path / CACHE_FILE, timer=timer) == {
        PREFILL: rule_name(32, model.lm_head)
    }
    # one layer per shape (qkv, the MLP's two, and one of proj and lm_head: both 64x64), every row count
    assert timed == [(4, n) for n in quantized_prefill.ROWS]
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert {m.dense_from for m in layers} == {32}
    entry = next(iter(json.loads((tmp_path / CACHE_FILE).read_text()).values()))
    assert entry["ms_kernel_dense"]["64"] == [2000.0, 1000.0] and "any batch" in next(
        iter(json.loads((tmp_path / CACHE_FILE).read_text()))
    )
    again = tiny_int8()
    assert choose_prefill(again, tmp_path / CACHE_FILE, timer=timer)[PREFILL] == rule_name(32, again.lm_head)
    assert len(timed) == len(quantized_prefill.ROWS)  # read from the cache
    # pinned: as a journal names it; a journal without it (from before the rules): the kernel
    assert choose_prefill(again, None, pinned={PREFILL: "bf16 from 8 rows"}, timer=timer) == {
        PREFILL: "bf16 from 8 rows"
    }
    assert {m.dense_from for m in again.modules() if isinstance(m, Int8Linear)} == {8}
    assert choose_prefill(again, None, pinned={}, timer=timer) == {PREFILL: ON_KERNEL}
    assert {m.dense_from for m in again.modules() if isinstance(m, Int8Linear)} == {0}
    # an int4 model: a rule for its int4 layers, and one for int8 layers where int4 cannot take the
    # shape (a 70-token head here), each measured on its own layers
    int4 = quantize(GPT(ModelConfig(vocab_size=70, block_size=64, n_layer=1, n_head=2, n_embd=64)), "int4")
    if int4.blocks[0].attn.qkv.on_kernel():  # this torch has the int4 kernel
        timed.clear()
        assert choose_prefill(int4, None, timer=timer) == {
            "int8 prefill": rule_name(32, int4.lm_head),
            "int4 prefill": rule_name(32, int4.blocks[0].attn.qkv),
        }
        assert [m.dense_from for m in int4.modules() if isinstance(m, Int8Linear)] == [32]
        assert {m.dense_from for m in int4.modules() if isinstance(m, Int4Linear)} == {32}
        assert [n for n, r in timed if r == 4] == [1, 4]  # the head; int4's qkv, proj and the MLP's two


@needs_kernel
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_calls_below_the_dense_count_run_the_operator_where_it_beats_the_kernel(mode, tmp_path, monkeypatch):
    """Where the layers have an operator, the timer gives its seconds too; where it beats the kernel at
    the fewest rows timed the rule is "matvec, <dtype> from N rows": calls below N run the operator (its
    product, not the kernel's), from N the dense GEMM. Where it loses there, the kernel's rule as before.
    A "matvec" rule (a resumed run's) where the operators do not build leaves the kernel."""
    from multiar.engine import cpu_matvec
    from multiar.engine.quantized_prefill import operator_matvec

    if cpu_matvec.library() is None:
        pytest.skip("no C++ compiler here: no operator")
    torch.manual_seed(0)
    model = quantize(
        GPT(ModelConfig(vocab_size=64, block_size=64, n_layer=1, n_head=2, n_embd=64)).eval(), mode
    )
    layers = quantized_prefill._layers(model, mode)
    if not layers[0].on_kernel():
        pytest.skip(f"this torch has no {mode} kernel")
    ran = []  # the operator's calls while rows_seconds times it (it looks the operator up when called)
    operator_fn = getattr(cpu_matvec, f"{mode}_matvec")
    monkeypatch.setattr(cpu_matvec, f"{mode}_matvec", lambda *args: ran.append(1) or operator_fn(*args))
    assert len(quantized_prefill.rows_seconds(layers[:1], 4, rounds=1)) == 3 and len(ran) == 2
    monkeypatch.setattr(cpu_matvec, f"{mode}_matvec", operator_fn)
    key = f"{mode} prefill"

    def operator_wins(layers, rows):  # (kernel, dense, operator): the operator below 64 rows, then dense
        return (3.0, 2.0 if rows >= 64 else 4.0, 1.0 if rows < 64 else 2.5)

    rule = choose_prefill(model, tmp_path / CACHE_FILE, timer=operator_wins)[key]
    assert (
        rule == rule_name(64, layers[0], operator=True)
        and rule.startswith("matvec, ")
        and rule.endswith(" from 64 rows")
    )
    assert all(m.operator is not None and m.dense_from == 64 for m in layers)
    entry = next(iter(json.loads((tmp_path / CACHE_FILE).read_text()).values()))
    assert entry["rule"] == rule and entry["ms_kernel_dense_matvec"]["4"] == [3000.0, 4000.0, 1000.0]

    def untimed(layers, rows):
        pytest.fail("a cached rule was measured again")

    def kernel_wins(layers, rows):  # the operator slower than the kernel at 4 rows
        return (1.0, 2.0 if rows < 64 else 0.5, 1.5)

    assert choose_prefill(model, tmp_path / CACHE_FILE, timer=untimed)[key] == rule
    with monkeypatch.context() as patched:  # another version of the operators: measured again
        patched.setattr(cpu_matvec, "source_digest", lambda: "0" * 12)
        assert choose_prefill(model, tmp_path / CACHE_FILE, timer=kernel_wins)[key] == rule_name(
            64, layers[0]
        )
    # the first rule, still under its own key: read back and set on the layers again
    assert choose_prefill(model, tmp_path / CACHE_FILE, timer=untimed)[key] == rule
    layer = layers[0]
    layer.kernel = lambda *args: pytest.fail("the kernel ran")
    x = torch.randn(8, layer.in_features)
    with torch.inference_mode():
        assert torch.equal(layer(x), operator_matvec(layer, x))  # 8 rows: the operator
        operator, layer.operator = layer.operator, lambda *args: pytest.fail("64 rows ran the operator")
        layer(torch.randn(64, layer.in_features))  # 64 rows: dense
        layer.operator = operator

    assert choose_prefill(model, None, timer=kernel_wins)[key] == rule_name(64, layer)
    assert all(m.operator is None and m.dense_from == 64 for m in layers)

    def kernel_wins_at_16(layers, rows):  # the operator faster at 4 and 8 rows only: the kernel below 64
        return (1.0 if rows >= 16 else 3.0, 0.5 if rows >= 64 else 4.0, 2.0)

    assert choose_prefill(model, None, timer=kernel_wins_at_16)[key] == rule_name(64, layer)
    assert all(m.operator is None for m in layers)
    assert rule_rows("matvec") == 0 and rule_rows("matvec, fp32 from 64 rows") == 64
    assert quantized_prefill.on_operator("matvec") and not quantized_prefill.on_operator(ON_KERNEL)
    with pytest.raises(ValueError, match="not a rule"):
        rule_rows("matvec, fast")
    monkeypatch.setattr(cpu_matvec, "library", lambda: None)
    use_prefill(model, mode, "matvec")
    assert all(m.operator is None and m.dense_from == 0 for m in layers)


@needs_kernel
def test_prepare_for_decoding_names_the_rule_among_the_kernels_and_a_pin_keeps_it(tmp_path):
    """The rule rides in DecodeChoice.kernels (the log line, generate.json, a resume's journal); pinned
    kernels from a journal without it (written before it existed) keep every call on the kernel."""
    dense_from_4 = lambda layers, rows: (2.0, 1.0)  # noqa: E731
    model, choice = prepare_for_decoding(
        tiny_int8(),
        cache_dir=tmp_path,
        prefill_timer=dense_from_4,
        layer_timer=lambda layers, b: dict.fromkeys(layers, 1.0),
    )
    assert choice.kernels[PREFILL] == rule_name(4, model.lm_head) and PREFILL in choice.log_line()
    assert {m.dense_from for m in model.modules() if isinstance(m, Int8Linear)} == {4}
    shapes = {s: k for s, k in choice.kernels.items() if s != PREFILL}
    resumed, again = prepare_for_decoding(tiny_int8(), cache_dir=tmp_path, kernels=shapes)
    assert again.how == "forced" and again.kernels[PREFILL] == ON_KERNEL
    assert {m.dense_from for m in resumed.modules() if isinstance(m, Int8Linear)} == {0}
    pinned, kept = prepare_for_decoding(tiny_int8(), cache_dir=tmp_path, kernels=dict(choice.kernels))
    assert kept.kernels == choice.kernels and {
        m.dense_from for m in pinned.modules() if isinstance(m, Int8Linear)
    } == {4}


@needs_kernel
def test_a_prefill_on_the_dense_path_gives_the_kernels_logits_and_the_same_greedy_tokens():
    """A whole model's prompt through the dense path against the kernel: logits to bf16's rounding."""
    model = tiny_int8()
    prompt = torch.randint(3, 64, (2, 24))
    calls = counting_kernel(model.lm_head)
    with torch.inference_mode():
        model.setup_caches(2, 64)
        on_kernel = model(prompt, 0).float()
        use_prefill(model, "int8", rule_name(8, model.lm_head))
        dense = model(prompt, 0).float()
    assert (dense - on_kernel).abs().max() < 0.05 * on_kernel.abs().max()
    assert calls == [48]  # the 2 x 24 rows on the kernel, then dense
    dense_copy = copy.deepcopy(model)
    assert {m.dense_from for m in dense_copy.modules() if isinstance(m, Int8Linear)} == {8}


@needs_kernel
def test_a_graph_of_dynamic_rows_keeps_the_kernel_without_a_guard_on_the_rule():
    """A compiled call (serve's captured steps: rows dynamic) traces the kernel, and does not compare
    its symbolic row count with dense_from: no recompile when the rows pass it."""
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(torch.nn.Linear(64, 32, bias=False), bf16_activations=True)
    layer.dense_from = 16
    graphs = []

    def backend(gm, example_inputs):  # noqa: ANN001, ANN202
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(layer, backend=backend, dynamic=True)
    with torch.inference_mode():
        x = torch.randn(40, 64)
        small, big = compiled(x[:4].clone()), compiled(x)  # not a view: dynamo guards a view's base
        layer.dense_from = 0
        on_kernel = layer(x)
    assert len(graphs) == 1  # one graph for 4 and 40 rows
    assert torch.equal(big, on_kernel) and torch.equal(small, on_kernel[:4])


def test_a_journal_from_before_the_rule_keeps_its_digest_and_a_bad_cached_rule_is_measured_again(tmp_path):
    """Runs that decoded every call on the kernel hash as journals written before the rule did (their
    kernels without it), so they resume; another rule is another digest. A cache entry that is not a
    rule (edited by hand) is measured again."""
    from omegaconf import OmegaConf

    from multiar.commands.resume import settings_digest

    cfg = OmegaConf.create({"run": "r", "quantize": "int8"})
    shapes = {"int8 192x64": "int8"}

    def digest(kernels: dict) -> str:
        return settings_digest(cfg, {"dtype": "fp32", "layout": "int8", "kernels": kernels})

    assert (
        digest(shapes)
        == digest(shapes | {PREFILL: ON_KERNEL})
        != digest(shapes | {PREFILL: "bf16 from 16 rows"})
    )
    table = tmp_path / CACHE_FILE
    choose_prefill(tiny_int8(), table, timer=lambda layers, rows: (1.0, 2.0))
    key = next(iter(json.loads(table.read_text())))
    table.write_text(json.dumps({key: {"format": 2, "rule": "fast"}}))
    model = tiny_int8()
    # the rule's dtype is the layers' activations': bf16 where the CPU has bf16 (quantize's default),
    # else fp32
    layer = next(m for m in model.modules() if isinstance(m, Int8Linear))
    assert choose_prefill(model, table, timer=lambda layers, rows: (2.0, 1.0)) == {
        PREFILL: rule_name(4, layer)
    }


@pytest.mark.skipif(not hasattr(torch, "_weight_int4pack_mm_for_cpu"), reason="this torch has no int4 kernel")
def test_int4_calls_of_many_rows_multiply_its_bf16_dequantized_weight():
    """int4's dense path: the codes dequantized in bf16 (the weight the kernel multiplies, to bf16's
    rounding), from dense_from rows on; fewer rows on the kernel."""
    torch.manual_seed(0)
    layer = Int4Linear.from_linear(torch.nn.Linear(128, 64, bias=False))
    if not layer.on_kernel():
        pytest.skip("no int4 kernel on this CPU's torch")
    exact = layer.dequantized()
    torch.testing.assert_close(layer.bf16_dequantized().float(), exact, rtol=1e-2, atol=1e-3)
    calls, kernel = [], layer.kernel
    layer.kernel = lambda *a: calls.append(a[0].size(0)) or kernel(*a)
    x = torch.randn(40, 128)
    on_kernel = layer(x)
    layer.dense_from = 16
    dense, few = layer(x), layer(x[:8].clone())
    assert calls == [40, 8]
    reference = x @ exact.t()
    for out in (on_kernel, dense, torch.cat([few, on_kernel[8:]])):
        assert out.dtype == torch.float32 and (out - reference).norm() / reference.norm() < 1e-2
