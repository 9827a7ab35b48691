"""The measured decode layout (`multiar.engine.layout`): the choosing logic with injected timings, the
cache, the forced modes, missing kernels, quantized kernels per shape, and equal numerics of layouts.
No test times anything to assert speed (benchmarks/ do)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from multiar.engine import layout as lay
from multiar.engine.decode import generate
from multiar.engine.model import GPT, ModelConfig
from multiar.engine.packed import PackedLinear, packs
from multiar.engine.quantize import Int4Linear, Int8Linear, quantize
from multiar.engine.quantized_kernels import DequantizedLinear


def tiny_model(n_embd: int = 512) -> GPT:
    torch.manual_seed(1)
    return GPT(ModelConfig(vocab_size=64, block_size=64, n_layer=2, n_head=4, n_embd=n_embd)).eval()


def fake_timer(ms: dict[str, float], calls: list):
    def timer(models):
        calls.append(sorted(models))
        return {name: ms[name] / 1e3 for name in models}

    return timer


MS = {"fp32/linear": 3.0, "fp32/packed": 2.0, "bf16/linear": 4.0, "bf16/packed": 2.5}


@pytest.fixture
def every_packing(monkeypatch):
    """The choosing logic as on a CPU where oneDNN packs both dtypes (an AVX2-only CPU packs no bf16:
    there a bf16/packed pick is built as nn.Linear, and these tests check the choosing only)."""
    monkeypatch.setattr(lay, "packs", lambda dtype: True)


def test_auto_picks_the_fastest_measured_candidate_and_logs_the_alternatives(tmp_path, every_packing):
    calls = []
    model, choice = lay.prepare_for_decoding(tiny_model(), cache_dir=tmp_path, timer=fake_timer(MS, calls))
    assert calls == [sorted(MS)]
    assert (choice.dtype, choice.layout, choice.how) == ("fp32", "packed", "measured")
    assert model.wte.weight.dtype == torch.float32
    assert any(isinstance(m, PackedLinear) for m in model.modules())
    line = choice.log_line()
    assert "fp32/packed" in line and all(name in line for name in MS) and "\n" not in line
    assert json.loads(json.dumps(choice.as_dict()))["step_ms"]["bf16/packed"] == pytest.approx(2.5)


def test_the_cache_decides_the_second_time_and_is_keyed_by_batch_size(tmp_path, every_packing):
    calls = []
    slow_bf16 = dict(MS, **{"bf16/packed": 1.0})
    lay.prepare_for_decoding(tiny_model(), cache_dir=tmp_path, timer=fake_timer(slow_bf16, calls))
    # other timings now: the cached choice wins, nothing is measured
    model, choice = lay.prepare_for_decoding(tiny_model(), cache_dir=tmp_path, timer=fake_timer(MS, calls))
    assert len(calls) == 1 and (choice.dtype, choice.layout, choice.how) == ("bf16", "packed", "cached")
    assert model.wte.weight.dtype == torch.bfloat16
    _, other = lay.prepare_for_decoding(
        tiny_model(), batch_size=8, cache_dir=tmp_path, timer=fake_timer(MS, calls)
    )
    assert len(calls) == 2 and other.how == "measured" and other.dtype == "fp32"
    cached = json.loads((tmp_path / lay.CACHE_FILE).read_text())
    picks = [k for k in cached if "dtype=" in k]  # the float rows rules (engine.float_rows) beside them
    assert len(picks) == 2 and all("batch 1 |" in k or "batch 8 |" in k for k in picks)


def test_without_a_cache_dir_every_call_measures(tmp_path):
    calls = []
    for _ in range(2):
        lay.prepare_for_decoding(tiny_model(), timer=fake_timer(MS, calls))
    assert len(calls) == 2


@pytest.mark.parametrize(
    ("dtype", "layout", "expected"),
    [
        ("fp32", "linear", ["fp32/linear"]),
        ("bf16", "packed", ["bf16/packed"]),
        ("auto", "linear", ["bf16/linear", "fp32/linear"]),
        ("bf16", "auto", ["bf16/linear", "bf16/packed"]),
    ],
)
def test_dtype_and_layout_narrow_the_candidates(tmp_path, every_packing, dtype, layout, expected):
    calls = []
    model, choice = lay.prepare_for_decoding(
        tiny_model(), dtype=dtype, layout=layout, cache_dir=tmp_path, timer=fake_timer(MS, calls)
    )
    assert calls == ([] if len(expected) == 1 else [expected])
    assert f"{choice.dtype}/{choice.layout}" == min(expected, key=MS.get)
    assert choice.how == ("forced" if len(expected) == 1 else "measured")
    packed = any(isinstance(m, PackedLinear) for m in model.modules())
    assert packed == (choice.layout == "packed" and packs(lay.TORCH_DTYPES[choice.dtype]))
    assert model.wte.weight.dtype == lay.TORCH_DTYPES[choice.dtype]


def test_unknown_values_are_refused():
    with pytest.raises(ValueError, match="layout"):
        lay.prepare_for_decoding(tiny_model(), layout="blocked")
    with pytest.raises(ValueError, match="compile"):
        lay.prepare_for_decoding(tiny_model(), layout="packed", compile=True)


def test_without_onednn_packed_ops_the_packed_candidates_go(monkeypatch, tmp_path):
    monkeypatch.setattr(lay, "packs", lambda dtype: False)
    calls = []
    model, choice = lay.prepare_for_decoding(tiny_model(), cache_dir=tmp_path, timer=fake_timer(MS, calls))
    assert calls == [["bf16/linear", "fp32/linear"]] and choice.layout == "linear"
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
    # layout=packed asked where there is none: nn.Linear, the one candidate left
    _, forced = lay.prepare_for_decoding(
        tiny_model(), dtype="fp32", layout="packed", timer=fake_timer(MS, calls)
    )
    assert forced.layout == "linear" and len(calls) == 1


def test_every_float_layout_keeps_the_logits_and_greedy_output():
    base = tiny_model()
    idx = torch.randint(0, 64, (3, 12))
    reference = generate(base, idx, 12, temperature=0.0)
    # fp32/linear: nn.Linear's weights, its calls of a few rows through the operator where it is built
    # (engine.float_rows: the same products, summed in another order)
    for candidate, tol in [("fp32/linear", 1e-5), ("fp32/packed", 1e-5), ("bf16/packed", 2e-2)]:
        dtype, layout = candidate.split("/")
        model, _ = lay.prepare_for_decoding(copy.deepcopy(base), dtype=dtype, layout=layout)
        with torch.no_grad():
            torch.testing.assert_close(model(idx).float(), base(idx), rtol=tol, atol=tol)
        if dtype == "fp32":
            assert generate(model, idx, 12, temperature=0.0) == reference


def test_the_real_timer_measures_every_candidate():
    models = {c: lay.build_float(copy.deepcopy(tiny_model(64)), c) for c in ("fp32/linear", "bf16/packed")}
    seconds = lay.decode_step_seconds(models, batch_size=2, rounds=1)
    assert set(seconds) == set(models) and all(0 < s < math.inf for s in seconds.values())
    assert all(m.blocks[0].attn.kv_cache is None for m in models.values())  # caches released


def test_quantized_layers_take_the_faster_kernel_per_shape(tmp_path):
    base = tiny_model(64)
    q_model = quantize(copy.deepcopy(base), "int8")
    reference = q_model(torch.arange(10)[None]).detach()
    calls = []

    def layer_timer(layers, batch_size):  # bf16 wins for the 64 x 64 projections only
        calls.append(sorted(layers))
        return {n: (1e-6 if n.endswith("64x64 bf16") else 2e-6) for n in layers}

    whole = fake_timer({"int8": 2.0, "int8 per shape": 1.0}, [])  # the mix also wins on the whole model
    on_kernel = lambda layers, rows: (1.0, 2.0)  # noqa: E731 (the int8 kernel at every row count)
    model, choice = lay.prepare_for_decoding(
        q_model, cache_dir=tmp_path, layer_timer=layer_timer, timer=whole, prefill_timer=on_kernel
    )
    assert choice.layout == "int8" and choice.how == "measured"
    assert choice.kernels == {
        "int8 192x64": "int8",
        "int8 64x64": "bf16",
        "int8 384x64": "int8",
        "int8 64x192": "int8",
        "int8 prefill": "int8",  # engine.quantized_prefill: calls of many rows
    }
    assert isinstance(model.blocks[0].attn.proj, DequantizedLinear)
    assert isinstance(model.blocks[0].attn.qkv, Int8Linear)
    assert "int8 64x64: bf16" in choice.log_line()
    with torch.no_grad():
        torch.testing.assert_close(model(torch.arange(10)[None]), reference, rtol=2e-2, atol=2e-2)
    again, cached = lay.prepare_for_decoding(
        quantize(copy.deepcopy(base), "int8"), cache_dir=tmp_path, layer_timer=layer_timer
    )
    assert cached.how == "cached" and cached.kernels == choice.kernels and len(calls) == 1
    assert isinstance(again.blocks[1].attn.proj, DequantizedLinear)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_layers_may_take_the_mat_vec_operator_at_a_step_of_one_row(mode, tmp_path, monkeypatch):
    """Where engine.cpu_matvec's operators build, an int8 or int4 shape's candidates at batch 1 include
    its operator: picked where it times fastest, its layers compute what the quantized layer stands for
    (fp32 or int16 activations: closer to the dequantized weights than the bf16-activation kernels; int4's
    scales and mins in bf16, as its kernel's), a prompt's many rows still take the layer's own path; at
    batch 4 it is no candidate. A resumed run's pick of it on a machine without the operator runs the
    layer's own kernel."""
    from multiar.engine import cpu_matvec
    from multiar.engine.quantized_kernels import MatvecLinear, dequantized_weight

    if cpu_matvec.library() is None:
        pytest.skip("no C++ compiler here: quantized layers keep their own kernels")
    base = tiny_model(64)
    calls = []

    def layer_timer(layers, batch_size):  # the operator wins for the 192 x 64 projections only
        calls.append(sorted(layers))
        return {n: (1e-6 if n.endswith("192x64 matvec") else 2e-6) for n in layers}

    on_kernel = lambda layers, rows: (1.0, 2.0)  # noqa: E731 (the int8 kernel at every row count)
    whole = fake_timer({mode: 2.0, f"{mode} per shape": 1.0}, [])
    model, choice = lay.prepare_for_decoding(
        quantize(copy.deepcopy(base), mode), cache_dir=tmp_path, layer_timer=layer_timer, timer=whole,
        prefill_timer=on_kernel,
    )  # fmt: skip
    assert f"{mode} 192x64 matvec" in calls[0] and choice.kernels[f"{mode} 192x64"] == "matvec"
    qkv = model.blocks[0].attn.qkv
    assert isinstance(qkv, MatvecLinear) and isinstance(model.blocks[0].attn.proj, Int8Linear | Int4Linear)
    x = torch.randn(2, 1, 64)
    weight = dequantized_weight(qkv.layer)
    if mode == "int4":  # the operator's scales and mins are bf16 (the int4 kernel's are too)
        scale, low = qkv.layer.scales_and_mins.float().unbind(1)  # (out, groups) each
        codes = qkv.layer.codes().float().reshape(192, -1, 32)
        weight = (codes * scale[..., None] + low[..., None]).reshape(192, 64)
    # the operator: fp32 activations (int16 on a per-row scale with AVX512-VNNI or AVX2: ~2^-16 of max|x|
    # off), not the kernels' bf16 ones (~2^-9 of each)
    torch.testing.assert_close(qkv(x), x @ weight.t(), rtol=1e-4, atol=1e-4)
    prompt = torch.randn(1, 9, 64)  # 9 rows: the layer's own kernel, not the operator
    with monkeypatch.context() as patched:
        patched.setattr(cpu_matvec, f"{mode}_matvec", lambda *a: pytest.fail("9 rows ran the operator"))
        torch.testing.assert_close(qkv(prompt), qkv.layer(prompt))
    assert generate(model, [[1, 2, 3]], max_new_tokens=4, temperature=0.0)
    calls.clear()
    again = dict(cache_dir=tmp_path, layer_timer=layer_timer, timer=whole, prefill_timer=on_kernel)
    _, cached = lay.prepare_for_decoding(quantize(copy.deepcopy(base), mode), **again)
    assert cached.how == "cached" and not calls  # the pick read back
    with monkeypatch.context() as patched:  # another version of the operators: the pick measured again
        patched.setattr(cpu_matvec, "source_digest", lambda: "0" * 12)
        _, measured = lay.prepare_for_decoding(quantize(copy.deepcopy(base), mode), **again)
    assert measured.how != "cached" and len(calls) == 1 and measured.kernels == choice.kernels
    calls.clear()
    _, batch4 = lay.prepare_for_decoding(
        quantize(copy.deepcopy(base), mode), batch_size=4, layer_timer=layer_timer, timer=whole,
        prefill_timer=on_kernel,
    )  # fmt: skip
    assert not any(n.endswith("matvec") for n in calls[0]) and "matvec" not in batch4.kernels.values()
    monkeypatch.setattr(cpu_matvec, "library", lambda: None)
    pinned, _ = lay.prepare_for_decoding(quantize(copy.deepcopy(base), mode), kernels=choice.kernels)
    without = pinned.blocks[0].attn.qkv
    assert isinstance(without, MatvecLinear) and not without.on_operator
    torch.testing.assert_close(without(x), without.layer(x))


def test_per_shape_picks_that_lose_on_the_whole_model_give_way_to_its_own_kernels(tmp_path):
    """Layers timed alone favour bf16 copies, but the whole model decodes faster on its own kernels
    (the casts between neighbours a layer alone leaves out): the own kernels are kept, the whole-model
    figures logged and cached. Where the picks are all its own kernels, nothing more is timed."""
    base = tiny_model(64)
    bf16_everywhere = lambda layers, batch: {n: 0.1 if n.endswith("bf16") else 1.0 for n in layers}  # noqa: E731
    calls = []
    model, choice = lay.prepare_for_decoding(
        quantize(copy.deepcopy(base), "int4"), cache_dir=tmp_path, layer_timer=bf16_everywhere,
        timer=fake_timer({"int4": 1.0, "int4 per shape": 3.0}, calls),
        prefill_timer=lambda layers, rows: (1.0, 2.0),  # the kernel at every row count: rule "int4"
    )  # fmt: skip
    assert calls == [["int4", "int4 per shape"]] and set(choice.kernels.values()) == {"int4"}
    assert not any(isinstance(m, DequantizedLinear) for m in model.modules())
    assert choice.step_ms["model int4"] == 1.0 and "model int4 per shape 3.00" in choice.log_line()
    _, cached = lay.prepare_for_decoding(
        quantize(copy.deepcopy(base), "int4"), cache_dir=tmp_path, layer_timer=bf16_everywhere,
        timer=fake_timer({}, calls),
    )  # fmt: skip
    assert cached.how == "cached" and cached.kernels == choice.kernels and len(calls) == 1
    own_everywhere = lambda layers, batch: {n: 1.0 if n.endswith("bf16") else 0.1 for n in layers}  # noqa: E731
    _, own = lay.prepare_for_decoding(
        quantize(copy.deepcopy(base), "int8"), layer_timer=own_everywhere, timer=fake_timer({}, calls),
        prefill_timer=lambda layers, rows: (1.0, 2.0),
    )  # fmt: skip
    assert set(own.kernels.values()) == {"int8"} and len(calls) == 1  # no whole-model timing needed


def test_the_cpu_in_cache_keys_tells_apart_cpus_of_one_name(tmp_path):
    # under KVM an AVX2-only EPYC (Milan) and an AVX512-BF16 one (Genoa) are both "AMD EPYC"
    from multiar.engine.precision import cpu_model

    def cpuinfo(name: str, model: int, flags: str) -> str:
        block = f"processor\t: {{}}\nmodel name\t: {name}\ncpu family\t: 25\nmodel\t\t: {model}\nflags\t\t: {flags}\n"
        path = tmp_path / f"{model}-{len(flags)}"
        path.write_text(block.format(0) + "\n" + block.format(1))
        return cpu_model(path)

    milan = cpuinfo("AMD EPYC", 1, "fpu avx2 fma")
    genoa = cpuinfo("AMD EPYC", 17, "fpu avx2 fma avx512f avx512bw avx512_bf16")
    masked = cpuinfo("AMD EPYC", 17, "fpu avx2 fma")  # the same chip with its AVX512 hidden by the host
    assert milan.startswith("AMD EPYC (cpu family 25 model 1,") and len({milan, genoa, masked}) == 3
    assert cpuinfo("AMD EPYC", 1, "fma avx2 fpu") == milan  # flags in another order: one CPU
    assert cpu_model(tmp_path / "absent")  # no /proc/cpuinfo: the platform's name, never an error
    # an aarch64 kernel names no model: the cores' implementer and part tell a Neoverse N1 from a V1
    arm = (
        "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: {}\nCPU implementer\t: 0x41\n"
        "CPU architecture: 8\nCPU variant\t: 0x{}\nCPU part\t: 0x{}\nCPU revision\t: 1\n\n"
    )
    n1, v1, masked_n1 = tmp_path / "n1", tmp_path / "v1", tmp_path / "masked_n1"
    n1.write_text(arm.format("fp asimd aes", 3, "d0c"))
    v1.write_text(arm.format("fp asimd aes sve bf16", 1, "d40"))
    masked_n1.write_text(arm.format("fp asimd", 3, "d0c"))  # one core, a feature hidden by the host
    assert "CPU implementer 0x41 CPU variant 0x3 CPU part 0xd0c CPU revision 1" in cpu_model(n1)
    assert cpu_model(v1) != cpu_model(n1) and "CPU part 0xd40" in cpu_model(v1)
    assert cpu_model(masked_n1) != cpu_model(n1)  # the features count, as x86's flags do
