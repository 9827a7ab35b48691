"""The CPU's compiled decode step as a package built ahead of time (engine.ahead_of_time): built once,
loaded by the next job, keyed by what its code depends on, reading the model's own KV caches."""

from __future__ import annotations

import copy
import json
import logging
import os
import time
import zipfile
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from multiar.engine import ahead_of_time, cpu_matvec, huge_pages
from multiar.engine.ahead_of_time import AheadOfTimeStep, package_dir, package_key
from multiar.engine.compile_choice import ANY_WEIGHTS, StepClock
from multiar.engine.decode import compile_for_sampling, generate, makes_bf16_keys
from multiar.engine.model import GPT, ModelConfig
from multiar.engine.quantize import Int4Linear, Int8Linear, quantize

PROMPTS = [[1, 5, 9], [2, 7, 7, 3]]
OTHERS = [[4, 4, 20], [30, 1, 6, 6]]  # a later job's prompts: the package must not remember the first's
SWITCHES = dict(cpp_wrapper=True, autotune=True, cuda_graphs=False)


def tiny(seed: int = 6, width: int = 16) -> GPT:
    """A tiny model whose next token depends on its context (at the default init it hardly does); at
    width 32 (and 48 ids) every layer takes int4."""
    torch.manual_seed(seed)
    vocab = 37 if width == 16 else 48
    model = GPT(ModelConfig(vocab_size=vocab, block_size=32, n_layer=2, n_head=2, n_embd=width)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model


def dequantized(quantized: GPT, seed: int, width: int = 16) -> GPT:
    """tiny(seed, width) with each Linear the weight its quantized layer stands for in the operator (int4:
    scales and mins in bf16; lm_head untied from the embedding, which keeps its fp32 table)."""
    dense = tiny(seed=seed, width=width)
    for name, layer in quantized.named_modules():
        if isinstance(layer, Int8Linear):
            weight = layer.weight.float() * layer.scales[:, None]
        elif isinstance(layer, Int4Linear):
            scale, low = layer.scales_and_mins.float().unbind(1)  # (out, groups) each
            codes = layer.codes().float().reshape(layer.out_features, -1, 32)
            weight = (codes * scale[..., None] + low[..., None]).reshape(layer.out_features, -1)
        else:
            continue
        dense.get_submodule(name).weight = nn.Parameter(weight, requires_grad=False)
    return dense


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MULTIAR_CACHE", str(tmp_path))
    monkeypatch.setenv("MULTIAR_AHEAD_OF_TIME", "1")
    return tmp_path / "decode_steps"


def operator_calls(package: Path) -> dict[str, int]:
    """The operators outside ATen a package's C++ calls through the dispatcher (its wrapper's extern
    nodes), by name: "multiar::matvec": 9."""
    with zipfile.ZipFile(package) as archive:  # no such file where it calls none
        names = [n for n in archive.namelist() if n.endswith(".wrapper.json")]
        nodes = [node for n in names for node in json.loads(archive.read(n)).get("nodes", [])]
    return dict(Counter(node["node"]["target"] for node in nodes))


def greedy(model: GPT, prompts: list[list[int]] = PROMPTS) -> list[list[int]]:
    return generate(model, prompts, max_new_tokens=12, temperature=0.0)


def test_a_package_is_built_once_loaded_by_the_next_job_and_reads_the_models_caches(own_cache, caplog):
    """Greedy output equals the eager model's (prefill eager, then the package's steps over the same
    caches, its attention through the operator), with new cache tensors too; the next job (a fresh step,
    as in a new process) loads the package rather than building it."""
    model = tiny()
    expected = greedy(model)
    first = compile_for_sampling(copy.deepcopy(model))
    assert isinstance(first.compiled_step, AheadOfTimeStep)
    with caplog.at_level(logging.INFO, logger="multiar"):
        assert greedy(first) == expected
    assert (first.compiled_step.built, first.compiled_step.loaded) == (1, 0)
    assert first.compiled_step.fallback is None  # the package ran, not torch.compile's step
    assert "ahead-of-time decode step: built" in caplog.text
    (package,) = own_cache.glob("*.pt2")
    assert package.name.startswith(f"{ahead_of_time.code_digest()}-") and ahead_of_time.on_disk(package.name)
    assert not list(own_cache.glob(".*"))  # no temporary left
    # whatever its GEMMs, its attention is engine.cpu_matvec's operator where that builds
    built = cpu_matvec.library() is not None
    assert operator_calls(package) == ({"multiar::decode_attention": 2} if built else {})
    first.keep_caches = False
    first.clear_caches()  # the next job's caches are new tensors: handed to the package again
    first.keep_caches = True
    assert greedy(first, OTHERS) == greedy(model, OTHERS)
    assert first.compiled_step.built == 1
    second = compile_for_sampling(copy.deepcopy(model))
    assert greedy(second, OTHERS) == greedy(model, OTHERS)
    assert (second.compiled_step.built, second.compiled_step.loaded) == (0, 1)
    assert second.compiled_step.fallback is None
    assert second.compiled_step.last[:2] == ("loaded", package.name)


def test_the_key_follows_weights_settings_rows_and_switches_not_the_caches_contents(own_cache, monkeypatch):
    model = tiny()
    model.setup_caches(2, 16)
    key = package_key(model, 2, SWITCHES)
    assert package_key(copy.deepcopy(model), 2, SWITCHES) == key  # the same weights in another model
    for block in model.blocks:
        block.attn.kv_cache.k.normal_()  # what a job wrote: not the package's business
    assert package_key(model, 2, SWITCHES) == key
    assert package_key(model, 1, SWITCHES) != key
    assert package_key(model, 2, SWITCHES | {"autotune": False}) != key
    with torch.no_grad():
        model.blocks[1].mlp.down.weight[0, 0] += 1e-3
    assert package_key(model, 2, SWITCHES) != key
    bf16, fp32 = (quantize(tiny(), "int8", bf16_activations=b) for b in (True, False))
    assert package_key(bf16, 1, SWITCHES) != package_key(fp32, 1, SWITCHES)  # the same int8 tensors
    monkeypatch.setattr(cpu_matvec, "library", lambda: Path("operators.so"))
    built = package_key(model, 2, SWITCHES)
    monkeypatch.setattr(cpu_matvec, "library", lambda: None)  # its attention is inductor's ops then
    assert package_key(model, 2, SWITCHES) != built


@pytest.mark.slow  # three compiles (~35 s on 2 cores)
def test_a_corrupt_package_is_built_again_and_a_failed_build_compiles_with_torch_compile(
    own_cache, monkeypatch, caplog
):
    model = tiny(seed=7)
    expected = greedy(model)
    assert greedy(compile_for_sampling(copy.deepcopy(model))) == expected
    (package,) = own_cache.glob("*.pt2")
    package.write_bytes(b"not a zip archive")
    again = compile_for_sampling(copy.deepcopy(model))
    with caplog.at_level(logging.WARNING, logger="multiar"):
        assert greedy(again) == expected
    assert "could not be loaded" in caplog.text and again.compiled_step.built == 1
    assert package.stat().st_size > 1000

    def fails(*args):
        raise RuntimeError("Unsupported: data-dependent control flow\nmore lines")

    monkeypatch.setattr(ahead_of_time, "_build", fails)
    caplog.clear()
    fallback = compile_for_sampling(tiny(seed=8))
    with caplog.at_level(logging.WARNING, logger="multiar"):
        assert greedy(fallback) == greedy(tiny(seed=8))
    assert fallback.compiled_step.fallback is not None and fallback.compiled_step.built == 0
    warned = [r.message for r in caplog.records if "ahead-of-time" in r.message]
    assert warned == [
        "ahead-of-time decode step: not used (Unsupported: data-dependent control flow): compiling with"
        " torch.compile instead"
    ]


def test_the_least_recently_used_packages_go_past_keep(own_cache):
    own_cache.mkdir(parents=True)
    now = time.time()
    for i in range(5):
        path = own_cache / f"{i}.pt2"
        path.write_bytes(b"x")
        os.utime(path, (now - 100 * i, now - 100 * i))  # 0.pt2 the newest
    building = own_cache / ".5.abc.pt2"  # another process's build in progress, the oldest file
    building.write_bytes(b"x")
    os.utime(building, (now - 1000, now - 1000))
    ahead_of_time._prune(own_cache, keep=3)
    assert sorted(p.name for p in own_cache.glob("*.pt2")) == [".5.abc.pt2", "0.pt2", "1.pt2", "2.pt2"]


@pytest.mark.slow  # a build and a compile (~19 s)
def test_a_package_without_the_models_cache_names_is_not_run_over_its_own_caches(
    own_cache, monkeypatch, caplog
):
    """Cache names the package lacks would be skipped by the loader, the package then reading its own
    zeroed caches: an error, and the step falls back to torch.compile with the right samples."""
    model = tiny(seed=9)
    expected = greedy(model)
    renamed = ahead_of_time._caches
    monkeypatch.setattr(
        ahead_of_time, "_caches", lambda m: {k.replace("kv_cache", "kv"): v for k, v in renamed(m).items()}
    )
    compiled = compile_for_sampling(copy.deepcopy(model))
    with caplog.at_level(logging.WARNING, logger="multiar"):
        assert greedy(compiled) == expected
    assert compiled.compiled_step.fallback is not None
    assert "not used (the package has no constant model.blocks.0.attn.kv.k)" in caplog.text


def test_switched_off_the_step_is_torch_compiles(own_cache, monkeypatch):
    monkeypatch.setenv("MULTIAR_AHEAD_OF_TIME", "0")
    assert not isinstance(compile_for_sampling(tiny()).compiled_step, AheadOfTimeStep)
    assert package_dir() == own_cache


def test_a_streamed_package_is_picked_within_three_percent_of_the_fastest_step():
    """The fastest candidate's GEMMs, but streamed where its step is within 3% of it (its package loads
    without the weights' digest: session 44's 85M step, 5.08 ms streamed against 5.02 autotuned)."""
    pick = ahead_of_time.pick_gemms
    assert pick({"autotuned": 5.02, "aten": 9.58, "streamed": 5.08}) == "streamed"
    assert pick({"autotuned": 5.0, "aten": 9.58, "streamed": 5.16}) == "autotuned"  # 3.2% slower
    assert pick({"autotuned": 5.2, "aten": 5.0, "streamed": 5.1}) == "streamed"  # the fastest itself
    assert pick({"autotuned": 5.0, "aten": 4.9}) == "aten"  # no streamed candidate (more rows)


def test_the_gemms_are_measured_once_recorded_and_pinnable(own_cache, monkeypatch, caplog):
    """With MULTIAR_COMPILE_GEMMS=auto the first job builds a package per candidate, times their steps in
    turns and keeps the fastest (greedy output still the eager model's), the others' packages deleted; the
    pick is recorded for the machine and model kind, so the next job loads that package alone. A pinned
    value (a resumed run's, over the environment's) builds that one; a candidate that fails is left out, nothing recorded; an unknown value is an
    error naming the variable."""
    monkeypatch.setenv("MULTIAR_COMPILE_GEMMS", "auto")
    rows = len(PROMPTS)
    model = tiny(seed=8)
    first = compile_for_sampling(copy.deepcopy(model))
    with caplog.at_level(logging.INFO, logger="multiar"):
        assert greedy(first) == greedy(model)
    step = first.compiled_step
    names = ahead_of_time.candidates(first, rows)
    assert names == ["autotuned", "aten", "streamed"]  # 2 rows: the multiply-and-sum Linears too
    assert (step.built, step.fallback) == (3, None)
    assert set(step.gemms["step_ms"]) == set(names)
    picked = step.gemms["gemms"]
    assert picked == ahead_of_time.pick_gemms(step.gemms["step_ms"])
    assert f"ahead-of-time decode step: {picked} GEMMs, measured" in caplog.text
    package = f"{package_key(first, rows, SWITCHES | ahead_of_time.GEMMS[picked])}.pt2"
    assert step.last[:2] == ("built", package)  # what compile=auto's clock notes: the pick's package
    assert step.spare_s > 0  # the other candidates' builds and the timing: the clock leaves them out
    assert [p.name for p in own_cache.glob("*.pt2")] == [package]  # the other candidates' deleted
    second = compile_for_sampling(copy.deepcopy(model))  # the recorded pick loaded, nothing measured
    assert greedy(second) == greedy(model)
    assert (second.compiled_step.built, second.compiled_step.loaded) == (0, 1)
    assert second.compiled_step.gemms == {"gemms": picked} and second.compiled_step.spare_s == 0.0
    unpicked = next(name for name in ahead_of_time.GEMMS if name != picked)
    monkeypatch.setenv("MULTIAR_COMPILE_GEMMS", picked)
    other = tiny(seed=9)
    pinned = compile_for_sampling(copy.deepcopy(other), gemms=unpicked)  # a resume's pin wins over the env
    assert greedy(pinned) == greedy(other)
    switches = SWITCHES | ahead_of_time.GEMMS[unpicked]
    assert pinned.compiled_step.last[1] == f"{package_key(pinned, rows, switches)}.pt2"
    # the record gone, the other candidates failing: the picked package (on disk) runs, nothing recorded
    monkeypatch.setenv("MULTIAR_COMPILE_GEMMS", "auto")
    (own_cache.parent / "decode_layout.json").unlink()
    real = AheadOfTimeStep._runner

    def failing(self, model, rows, gemms, weights=None):
        if gemms != picked:
            raise RuntimeError("no such kernel")
        return real(self, model, rows, gemms, weights)

    monkeypatch.setattr(AheadOfTimeStep, "_runner", failing)
    third = compile_for_sampling(copy.deepcopy(model))
    assert greedy(third) == greedy(model)
    assert (third.compiled_step.loaded, third.compiled_step.fallback) == (1, None)
    assert third.compiled_step.gemms["gemms"] == picked
    assert not (own_cache.parent / "decode_layout.json").exists()
    monkeypatch.setenv("MULTIAR_COMPILE_GEMMS", "fastest")
    with pytest.raises(ValueError, match="MULTIAR_COMPILE_GEMMS='fastest'"):
        compile_for_sampling(copy.deepcopy(other))
    with pytest.raises(ValueError, match="gemms='fastest'"):
        compile_for_sampling(copy.deepcopy(other), gemms="fastest")


def test_streamed_linears_are_candidates_at_a_few_float_rows_and_decode_as_the_eager_model(
    own_cache, monkeypatch
):
    """A Linear streamed (through the mat-vec operator, or without it a multiply-and-sum, summed in fp32)
    computes what it computes, and the streamed
    package decodes greedily as the eager model does in fp32 (and runs in bf16), and, holding no weights,
    serves another model of the same kind unbuilt; without the operators it is timed at up to STREAMED_ROWS rows only (with them, streamed_rows()), and not for a model
    whose layers are all quantized; the Linears' own forward is back after the trace."""
    monkeypatch.setenv("MULTIAR_COMPILE_GEMMS", "streamed")
    linear = nn.Linear(24, 40, bias=True)
    x = torch.randn(3, 1, 24)
    bf16 = copy.deepcopy(linear).to(torch.bfloat16)
    for library in (cpu_matvec.library, lambda: None):
        with monkeypatch.context() as patch:
            patch.setattr(cpu_matvec, "library", library)
            torch.testing.assert_close(ahead_of_time._streamed(linear, x), linear(x), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(
                ahead_of_time._streamed(bf16, x.bfloat16()), bf16(x.bfloat16()), rtol=0.02, atol=0.02
            )
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny(seed=10).to(dtype)
        compiled = compile_for_sampling(copy.deepcopy(model))
        tokens = greedy(compiled)
        # bf16: the eager model keeps fp32 keys on a CPU without AMX, the compiled step bf16 ones
        assert tokens == greedy(model) if dtype == torch.float32 else list(map(len, tokens)) == [12, 12]
        assert compiled.compiled_step.gemms == {"gemms": "streamed"}
        assert compiled.compiled_step.fallback is None
        # fp32 and bf16 Linears call engine.cpu_matvec's operator (where it builds), and each layer's
        # attention its own
        calls = operator_calls(own_cache / compiled.compiled_step.last[1])
        built = cpu_matvec.library() is not None
        want = {"multiar::matvec": 9} if built else {}  # 2 x (qkv, proj, up, down), head
        assert calls == want | ({"multiar::decode_attention": 2} if built else {})
        linears = [m for m in compiled.modules() if isinstance(m, nn.Linear)]
        assert linears and all("forward" not in vars(m) for m in linears)  # the class's forward again
        streamed = package_key(compiled, len(PROMPTS), SWITCHES | ahead_of_time.GEMMS["streamed"])
        assert streamed != package_key(compiled, len(PROMPTS), SWITCHES | ahead_of_time.GEMMS["aten"])
    # it holds no weights: another model of the kind (other weights) loads it and decodes as itself, and
    # compile=auto's clock notes it for any weights; the weights it is handed are in huge-page regions
    # where the kernel has them (tiny ones too here: placed before the package is bound to them)
    other = tiny(seed=11)
    clock = StepClock(None, "k", torch.device("cpu"), len(PROMPTS), weights="a digest")
    monkeypatch.setattr(huge_pages, "MIN_BYTES", 0)
    monkeypatch.setenv("MULTIAR_HUGE_PAGES", "1")
    again = compile_for_sampling(copy.deepcopy(other), rows=len(PROMPTS), clock=clock)
    assert all(map(huge_pages.placed, again.parameters())) == huge_pages.available()
    assert greedy(again) == greedy(other) != greedy(tiny(seed=10))
    with torch.no_grad():  # the package reads the placed tensors themselves: zeroed, every logit is 0
        again.norm_f.weight.zero_()
    assert greedy(again) == [[0] * 12, [0] * 12]
    assert (again.compiled_step.built, again.compiled_step.loaded) == (0, 1)
    assert clock.weights == ahead_of_time.any_weights_key(other) and clock.weights.startswith(ANY_WEIGHTS)
    assert clock.package[:2] == ("loaded", again.compiled_step.last[1])
    # pinned where it is no candidate (an int4 model's own kernels where the operators do not build):
    # measured instead, not forced
    monkeypatch.setattr(cpu_matvec, "library", lambda: None)
    quantized = compile_for_sampling(quantize(tiny(seed=12, width=32), "int4"), rows=len(PROMPTS))
    greedy(quantized)
    assert quantized.compiled_step.gemms["gemms"] != "streamed" and quantized.compiled_step.fallback is None
    model = tiny(seed=10)
    assert ahead_of_time.streamed_rows() == ahead_of_time.STREAMED_ROWS  # no operators: inductor's loop
    assert ahead_of_time.candidates(model, ahead_of_time.STREAMED_ROWS) == list(ahead_of_time.GEMMS)
    assert "streamed" not in ahead_of_time.candidates(model, ahead_of_time.STREAMED_ROWS + 1)
    assert "streamed" not in ahead_of_time.candidates(quantize(tiny(width=32), "int4"), 1)  # its own kernels


def test_a_streamed_int8_package_on_bf16_activations_gives_its_dequantized_weights_logits(
    own_cache, monkeypatch
):
    """int8 with bf16 activations (an AMX or AVX512-BF16 CPU's default), streamed: the prompt's rows run
    the int8 kernel on bf16 activations into bf16 KV caches, the package's steps the operator on them.
    Fed the same tokens, its logits are an fp32 model's of the dequantized weights within bf16's rounding
    (0.061 at logits up to 4.1, AMX Xeon; with the scales 1% off, 0.19): the rounding, not a wrong scale,
    layout or cache dtype."""
    if cpu_matvec.library() is None:
        pytest.skip("no C++ compiler here: quantized layers keep their own kernels")
    monkeypatch.setenv("MULTIAR_COMPILE_GEMMS", "streamed")
    quantized = quantize(tiny(seed=13), "int8", bf16_activations=True)
    dense = dequantized(quantized, seed=13)
    compiled = compile_for_sampling(copy.deepcopy(quantized), rows=1)
    prompt = [2, 7, 7, 3, 1, 5, 9, 4]
    tokens = generate(compiled, [prompt], max_new_tokens=12, temperature=0.0)[0]

    def forced(model: GPT) -> torch.Tensor:
        """The prompt in one pass, then the tokens one a step -> (13, V): the logits after each."""
        with torch.inference_mode():
            model.setup_caches(1, len(prompt) + len(tokens))
            logits = [model(torch.tensor([prompt]), input_pos=0)[:, -1]]
            for i, token in enumerate(tokens[:-1]):
                logits.append(model(torch.tensor([[token]]), input_pos=len(prompt) + i)[:, -1])
        return torch.cat(logits)

    ran = forced(compiled)
    step = compiled.compiled_step
    assert (step.gemms["gemms"], step.fallback) == ("streamed", None)
    assert compiled.blocks[0].attn.kv_cache.k.dtype == torch.bfloat16
    assert operator_calls(own_cache / step.last[1]) == {
        "multiar::int8_matvec": 9,
        "multiar::decode_attention": 2,
    }
    torch.testing.assert_close(ran, forced(dense), atol=0.12, rtol=0)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_streamed_quantized_layers_run_the_mat_vec_operator_and_decode_as_their_dequantized_weights(
    mode, own_cache, monkeypatch
):
    """With engine.cpu_matvec's operators built, an int8 or int4 model's streamed package calls its
    operator for every quantized layer (fp32 or int16 activations times the codes, scaled after the sum or
    per group): it decodes greedily as the eager model whose layers call the same operator does; int8's
    steps give an fp32 model's logits, of the weights the operator reads, within the activations'
    rounding (int4's rounding of them weighs more: each code's term is larger than the weight it adds up to
    with the group's min), holds no weights (another model of the kind loads it
    unbuilt), and is a candidate at a few rows only; without the operators it is none."""
    from multiar.engine.quantized_kernels import _use_kernels, own_kernels

    if cpu_matvec.library() is None:
        pytest.skip("no C++ compiler here: quantized layers keep their own kernels")
    monkeypatch.setenv("MULTIAR_COMPILE_GEMMS", "streamed")
    width = 16 if mode == "int8" else 32  # int4: every layer (tiny's docstring)

    def on_operator(quantized: GPT) -> GPT:
        """A copy whose quantized layers all call their operator (MatvecLinear), eagerly, into the KV
        caches the package's steps read (bf16 where the kernels' activations are: compile_for_sampling's
        rule)."""
        model = copy.deepcopy(quantized)
        model.cache_dtype = torch.bfloat16 if makes_bf16_keys(quantized) else None
        _use_kernels(
            model, dict.fromkeys(own_kernels([m for m in model.modules() if isinstance(m, layers)]), "matvec")
        )
        return model

    def stepwise(model: GPT, ids: torch.Tensor) -> torch.Tensor:
        """ids (1, T) fed one token a step through the cache -> logits (1, T, V), each from one row."""
        model.setup_caches(1, ids.size(1), kv_dtype=torch.float32)
        with torch.no_grad():
            return torch.cat([model(ids[:, t : t + 1], input_pos=t) for t in range(ids.size(1))], 1)

    def expected(quantized: GPT, seed: int) -> list:
        eager = on_operator(quantized)
        tokens = greedy(eager)
        if mode == "int8":
            # along its own tokens, each step's logits (one row: the operator) are the dequantized
            # model's within the int16 activations' rounding (4.4e-4 on the AMX Xeon; with the weights'
            # scales 1e-4 off, 1.6e-3). Greedy tokens are no test of that: the prompt's rows run the
            # kernel, whose activations are rounded otherwise
            dense = dequantized(quantized, seed, width)
            for prompt, new in zip(PROMPTS, tokens, strict=True):
                ids = torch.tensor([prompt + new])
                torch.testing.assert_close(stepwise(eager, ids), stepwise(dense, ids), atol=1e-3, rtol=0)
        return tokens

    layers = Int8Linear if mode == "int8" else Int4Linear
    # int8's kernel on fp32 activations, as on a CPU without bf16: with bf16 ones (the AMX Xeon's default)
    # the prompt's rows, on the kernel, and the steps' on the operator part by ~1e-2 in the logits, and this
    # tiny model's greedy tokens parted at a near tie (a gap of 4e-4 to 1.7e-3) between the package and
    # the eager model
    bf16_activations = False if mode == "int8" else None
    quantized = quantize(tiny(seed=13, width=width), mode, bf16_activations=bf16_activations)
    assert all(isinstance(m, layers) for m in quantized.modules() if isinstance(m, Int8Linear | Int4Linear))
    # where the operators' loops are vectors they stream its layers: a candidate up to OPERATOR_ROWS rows
    most = ahead_of_time.OPERATOR_ROWS if cpu_matvec.vectorized() else ahead_of_time.STREAMED_ROWS
    assert ahead_of_time.streamed_rows() == most
    assert ahead_of_time.candidates(quantized, most)[-1] == "streamed"
    assert "streamed" not in ahead_of_time.candidates(quantized, most + 1)
    compiled = compile_for_sampling(copy.deepcopy(quantized), rows=len(PROMPTS))
    assert greedy(compiled) == expected(quantized, 13)
    step = compiled.compiled_step
    assert (step.gemms, step.fallback, step.any_weights, step.built) == ({"gemms": "streamed"}, None, True, 1)
    assert operator_calls(own_cache / step.last[1]) == {
        f"multiar::{mode}_matvec": 9,
        "multiar::decode_attention": 2,
    }
    assert all("forward" not in vars(m) for m in compiled.modules() if isinstance(m, layers))
    other = quantize(tiny(seed=14, width=width), mode, bf16_activations=bf16_activations)
    again = compile_for_sampling(copy.deepcopy(other), rows=len(PROMPTS))
    assert greedy(again) == expected(other, 14)
    assert (again.compiled_step.built, again.compiled_step.loaded) == (0, 1)
    # without the operators: no streamed candidate for quantized layers, and a bf16 or fp32 model's streamed
    # package (the multiply-and-sum then, and attend_rows's attention) is another file than the one that
    # calls them
    streamed = SWITCHES | ahead_of_time.GEMMS["streamed"]
    models = [tiny(seed=15).to(torch.bfloat16), tiny(seed=15)]
    with_operators = [package_key(model, len(PROMPTS), streamed) for model in models]
    monkeypatch.setattr(cpu_matvec, "library", lambda: None)
    assert "streamed" not in ahead_of_time.candidates(quantized, 1)
    for model, key in zip(models, with_operators, strict=True):
        assert package_key(model, len(PROMPTS), streamed) != key
