"""compile=auto (`multiar.engine.compile_choice` and `layout.prepare_for_decoding(compile="auto")`): the
decision from a job's decode steps and this machine's measured figures, the clock that measures them, the
compiled model built from nn.Linear weights whatever the eager pick, and a failed compile leaving the
job eager. The compiler is replaced by a recorder here (the compiled step's numerics are
tests/engine/test_quantize.py's); nothing is timed to assert speed."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch

import multiar.engine.decode as decode
from multiar.engine import ahead_of_time, compiled_dtype
from multiar.engine import compile_choice as cc
from multiar.engine import layout as lay
from multiar.engine.decode import generate
from multiar.engine.model import GPT, ModelConfig
from multiar.engine.packed import PackedLinear
from multiar.engine.quantized_kernels import DequantizedLinear
from tests.engine.test_layout import MS, fake_timer, tiny_model

FIRST = cc.PAYBACK * cc.FIRST_COMPILE_S  # seconds of eager work a first compile needs
REAL_WEIGHTS_SECONDS = compiled_dtype.weights_seconds


@pytest.fixture(autouse=True)
def fp32_reads_faster(monkeypatch):
    """The compiled dtype's pass over the weights, faked: fp32 faster (tests of the dtype choice itself
    set their own figures)."""
    monkeypatch.setattr(
        compiled_dtype, "weights_seconds", lambda model, rows, names: {"fp32 linear": 1.0, "bf16 linear": 2.0}
    )


def test_unmeasured_a_first_compile_only_for_a_job_many_times_its_assumed_cost():
    eager_ms = 4.0
    steps_at_line = int(FIRST * 1e3 / eager_ms)
    assert not cc.compile_pays(steps_at_line, eager_ms, None).compile
    assert cc.compile_pays(steps_at_line + 1, eager_ms, None).compile
    line = cc.compile_pays(100, eager_ms, None).log_line()
    assert line.startswith("compile=auto: not compiling") and "not measured here yet" in line


def test_unmeasured_on_cuda_a_shorter_job_pays_for_its_graph():
    """On CUDA the compiled step is a CUDA graph (6x eager at 85M batch 1 on an H200, compiled in
    17-19 s): an 85M job of 100 samples x 256 tokens at ~5.7 ms an eager step (146 s) compiles there,
    not on a CPU's rule; measured figures decide alike on both."""
    steps, eager_ms = 100 * 256, 5.7
    assert not cc.compile_pays(steps, eager_ms, None).compile  # a CPU's rule: 4 x 60 s
    on_cuda = cc.compile_pays(steps, eager_ms, None, "cuda")
    assert on_cuda.compile and on_cuda.as_dict()["device"] == "cuda"
    assert "2.4 x 30 s (a first compile on cuda" in on_cuda.log_line()
    cuda_line = int(cc.CUDA_PAYBACK * cc.CUDA_FIRST_COMPILE_S * 1e3 / eager_ms)
    assert not cc.compile_pays(cuda_line, eager_ms, None, "cuda").compile
    measured = {"compiled_ms": 1.0, "compile_s": 20.0}
    for device in ("cpu", "cuda"):
        assert cc.compile_pays(8_511, 5.7, measured, device).compile  # 40.0 s saved > 2 x 20 s
        assert not cc.compile_pays(8_510, 5.7, measured, device).compile


def test_measured_the_saved_steps_must_repay_the_compile_margin_times():
    measured = {"compiled_ms": 2.0, "compile_s": 7.0}  # 2 ms saved a step: 7,000 steps repay it twice
    assert not cc.compile_pays(7_000, 4.0, measured).compile
    decision = cc.compile_pays(7_001, 4.0, measured)
    assert decision.compile and (decision.compiled_ms, decision.compile_s) == (2.0, 7.0)
    assert "2.00 ms compiled, measured here" in decision.log_line()
    # a compiled step no faster than eager never pays, however long the job
    assert not cc.compile_pays(10**9, 4.0, {"compiled_ms": 4.0, "compile_s": 0.1}).compile
    assert json.loads(json.dumps(decision.as_dict()))["steps"] == 7_001


