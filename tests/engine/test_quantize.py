"""Weight-only int8 and int4: numerics of one layer, a whole model, `multiar quantize` (stored, reused,
stale), bf16, the packed decode layout, compile."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from conftest import TINY, copy_fixture_run
from safetensors.torch import load_model, save_model

from multiar.cli import main
from multiar.commands.generate import sample_to_files
from multiar.config import load_config
from multiar.engine.model import GPT, ModelConfig
from multiar.engine.quantize import INT8_FILE, Int4Linear, Int8Linear, quantize
from multiar.engine.quantized_prefill import ROWS, rule_rows
from multiar.training.run import train


@pytest.mark.parametrize("bf16", [True, False])
def test_int8_linear_matches_the_fp32_layer_within_quantization_error(bf16):
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96, bias=False)
    q = Int8Linear.from_linear(linear, bf16_activations=bf16)
    x = torch.randn(4, 7, 256)
    ref, out = linear(x), q(x)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    rel = (out - ref).norm() / ref.norm()
    assert rel < (0.02 if bf16 else 0.01)
    # the stored int8 weights reproduce the layer's weights to half a step of their row's scale
    w = q.weight.float() * q.scales[:, None]
    assert ((w - linear.weight).abs() <= q.scales[:, None] / 2 + 1e-7).all()


def test_a_quantized_model_keeps_its_logits_and_generates():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, block_size=64, n_layer=2, n_head=2, n_embd=64)).eval()
    q = quantize(copy.deepcopy(model), "int8")
    assert not any(isinstance(m, torch.nn.Linear) for m in q.modules())
    idx = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        a, b = model(idx), q(idx)
    assert (a - b).norm() / a.norm() < 0.03
    from multiar.engine.decode import generate

    assert [len(r) for r in generate(q, idx, 10, temperature=0.0)] == [10, 10]
    with pytest.raises(ValueError, match="unknown mode"):
        quantize(model, "int3")


def test_quantize_command_stores_int8_weights_reused_by_generate_and_reports_ppl(
    tmp_path, monkeypatch, caplog
):
    run = tmp_path / "run"
    train(
        load_config(
            "train",
            [
                "data.max_documents=300",
                f"run_dir={run}",
                "trainer.max_steps=60",
                "trainer.val_check_interval=30",
                *TINY,
            ],
        )
    )
    assert main(["quantize", f"run={run}", "eval_batches=10"]) == 0
    report = json.loads((run / "quantize.json").read_text())
    assert (run / INT8_FILE).exists() and report["val_tokens"] > 1000
    assert abs(report["ppl_change"]) < 0.01  # within 1% of fp32 on a trained model
    assert report["val_ppl_int8"] < 20  # trained: far below the 28-token uniform guess
    if hasattr(torch, "_weight_int8pack_mm"):  # scored on the kernel or dense, as measured here
        assert rule_rows(report["int8 prefill"]) in (0, *ROWS)

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again although the stored int8 weights match")

    args = [f"run={run}", "n=3", "max_new_tokens=20", "quantize=int8", "seed=3"]
    with monkeypatch.context() as m:
        m.setattr(Int8Linear, "from_linear", no_conversion)
        first = sample_to_files(load_config("generate", [*args, f"out={tmp_path / 'a'}"]))
    assert first["provenance"]["quantize"] == "int8" and first["samples"] == 3

    # new weights in the run: the stored int8 copy is stale, ignored with a warning, converted again
    from multiar.run_folder import load_run

    loaded = load_run(run)
    with torch.no_grad():
        loaded.model.norm_f.weight.mul_(1.5)
    save_model(loaded.model, str(run / "model.safetensors"))
    with caplog.at_level(logging.WARNING, logger="multiar"):
        sample_to_files(load_config("generate", [*args, f"out={tmp_path / 'b'}"]))
    assert any("made from other weights" in r.getMessage() for r in caplog.records)
    load_model(GPT(loaded.model.config), str(run / "model.safetensors"))  # still plain safetensors

    # int4: its own file, reused by generate quantize=int4, the ppl reported for it
    assert main(["quantize", f"run={run}", "mode=int4", "eval_batches=10"]) == 0
    report = json.loads((run / "quantize.json").read_text())
    assert report["mode"] == "int4" and (run / "model.int4.safetensors").exists()
    assert abs(report["ppl_change"]) < 0.05 and (run / INT8_FILE).exists()
    args4 = [f"run={run}", "n=2", "max_new_tokens=12", "quantize=int4"]
    with monkeypatch.context() as m:
        m.setattr(Int4Linear, "from_linear", no_conversion)
        fourth = sample_to_files(load_config("generate", [*args4, f"out={tmp_path / 'c'}"]))
    assert fourth["provenance"]["quantize"] == "int4" and fourth["samples"] == 2


def test_int4_codes_the_kernel_and_a_whole_model():
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 48, bias=False)
    q = Int4Linear.from_linear(linear)
    # every weight within half a step of its group's scale; the CPU kernel computes with those weights
    scale = q.scales_and_zeros[..., 0].t().repeat_interleave(32, dim=1)  # (out, in)
    assert ((q.dequantized() - linear.weight).abs() <= scale / 2 + 1e-6).all()
    x = torch.randn(3, 128)
    ref = x @ q.dequantized().t()
    with torch.no_grad():
        assert (q(x) - ref).norm() / ref.norm() < 0.01
    # the operator's scales and mins: the same weights, in bf16 (out, 2, groups), built again by pack()
    scale, low = q.scales_and_mins.float().unbind(1)  # (out, groups) each
    bf16_weight = q.codes().float().reshape(48, 4, 32) * scale[..., None] + low[..., None]
    step = q.scales_and_zeros[..., 0].max().item()  # a code's step: an offset of one code fails this
    torch.testing.assert_close(bf16_weight.reshape(48, 128), q.dequantized(), rtol=0, atol=step / 4)
    loaded = Int4Linear(128, 48)
    loaded.load_state_dict(q.state_dict())
    assert "scales_and_mins" not in q.state_dict() and torch.equal(
        loaded.pack().scales_and_mins, q.scales_and_mins
    )
    model = GPT(ModelConfig(vocab_size=40, block_size=64, n_layer=2, n_head=2, n_embd=64)).eval()
    q_model = quantize(copy.deepcopy(model), "int4")
    # a 40-token head does not fit the kernel (rows in 16s): int8 there, int4 everywhere else
    assert isinstance(q_model.lm_head, Int8Linear) and isinstance(q_model.blocks[0].attn.qkv, Int4Linear)
    idx = torch.randint(0, 40, (2, 20))
    with torch.no_grad():
        a, b = model(idx), q_model(idx)
    # measured: 0.0296 on this setup (seed 0); 0.029-0.038 over seeds 0-11
    assert (a - b).norm() / a.norm() < 0.035
    from multiar.engine.decode import generate

    assert [len(r) for r in generate(q_model, idx, 10, temperature=0.0)] == [10, 10]


def test_bf16_sampling_writes_valid_files(tmp_path):
    from Bio import SeqIO

    run = copy_fixture_run(tmp_path)
    report = sample_to_files(
        load_config(
            "generate", [f"run={run}", f"out={tmp_path / 'o'}", "n=4", "max_new_tokens=16", "dtype=bf16"]
        )
    )
    records = list(SeqIO.parse(tmp_path / "o" / "samples.fasta", "fasta"))
    assert report["samples"] == 4 and len(records) == 4 and all(len(r.seq) > 0 for r in records)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_packed_decode_layout_keeps_logits_and_greedy_output(dtype):
    from multiar.engine.decode import generate
    from multiar.engine.packed import PackedLinear, decode_layout, packs

    torch.manual_seed(1)
    model = GPT(ModelConfig(vocab_size=64, block_size=64, n_layer=2, n_head=4, n_embd=512)).eval().to(dtype)
    laid = decode_layout(copy.deepcopy(model))
    packed = [isinstance(m, PackedLinear) for m in (laid.blocks[0].attn.proj, laid.lm_head)]
    # fp32: a 512 x 512 weight is packed, the 64 x 512 head is faster through nn.Linear; bf16: all, on a
    # CPU where oneDNN packs bf16 (none on an AVX2-only one: test_fallbacks)
    if not packs(dtype):
        assert packed == [False, False]
    else:
        assert packed == ([True, False] if dtype == torch.float32 else [True, True])
        assert sum(isinstance(m, PackedLinear) for m in laid.modules()) == 2 * 4 + (dtype == torch.bfloat16)
    idx = torch.randint(0, 64, (3, 12))
    with torch.no_grad():  # one row (a mat-vec), a few rows, a whole prompt: every path oneDNN takes
        for x in (idx[:1, :1], idx[:, :5], idx):
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(laid(x), model(x), rtol=tol, atol=tol)
    if dtype == torch.float32:
        assert generate(laid, idx, 20, temperature=0.0) == generate(model, idx, 20, temperature=0.0)


def test_compile_true_samples_the_same_files(tmp_path):
    run = copy_fixture_run(tmp_path)
    # the layout pinned: left to the timing probe, a loaded machine can pick another for one of the two,
    # whose rounding moves the written ppl in its third decimal
    args = [
        f"run={run}",
        "n=2",
        "max_new_tokens=12",
        "temperature=0",
        "batch_size=2",
        "dtype=fp32",
        "layout=linear",
    ]
    sample_to_files(load_config("generate", [*args, f"out={tmp_path / 'eager'}"]))
    sample_to_files(load_config("generate", [*args, f"out={tmp_path / 'compiled'}", "compile=true"]))
    eager = (tmp_path / "eager" / "samples.fasta").read_text()
    assert (tmp_path / "compiled" / "samples.fasta").read_text() == eager


def test_compiled_decode_step_equals_eager_past_the_window_and_with_fewer_rows_than_its_cache():
    """The compiled step (engine.decode.decode_filled: decode_rows over the filled slots) after the window slid
    (the cache refilled by an eager prefill, positions starting again) and for a batch smaller than the
    cache a compiled model keeps from an earlier call."""
    from multiar.engine.decode import compile_for_sampling, generate

    torch.manual_seed(3)
    model = GPT(ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)).eval()
    compiled = compile_for_sampling(copy.deepcopy(model))
    for prompts in (
        [[1, 5, 9], [1, 7, 7, 2], [1, 3]],
        [[1, 5, 9], [1, 4]],
    ):  # 3 rows, then 2 in a 3-row cache
        expected = generate(model, prompts=prompts, max_new_tokens=40, temperature=0.0)  # slides twice
        assert generate(compiled, prompts=prompts, max_new_tokens=40, temperature=0.0) == expected


@pytest.mark.autotune  # the one compiled-step test whose graphs time their matmul kernels, as users' do
def test_compiled_decode_step_equals_eager_for_aligned_and_ragged_rows(tmp_path):
    """...and, with a clock (compile=auto's), its graph is for one row count (others step eagerly) and
    its compile and steps are timed and saved."""
    from multiar.engine.compile_choice import StepClock, read_measured
    from multiar.engine.decode import compile_for_sampling, generate

    torch.manual_seed(2)
    model = GPT(ModelConfig(vocab_size=64, block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()
    clock = StepClock(tmp_path / "decode_layout.json", "key", torch.device("cpu"), 3)
    compiled = compile_for_sampling(copy.deepcopy(model), rows=3, clock=clock)
    ragged = [[1, 5, 9, 2], [1, 7], [1, 3, 3, 8, 8, 2, 4]]
    for prompts in (ragged, [[1, 5, 9, 2]] * 3):  # per-row (B, 1) positions, then one shared position
        expected = generate(model, prompts=prompts, max_new_tokens=12, temperature=0.0)
        assert generate(compiled, prompts=prompts, max_new_tokens=12, temperature=0.0) == expected
    steps = len(clock.times)
    assert steps >= 20 and clock.compile_s > max(clock.times)
    saved = read_measured(tmp_path / "decode_layout.json", "key")
    assert saved["compile_s"] == clock.compile_s and 0 < saved["compiled_ms"] < 1e3 * clock.compile_s
    two = [[1, 5], [1, 7]]  # two rows: the eager step, not a second graph
    expected = generate(model, prompts=two, max_new_tokens=6, temperature=0.0)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert generate(compiled, prompts=two, max_new_tokens=6, temperature=0.0) == expected
    assert len(clock.times) == steps and torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    # quantized weights compose with it (compile=true quantize=int4), its keys and values in bf16 (the
    # kernel's activations): the eager reference over bf16 caches too
    int4 = quantize(copy.deepcopy(model), "int4")
    int4.cache_dtype = torch.bfloat16
    expected = generate(int4, prompts=ragged, max_new_tokens=8, temperature=0.0)
    compiled = compile_for_sampling(quantize(copy.deepcopy(model), "int4"))
    assert generate(compiled, prompts=ragged, max_new_tokens=8, temperature=0.0) == expected
    assert compiled.blocks[0].attn.kv_cache.k.dtype == torch.bfloat16