def test_earlier_eager_jobs_count_as_steps_of_this_one_in_either_rule():
    """A ski rental: eager seconds noted by jobs that stayed eager count as steps of this job at its
    eager pace, unmeasured (the first compile's assumed cost) and measured (the saved steps' rule)."""
    eager_ms = 4.0
    line = int(FIRST * 1e3 / eager_ms)  # 60,000 steps of 4 ms
    before_s = (line - 100) * eager_ms / 1e3  # all but 100 steps' worth spent eagerly before
    assert not cc.compile_pays(100, eager_ms, None, eager_s_before=before_s).compile
    decision = cc.compile_pays(101, eager_ms, None, eager_s_before=before_s)
    assert decision.compile and decision.steps == 101 and decision.steps_before == line - 100
    assert f"(101 + {line - 100} steps' worth eager before) steps" in decision.log_line()
    measured = {"compiled_ms": 2.0, "compile_s": 7.0}  # 7,000 steps repay it twice
    assert not cc.compile_pays(100, eager_ms, measured, eager_s_before=6_900 * eager_ms / 1e3).compile
    assert cc.compile_pays(101, eager_ms, measured, eager_s_before=6_900 * eager_ms / 1e3).compile
    assert "eager before" not in cc.compile_pays(101, eager_ms, None).log_line()


def test_short_jobs_that_stay_eager_add_up_until_one_compiles_and_a_compile_clears_the_count(
    tmp_path, compiler, monkeypatch
):
    """prepare_for_decoding(compile="auto") on a CPU, where a compile leaves a package on disk: each job
    that stays eager notes its most steps' eager seconds under the clock's key; the job whose count with
    its own passes the first compile's assumed cost compiles, and its decision clears the count (a build
    that then fails starts it again). Where each job compiles again (no packages) nothing is noted."""
    monkeypatch.setattr(lay, "packs", lambda dtype: True)  # fp32/packed (2 ms) the eager pick on any CPU
    steps = int(FIRST * 1e3 / MS["fp32/packed"]) // 3  # a third of the line at the eager pick's 2 ms

    def job(cache_dir):
        _, choice = lay.prepare_for_decoding(
            tiny_model(), cache_dir=cache_dir, compile="auto", steps=steps, timer=fake_timer(MS, [])
        )
        return choice.compile

    decisions = [job(tmp_path) for _ in range(4)]
    assert [d["compile"] for d in decisions] == [False, False, False, True]  # 3 x a third is not past it
    assert [d["steps_before"] for d in decisions] == [0, steps, 2 * steps, 3 * steps]
    clock = compiler[0]["clock"]
    cache = tmp_path / lay.CACHE_FILE
    assert cc.eager_seconds(cache, clock.key) == 0.0  # bought
    assert job(tmp_path)["steps_before"] == 0 and cc.eager_seconds(cache, clock.key) > 0  # counting anew
    clock.compile_s, clock.times = 30.0, [0.001] * (cc.StepClock.WARM_UP + 16)
    clock.save()  # the compiled step's figures: the measured rule from here, no count carried
    assert (
        cc.eager_seconds(cache, clock.key) == 0.0 and cc.read_measured(cache, clock.key)["compile_s"] == 30.0
    )
    # torch.compile in each job (no packages ahead of time): nothing to buy once, nothing noted
    monkeypatch.setenv("MULTIAR_AHEAD_OF_TIME", "0")
    other = tmp_path / "no_packages"
    assert [job(other)["steps_before"] for _ in range(4)] == [0, 0, 0, 0]
    assert "eager_s" not in json.dumps(json.loads((other / lay.CACHE_FILE).read_text()))


def test_the_clock_saves_the_compile_and_the_median_step_after_warm_up(tmp_path, monkeypatch):
    cache = tmp_path / lay.CACHE_FILE
    clock = cc.StepClock(cache, "k", torch.device("cpu"), 1)
    times = iter([5.0] + [1.0] * cc.StepClock.WARM_UP + [0.002] * 15 + [0.003] * 20)
    clock_now = [0.0]

    def step(x):
        clock_now[0] += next(times)
        return x

    monkeypatch.setattr(cc.time, "perf_counter", lambda: clock_now[0])
    for i in range(1 + cc.StepClock.WARM_UP + 15):
        assert clock.timed(step, i) == i
    assert cc.read_measured(cache, "k") is None  # 15 steady steps: too few to say
    clock.timed(step, 0)
    saved = cc.read_measured(cache, "k")
    assert saved["compile_s"] == 5.0 and saved["compiled_ms"] == pytest.approx(2.0)
    for _ in range(16):
        clock.timed(step, 0)
    assert cc.read_measured(cache, "k")["compiled_ms"] == pytest.approx(3.0)  # saved again at 32


def test_a_package_on_disk_costs_its_load_and_the_clock_keeps_a_load_apart_from_a_build(
    tmp_path, monkeypatch
):
    """A CPU's compiled step is a package per model (engine.ahead_of_time): where these weights' package
    is still on disk, a job weighs a load's seconds, not a build's, and a short job compiles."""
    cache, now = tmp_path / lay.CACHE_FILE, [0.0]
    monkeypatch.setattr(cc.time, "perf_counter", lambda: now[0])

    def run(clock, first_s, package):
        times = iter([first_s] + [0.001] * (cc.StepClock.WARM_UP + 16))

        def step():
            now[0] += next(times)

        clock.timed(step)
        clock.package = package
        for _ in range(cc.StepClock.WARM_UP + 16):
            clock.timed(step)

    first_load = tmp_path / "first_load.json"  # a first entry from a load: a build's cost is not known
    run(cc.StepClock(first_load, "k", torch.device("cpu"), 1, "w1"), 0.05, ("loaded", "p1.pt2", 0.04))
    assert cc.read_measured(first_load, "k", "w2", lambda name: True) is None  # unmeasured for others
    assert cc.read_measured(first_load, "k", "w1", lambda name: False) is None  # and once it is pruned
    loaded_only = cc.read_measured(first_load, "k", "w1", lambda name: True)
    assert "compile_s" not in loaded_only and cc.compile_pays(256, 2.0, loaded_only).compile
    # a build: its seconds, and the load that followed it (0.03 s) with one step as the next job's load
    run(cc.StepClock(cache, "k", torch.device("cpu"), 1, "w1"), 20.0, ("built", "p1.pt2", 0.03))
    on_disk = {"p1.pt2"}.__contains__
    saved = cc.read_measured(cache, "k", "w1", on_disk)
    assert (saved["compile_s"], saved["cached"], saved["packages"]) == (20.0, True, {"w1": "p1.pt2"})
    assert saved["load_s"] == pytest.approx(0.031)
    assert "cached" not in cc.read_measured(cache, "k", "w2", on_disk)  # other weights: no package
    assert "cached" not in cc.read_measured(cache, "k", "w1", lambda name: False)  # removed since
    # 256 steps saving 1 ms each (0.26 s): not a build's 2 x 20 s, but a load's 2 x 0.031 s
    assert not cc.compile_pays(256, 2.0, cc.read_measured(cache, "k", "w2", on_disk)).compile
    assert cc.compile_pays(256, 2.0, saved).compile
    assumed = cc.compile_pays(256, 2.0, {"compiled_ms": 1.0, "compile_s": 20.0, "cached": True})
    assert not assumed.compile and assumed.compile_s == cc.LOAD_S_ASSUMED  # no load measured: 2 x 2 s
    run(cc.StepClock(cache, "k", torch.device("cpu"), 1, "w1"), 0.05, ("loaded", "p1.pt2", 0.04))
    saved = cc.read_measured(cache, "k", "w1", on_disk)
    assert (saved["compile_s"], saved["load_s"]) == (20.0, pytest.approx(0.05))  # a measured load wins
    decision = cc.compile_pays(256, 2.0, saved)
    assert decision.compile and decision.cached and decision.compile_s == pytest.approx(0.05)
    assert "2 x 0.05 s to load its package, built before" in decision.log_line()
    assert not cc.compile_pays(256, 2.0, cc.read_measured(cache, "k", "w2", on_disk)).compile
    # a first call that also built the GEMMs' other candidate and timed both (engine.ahead_of_time):
    # the next model builds one package, so those seconds are left out of the build's
    measured = cc.StepClock(cache, "k", torch.device("cpu"), 1, "w3")
    measured.spare_s = 12.0
    run(measured, 30.0, ("built", "p3.pt2", 0.03))
    assert cc.read_measured(cache, "k", "w3", {"p3.pt2"}.__contains__)["compile_s"] == pytest.approx(18.0)


@pytest.fixture
def compiler(monkeypatch):
    """compile_for_sampling replaced by a recorder of what it was given (the model returned as is)."""
    calls = []

    def record(model, rows=None, clock=None, on_failure=None, gemms=None):
        calls.append(dict(model=model, rows=rows, clock=clock, on_failure=on_failure))
        return model

    monkeypatch.setattr(decode, "compile_for_sampling", record)
    return calls


def test_auto_stays_eager_for_a_short_job_and_says_why(tmp_path, compiler):
    model, choice = lay.prepare_for_decoding(
        tiny_model(), cache_dir=tmp_path, compile="auto", steps=100, timer=fake_timer(MS, [])
    )
    assert compiler == [] and "compiled" not in choice.layout
    assert choice.compile["compile"] is False and choice.compile["eager_ms"] == pytest.approx(
        MS[f"{choice.dtype}/{choice.layout}"]
    )


def test_auto_weighs_nothing_for_a_job_of_no_steps_or_pinned_packed_weights(tmp_path, compiler):
    calls = []
    _, choice = lay.prepare_for_decoding(
        tiny_model(), cache_dir=tmp_path, compile="auto", steps=0, timer=fake_timer(MS, calls)
    )
    assert choice.compile == {} and len(calls) == 1  # the layouts timed, no eager step besides
    _, choice = lay.prepare_for_decoding(
        tiny_model(), layout="packed", compile="auto", steps=10**9, timer=fake_timer(MS, [])
    )
    assert compiler == [] and choice.compile == {} and "compiled" not in choice.layout


def test_auto_compiles_a_long_job_from_nn_linear_weights_though_packed_won_eager(
    tmp_path, compiler, monkeypatch
):
    monkeypatch.setattr(lay, "packs", lambda dtype: dtype == torch.float32)  # as on an AVX2 CPU
    timer = fake_timer(MS, [])
    steps = int(FIRST * 1e3 / MS["fp32/packed"]) + 1
    model, choice = lay.prepare_for_decoding(
        tiny_model(), batch_size=2, cache_dir=tmp_path, compile="auto", steps=steps, timer=timer
    )
    assert len(compiler) == 1 and compiler[0]["rows"] == 2 and compiler[0]["on_failure"] is not None
    assert compiler[0]["model"] is model and model.wte.weight.dtype == torch.float32
    assert not any(isinstance(m, PackedLinear) for m in model.modules())  # inductor packs itself
    assert (choice.dtype, choice.layout) == ("fp32", "linear, compiled") and choice.compile["compile"]
    # the clock's figures, once saved, decide the next job: here compiling saved nothing
    clock = compiler[0]["clock"]
    lay.write_cache(clock.cache_file, clock.key, {"compiled_ms": 2.5, "compile_s": 1.0})
    _, again = lay.prepare_for_decoding(
        tiny_model(), batch_size=2, cache_dir=tmp_path, compile="auto", steps=steps, timer=timer
    )
    assert len(compiler) == 1 and again.layout == "packed" and again.compile["compiled_ms"] == 2.5
    # another batch size is another key: unmeasured there
    _, other = lay.prepare_for_decoding(
        tiny_model(), batch_size=1, cache_dir=tmp_path, compile="auto", steps=steps, timer=timer
    )
    assert other.compile["compiled_ms"] is None and other.compile["compile"]


def reads(figures: dict[str, float], passes: list) -> object:
    """A weights timer (engine.compiled_dtype) answering figures (seconds), noting each call's model
    dtype and rows in passes."""

    def timer(model, rows, names):
        passes.append((next(model.parameters()).dtype, rows))
        return dict(figures)

    return timer


def test_a_compiled_step_takes_the_dtype_whose_weights_read_faster(tmp_path, compiler, monkeypatch):
    # as on the Zen 5 EPYC at 10.8M batch 1: eager fp32 packed a little ahead of bf16 packed (Python's
    # overhead and the noise), while a pass over bf16 weights takes half the time and the compiled bf16
    # step is the fastest by 2x: both compile settings build bf16, from the fp32 copy's pass
    monkeypatch.setattr(lay, "packs", lambda dtype: True)
    zen5 = {"fp32/linear": 3.1, "fp32/packed": 2.57, "bf16/linear": 3.3, "bf16/packed": 2.72}
    halves = {"fp32 matvec": 1e-3, "fp32 packed": 1.2e-3, "bf16 matvec": 0.5e-3, "bf16 packed": 0.75e-3}
    passes = []
    monkeypatch.setattr(compiled_dtype, "weights_seconds", reads(halves, passes))
    for compile in (True, "auto"):
        model, choice = lay.prepare_for_decoding(
            tiny_model(), compile=compile, steps=10**9, timer=fake_timer(zen5, [])
        )
        assert compiler[-1]["model"] is model and model.wte.weight.dtype == torch.bfloat16
        assert not any(isinstance(m, PackedLinear) for m in model.modules())  # inductor packs itself
        assert (choice.dtype, choice.layout) == ("bf16", "linear, compiled")
        assert choice.weights_ms == pytest.approx({k: 1e3 * v for k, v in halves.items()})
        assert "its dtype by a pass over the weights (ms: bf16 matvec 0.50" in choice.log_line()
        assert "compiled bf16/linear" in compiler[-1]["clock"].key
    assert len(compiler) == 2 and passes == [(torch.float32, 1)] * 2  # no cache: measured each time
    # a short job stays eager: the eager pick as it was, fp32 packed (its provenance says so)
    model, choice = lay.prepare_for_decoding(
        tiny_model(), compile="auto", steps=1, timer=fake_timer(zen5, [])
    )
    assert len(compiler) == 2 and model.wte.weight.dtype == torch.float32
    assert (choice.dtype, choice.layout, choice.compile["eager"]) == ("fp32", "packed", "fp32/packed")
    # where fp32's weights read faster (bf16 unpacked on an AVX2 CPU), fp32 is built whatever the eager
    # pick; kept in the cache with the eager choice: a second job reads both
    monkeypatch.setattr(lay, "packs", lambda dtype: dtype == torch.float32)
    avx2 = {"fp32/linear": 4.7, "fp32/packed": 4.2, "bf16/linear": 3.4}
    slow_bf16 = {"fp32 packed": 1e-3, "bf16 linear": 3e-3}
    monkeypatch.setattr(compiled_dtype, "weights_seconds", reads(slow_bf16, passes))
    monkeypatch.setenv("MULTIAR_AHEAD_OF_TIME", "1")  # a package per model: its clock weighs the fp32 copy
    monkeypatch.setenv("MULTIAR_CACHE", str(tmp_path))
    for _ in range(2):
        model, choice = lay.prepare_for_decoding(
            tiny_model(), compile=True, cache_dir=tmp_path, timer=fake_timer(avx2, [])
        )
        assert model.wte.weight.dtype == torch.float32 and choice.layout == "linear, compiled"
        # the package is built from the fp32 copy, not the eager bf16 pick: its digest is the clock's
        assert compiler[-1]["clock"].weights == ahead_of_time.weights_digest(model)
        assert choice.weights_ms == pytest.approx({"fp32 packed": 1.0, "bf16 linear": 3.0})
    assert len(passes) == 4  # the short job's too (its clock's key names the compiled dtype), and one here
    table = json.loads((tmp_path / lay.CACHE_FILE).read_text())
    picks = {k: v["picked"] for k, v in table.items() if "compiled dtype" in k}
    assert list(picks.values()) == ["fp32"]
    assert "fp32 packed" in next(iter(picks)) and ahead_of_time.code_digest() in next(iter(picks))
    # one dtype asked, or layout=linear pinned (no fp32 copy beside the pick): no pass, the pick's dtype
    bf16_eager = {"fp32/linear": 4.0, "fp32/packed": 5.0, "bf16/linear": 3.0, "bf16/packed": 2.0}
    for pinned in (dict(dtype="bf16"), dict(layout="linear")):
        model, choice = lay.prepare_for_decoding(
            tiny_model(), compile=True, timer=fake_timer(bf16_eager, []), **pinned
        )
        assert model.wte.weight.dtype == torch.bfloat16 and choice.dtype == "bf16" and not choice.weights_ms
    assert len(passes) == 4


def test_a_pass_over_the_weights_is_timed_through_each_kernel_a_compiled_step_may_run(monkeypatch):
    """engine.compiled_dtype's kernels and real timer on a small model: the mat-vec operator at the few
    rows a streamed package serves (where it builds and is vectorized, and a package may stream: ahead
    of time, its GEMMs measured or pinned to streamed), oneDNN's packed Linear where it packs the dtype,
    else F.linear; positive seconds for each, the model untouched."""
    from multiar.engine import cpu_matvec
    from multiar.engine.packed import PACK_ROWS, packs

    monkeypatch.setenv("MULTIAR_COMPILE_GEMMS", "auto")  # measured (the tests' conftest pins autotuned)
    monkeypatch.setenv("MULTIAR_AHEAD_OF_TIME", "1")
    streams = cpu_matvec.library() is not None and cpu_matvec.vectorized()
    model = tiny_model()
    most = ahead_of_time.OPERATOR_ROWS if streams else ahead_of_time.STREAMED_ROWS
    assert ahead_of_time.streamed_rows() == most
    for rows in (1, most + 1):
        names = {n: compiled_dtype.kernels(d, rows) for n, d in compiled_dtype.TORCH_DTYPES.items()}
        for name, dtype in compiled_dtype.TORCH_DTYPES.items():
            matvec = ["matvec"] if rows <= most and streams else []
            packed = rows <= PACK_ROWS and packs(dtype)  # past PACK_ROWS, F.linear
            assert names[name] == [*matvec, "packed" if packed else "linear"]
        seconds = REAL_WEIGHTS_SECONDS(model, rows, names)
        assert set(seconds) == {f"{n} {k}" for n, ks in names.items() for k in ks}
        assert all(s > 0 for s in seconds.values())
    assert next(model.parameters()).dtype == torch.float32
    # a step that cannot stream: no mat-vec figure to choose by
    assert "matvec" not in compiled_dtype.kernels(torch.bfloat16, 1, gemms="aten")
    monkeypatch.setenv("MULTIAR_COMPILE_GEMMS", "autotuned")
    assert "matvec" not in compiled_dtype.kernels(torch.bfloat16, 1)
    monkeypatch.setenv("MULTIAR_COMPILE_GEMMS", "streamed")
    assert ("matvec" in compiled_dtype.kernels(torch.bfloat16, 1)) == streams
    monkeypatch.setenv("MULTIAR_AHEAD_OF_TIME", "0")
    assert "matvec" not in compiled_dtype.kernels(torch.bfloat16, 1, gemms="streamed")
    monkeypatch.setenv("MULTIAR_AHEAD_OF_TIME", "1")  # scalar loops: a package streams floats in inductor's
    monkeypatch.setattr(cpu_matvec, "vectorized", lambda: False)  # loop, not the operator
    assert "matvec" not in compiled_dtype.kernels(torch.bfloat16, 1)
    assert ahead_of_time.streamed_rows() == ahead_of_time.STREAMED_ROWS


def test_compile_true_measures_for_auto_and_auto_compiles_a_quantized_models_own_kernels(tmp_path, compiler):
    from multiar.engine.quantize import Int8Linear, quantize

    lay.prepare_for_decoding(tiny_model(), cache_dir=tmp_path, compile=True, timer=fake_timer(MS, []))
    assert compiler[0]["clock"].rows == 1 and compiler[0]["rows"] is None  # true: a graph per row count
    assert compiler[0]["on_failure"] is None  # and a failed compile raises: it was asked for
    bf16_everywhere = lambda layers, batch: {n: 0.1 if n.endswith("bf16") else 1.0 for n in layers}  # noqa: E731
    eager, choice = lay.prepare_for_decoding(
        quantize(tiny_model(), "int8"), cache_dir=tmp_path, compile="auto", steps=10,
        layer_timer=bf16_everywhere, timer=fake_timer({"int8": 5.0, "int8 per shape": 4.0}, []),
    )  # fmt: skip
    rule = choice.kernels.pop("int8 prefill")  # engine.quantized_prefill's, measured here: kept by both
    assert len(compiler) == 1 and choice.layout == "int8" and set(choice.kernels.values()) == {"bf16"}
    assert isinstance(eager.blocks[0].attn.proj, DequantizedLinear)
    _, choice = lay.prepare_for_decoding(
        quantize(tiny_model(), "int8"), cache_dir=tmp_path, compile="auto", steps=10**9,
        layer_timer=bf16_everywhere, timer=fake_timer({"int8": 5.0, "int8 per shape": 4.0}, []),
    )  # fmt: skip
    compiled = compiler[1]["model"]  # quantize's kernels, none swapped for a bf16 copy
    assert isinstance(compiled.blocks[0].attn.proj, Int8Linear) and compiler[1]["rows"] == 1
    assert choice.kernels.pop("int8 prefill") == rule  # cached
    assert choice.layout == "int8, compiled" and set(choice.kernels.values()) == {"int8"}
    assert choice.compile["eager_ms"] == 5.0 and "compiled int8" in compiler[1]["clock"].key
    with pytest.raises(ValueError, match="compile='yes'"):
        lay.prepare_for_decoding(tiny_model(), compile="yes")


def test_auto_compiles_a_short_job_where_compile_true_left_these_weights_package_on_disk(
    tmp_path, compiler, monkeypatch
):
    """compile=true and compile=auto key their clocks alike, by the weights the step is built from (not
    the converted copy): what compile=true's job recorded lets a later compile=auto job of the same
    model load its package rather than stay eager; another model of the same shapes stays eager."""
    monkeypatch.setenv("MULTIAR_CACHE", str(tmp_path))
    monkeypatch.setenv("MULTIAR_AHEAD_OF_TIME", "1")
    ms = MS | {"fp32/packed": 1.0}  # packed wins eager: compiled from the fp32 spare, on nn.Linear
    digests = []
    digest = ahead_of_time.weights_digest
    monkeypatch.setattr(ahead_of_time, "weights_digest", lambda model: digests.append(1) or digest(model))
    lay.prepare_for_decoding(
        tiny_model(), cache_dir=tmp_path, compile="auto", steps=256, timer=fake_timer(ms, [])
    )
    assert digests == [] and compiler == []  # nothing measured: eager, and no weights hashed for it
    lay.prepare_for_decoding(tiny_model(), cache_dir=tmp_path, compile=True, timer=fake_timer(ms, []))
    clock = compiler[0]["clock"]
    assert clock.weights == ahead_of_time.weights_digest(tiny_model())
    name = f"{ahead_of_time.code_digest()}-p.pt2"  # what the package step reports, its build timed
    package = ahead_of_time.package_dir() / name
    package.parent.mkdir(parents=True)
    package.write_bytes(b"x")
    now = [0.0]
    times = iter([30.0] + [0.0005] * (cc.StepClock.WARM_UP + 16))  # a 30 s build, then 0.5 ms steps

    def step():
        now[0] += next(times)

    with monkeypatch.context() as m:
        m.setattr(cc.time, "perf_counter", lambda: now[0])
        clock.timed(step)
        clock.package = ("built", name, 0.02)  # as compile_for_sampling notes it after the first call
        for _ in range(cc.StepClock.WARM_UP + 16):
            clock.timed(step)

    def auto(model):
        return lay.prepare_for_decoding(
            model, cache_dir=tmp_path, compile="auto", steps=256, timer=fake_timer(ms, [])
        )[1]

    assert auto(tiny_model()).compile["cached"] and len(compiler) == 2  # 256 x 0.5 ms > 2 x 0.02 s
    other = tiny_model()
    with torch.no_grad():
        other.lm_head.weight[0, 0] += 1.0
    assert not auto(other).compile["compile"] and len(compiler) == 2  # its package was never built
    package.unlink()
    assert not auto(tiny_model()).compile["compile"]  # pruned since: a build's 30 s again
    package.write_bytes(b"x")
    monkeypatch.setattr(ahead_of_time, "code_digest", lambda: "other-code")
    assert not auto(tiny_model()).compile["compile"]  # built by other code: its name reads as gone


def test_a_package_for_any_weights_serves_another_model_of_the_kind_with_no_digest_taken(
    tmp_path, compiler, monkeypatch
):
    """A streamed package holds no weights (engine.ahead_of_time): its clock notes it for any weights of
    the config, so a compile=auto job of another model of that config weighs its load, and hashes no
    weights; not one of another config with the same layer shapes, nor with packages switched off."""
    monkeypatch.setenv("MULTIAR_CACHE", str(tmp_path))
    monkeypatch.setenv("MULTIAR_AHEAD_OF_TIME", "1")
    ms = MS | {"fp32/packed": 1.0}
    lay.prepare_for_decoding(tiny_model(), cache_dir=tmp_path, compile=True, timer=fake_timer(ms, []))
    clock = compiler[0]["clock"]
    name = f"{ahead_of_time.code_digest()}-streamed.pt2"
    (ahead_of_time.package_dir() / name).parent.mkdir(parents=True)
    (ahead_of_time.package_dir() / name).write_bytes(b"x")
    now = [0.0]
    times = iter([30.0] + [0.0005] * (cc.StepClock.WARM_UP + 16))

    def step():
        now[0] += next(times)

    with monkeypatch.context() as m:
        m.setattr(cc.time, "perf_counter", lambda: now[0])
        clock.timed(step)
        clock.package = ("built", name, 0.02)  # as decode notes a streamed one:
        clock.weights = ahead_of_time.any_weights_key(tiny_model())
        for _ in range(cc.StepClock.WARM_UP + 16):
            clock.timed(step)
    digests = []
    monkeypatch.setattr(ahead_of_time, "weights_digest", lambda model: digests.append(1) or "d")
    other = tiny_model()
    with torch.no_grad():
        other.lm_head.weight[0, 0] += 1.0
    other_copy = copy.deepcopy(other)  # prepare_for_decoding packs the model it is given
    _, choice = lay.prepare_for_decoding(
        other, cache_dir=tmp_path, compile="auto", steps=256, timer=fake_timer(ms, [])
    )
    assert choice.compile["compile"] and choice.compile["cached"] and digests == []
    assert compiler[-1]["clock"].weights == ahead_of_time.any_weights_key(other)
    longer = GPT(ModelConfig(vocab_size=64, block_size=128, n_layer=2, n_head=4, n_embd=512)).eval()
    _, choice = lay.prepare_for_decoding(
        longer, cache_dir=tmp_path, compile="auto", steps=256, timer=fake_timer(ms, [])
    )
    assert not choice.compile["compile"] and digests == [1]  # same clock key, its own config: a digest
    monkeypatch.setenv("MULTIAR_AHEAD_OF_TIME", "0")  # torch.compile's: no package to load
    _, choice = lay.prepare_for_decoding(
        copy.deepcopy(other_copy), cache_dir=tmp_path, compile="auto", steps=256, timer=fake_timer(ms, [])
    )
    assert not choice.compile["compile"] and digests == [1]
    monkeypatch.setenv("MULTIAR_AHEAD_OF_TIME", "1")
    # a frozen package noted since: under its weights' digest, beside the config's
    frozen = cc.StepClock(clock.cache_file, clock.key, torch.device("cpu"), clock.rows, "w1")
    frozen.compile_s, frozen.times, frozen.package = 30.0, [0.0005] * 20, ("built", name, 0.02)
    frozen.save()
    config = ahead_of_time.any_weights_key(other)
    assert cc.read_cache(clock.cache_file, clock.key)["packages"] == {config: name, "w1": name}


def test_a_compile_that_fails_leaves_auto_eager_with_its_samples_unchanged(tmp_path, monkeypatch, caplog):
    def broken(fn, **kwargs):
        def fails(*args):
            raise RuntimeError("no C++ compiler found\nsecond line")

        return fails

    model = tiny_model(64)
    expected = generate(copy.deepcopy(model), prompts=[[1, 5, 9]], max_new_tokens=8, temperature=0.0)
    monkeypatch.setattr(decode.torch, "compile", broken)
    monkeypatch.setattr(ahead_of_time, "_build", broken(None))  # no compiler: no package either
    steps = int(FIRST * 1e3 / 1.0) + 1
    ms = {c: 1.0 for c in MS}
    compiled, choice = lay.prepare_for_decoding(
        model, cache_dir=tmp_path, compile="auto", steps=steps, timer=fake_timer(ms, [])
    )
    assert choice.layout.endswith(", compiled")
    with caplog.at_level("WARNING", logger="multiar"):
        got = generate(compiled, prompts=[[1, 5, 9]], max_new_tokens=8, temperature=0.0)
    assert got == expected
    assert "did not compile (no C++ compiler found): decoding eagerly" in caplog.text
    assert not choice.layout.endswith(", compiled") and choice.compile["compile"] is False
    # compile=true raises it: that was asked for
    forced, _ = lay.prepare_for_decoding(tiny_model(64), compile=True, dtype="fp32", layout="linear")
    with pytest.raises(Exception, match="no C\\+\\+ compiler"):
        generate(forced, prompts=[[1, 5, 9]], max_new_tokens=2, temperature=0.0)


def test_processes_writing_the_choice_cache_at_once_keep_every_key(tmp_path):
    """write_cache from two processes at once (many short jobs noting their eager seconds): they take
    turns under a lock file, each writing its own temporary, so no key is lost and the file stays JSON."""
    cache = tmp_path / lay.CACHE_FILE
    script = (
        "import sys; from pathlib import Path; from multiar.engine.choice_cache import write_cache\n"
        "for i in range(60): write_cache(Path(sys.argv[1]), f'{sys.argv[2]} {i}', {'n': i})\n"
    )
    writers = [
        subprocess.Popen([sys.executable, "-c", script, str(cache), name], stderr=subprocess.PIPE, text=True)
        for name in ("a", "b")
    ]
    for w in writers:
        assert w.wait(timeout=120) == 0, w.stderr.read()
    table = json.loads(cache.read_text())
    assert sorted(table) == sorted(f"{name} {i}" for name in ("a", "b") for i in range(60))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temporary left behind
