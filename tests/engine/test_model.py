"""The transformer core and the decode loop: causality, cache parity, sampling rules."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import context_sensitive

from multiar.engine.decode import generate
from multiar.engine.model import GPT, ModelConfig
from multiar.engine.sampling import ban_tokens, min_new_tokens, sample


def tiny_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    args = dict(vocab_size=37, block_size=64, n_layer=2, n_head=2, n_embd=16) | overrides
    return context_sensitive(GPT(ModelConfig(**args)).eval())


def uncached_greedy(model: GPT, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """Reference: re-run the whole sequence for every token, no cache."""
    seq = prompt
    for _ in range(n):
        nxt = model(seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    return seq[:, prompt.size(1) :]


def test_output_at_t_ignores_tokens_after_t():
    model = tiny_model()
    idx = torch.randint(0, 37, (2, 20))
    changed = idx.clone()
    changed[:, 11:] = torch.randint(0, 37, (2, 9))
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :11], b[:, :11], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 11:], b[:, 11:])


def test_kv_cache_matches_full_forward():
    model = tiny_model()
    idx = torch.randint(0, 37, (3, 24))
    with torch.no_grad():
        full = model(idx)  # (B, T, V)
        model.setup_caches(max_batch_size=3, max_seq_length=32)
        pre = model(idx[:, :10], torch.arange(10))
        steps = [model(idx[:, t : t + 1], torch.tensor([t])) for t in range(10, 24)]
        model.clear_caches()
    cached = torch.cat([pre, *steps], dim=1)
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)


def test_cached_greedy_generation_equals_uncached_reference_loop():
    model = tiny_model(seed=3)
    prompt = torch.randint(0, 37, (2, 7))
    out = generate(model, prompt, 30, temperature=0.0)
    with torch.no_grad():
        ref = uncached_greedy(model, prompt, 30)
    assert out == ref.tolist()


def test_batched_rows_match_single_row_generation():
    model = tiny_model(seed=5)
    prompts = torch.randint(0, 37, (3, 6))
    batched = generate(model, prompts, 12, temperature=0.0)
    singles = [generate(model, prompts[i : i + 1], 12, temperature=0.0)[0] for i in range(3)]
    assert batched == singles


def test_same_seed_same_samples_and_other_seed_differs():
    model = tiny_model()
    prompt = torch.zeros(4, 1, dtype=torch.long)

    def run(seed):
        return generate(
            model, prompt, 40, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(seed)
        )

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_eos_stops_a_sample_and_is_not_returned():
    model = tiny_model()

    # make token 5 overwhelmingly likely after a few steps by banning everything else after step 3
    def force_eos(ids, logits):
        if ids.size(1) >= 4:
            logits = torch.full_like(logits, float("-inf"))
            logits[:, 5] = 0
        return logits

    out = generate(
        model,
        torch.zeros(2, 1, dtype=torch.long),
        20,
        eos_id=5,
        processors=[force_eos],
        generator=torch.Generator().manual_seed(0),
        temperature=1.0,
    )
    assert all(len(row) == 3 and 5 not in row for row in out)


def test_processor_hook_bans_tokens():
    model = tiny_model()
    out = generate(
        model,
        torch.zeros(4, 1, dtype=torch.long),
        50,
        processors=[ban_tokens(range(0, 30))],
        generator=torch.Generator().manual_seed(0),
    )
    assert all(t >= 30 for row in out for t in row)


def test_sample_top_k_keeps_only_the_k_best():
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0, 3.0]]).repeat(500, 1)
    draws = sample(logits, temperature=1.0, top_k=2, generator=torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {1, 2}


def test_sample_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    draws = sample(probs.log().repeat(2000, 1), top_p=0.75, generator=torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {0, 1}
    freq = (draws == 0).float().mean().item()
    assert abs(freq - 0.5 / 0.8) < 0.05  # renormalised over the kept set


def test_temperature_zero_is_greedy():
    logits = torch.randn(8, 37)
    assert torch.equal(sample(logits, temperature=0.0), logits.argmax(-1))


@pytest.mark.parametrize("temperature", [1e30, 3.4028235677973366e38, 1e300, math.inf])
def test_a_temperature_past_float32_is_uniform_over_the_allowed_tokens_never_a_banned_one(temperature):
    logits = torch.randn(400, 6).index_fill_(-1, torch.tensor([0, 5]), float("-inf"))  # 0 and 5 banned
    draws = sample(logits, temperature=temperature, generator=torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {1, 2, 3, 4}  # float32(1e300) is inf: -inf / inf is NaN, argmax's pick


@pytest.mark.parametrize("temperature", [1e-40, 1e-30, 1e-8])
def test_a_tiny_temperature_is_greedy_never_a_banned_token(temperature):
    logits = (torch.randn(64, 6) * 50).index_fill_(-1, torch.tensor([0, 5]), float("-inf"))
    draws = sample(logits, temperature=temperature, generator=torch.Generator().manual_seed(0))
    assert torch.equal(draws, logits.argmax(-1))  # logits / 1e-40 overflowed to inf: NaN, index 0 drawn


def sliding_reference(model: GPT, prompt: list[int], n: int, keep: int) -> list[int]:
    """Reference: no cache; when the context fills block_size it restarts from the last keep ids (no BOS:
    a training window past a document's first)."""
    ctx, hist, out = list(prompt), list(prompt), []
    for _ in range(n):
        with torch.no_grad():
            t = int(model(torch.tensor([ctx]))[0, -1].argmax())
        out.append(t)
        hist.append(t)
        ctx = hist[-keep:] if len(ctx) >= model.config.block_size else [*ctx, t]
    return out


def test_generation_past_block_size_slides_the_window_like_the_reference_loop():
    model = tiny_model(seed=6, block_size=16)
    prompts = [[1, 4, 9], [1, 7, 7, 2, 30, 11, 5]]
    for keep in (None, 5):
        out = generate(model, prompts=prompts, max_new_tokens=50, temperature=0.0, window_keep=keep)
        for p, row in zip(prompts, out, strict=True):
            assert row == sliding_reference(model, p, 50, keep or 8)
    # two rows full in one step beside a row with room: each full row gets its own tail's logits
    prompts = [[1, 4, 9], [1, 7, 7, 3, 30], [1, 8, 20, 4, 11]]
    out = generate(model, prompts=prompts, max_new_tokens=40, temperature=0.0)
    assert out == [generate(model, prompts=[p], max_new_tokens=40, temperature=0.0)[0] for p in prompts]
    with pytest.raises(ValueError, match="leaves no room"):
        generate(model, torch.zeros(1, 16, dtype=torch.long), 5)


def test_weights_are_tied_and_caches_are_released():
    model = tiny_model()
    assert model.lm_head.weight is model.wte.weight
    generate(model, torch.zeros(1, 2, dtype=torch.long), 3)
    assert all(b.attn.kv_cache is None for b in model.blocks)


def test_min_new_tokens_holds_eos_back():
    model = tiny_model()

    def always_eos(ids, logits):
        logits = torch.full_like(logits, -1e4)
        logits[:, 5] = 0  # EOS is the only likely token
        return logits

    prompt = torch.zeros(3, 4, dtype=torch.long)
    kw = dict(eos_id=5, generator=torch.Generator().manual_seed(0), temperature=1.0)
    assert generate(model, prompt, 20, processors=[always_eos], **kw) == [[], [], []]
    out = generate(model, prompt, 20, processors=[always_eos, min_new_tokens(6, 4, eos_id=5)], **kw)
    assert [len(row) for row in out] == [6, 6, 6] and all(5 not in row for row in out)


def test_prompts_of_different_lengths_batched_equal_each_row_alone():
    model = tiny_model(seed=7)
    torch.manual_seed(1)
    prompts = [torch.randint(0, 37, (n,)).tolist() for n in (3, 9, 1, 6)]
    batched = generate(model, prompts=prompts, max_new_tokens=15, temperature=0.0)
    singles = [generate(model, [p], 15, temperature=0.0)[0] for p in prompts]
    assert batched == singles
    # and against the uncached reference, row by row
    with torch.no_grad():
        for p, out in zip(prompts, batched, strict=True):
            assert out == uncached_greedy(model, torch.tensor([p]), 15)[0].tolist()


def test_each_row_stops_on_its_own_and_processors_see_each_rows_ids():
    model = tiny_model(seed=2)
    seen_lengths = []

    def force_after(ids, logits):  # after 3 new tokens of a row, only EOS (5); never EOS before
        seen_lengths.append(ids.size(1))
        if ids.size(1) >= {2: 5, 4: 7}.get(int(ids[0, 0]), 99):
            logits[:] = float("-inf")
            logits[:, 5] = 0
        else:
            logits[:, 5] = float("-inf")
        return logits

    out = generate(
        model, prompts=[[2, 9], [4, 9, 9, 9]], max_new_tokens=10, eos_id=5, processors=[force_after]
    )
    assert [len(r) for r in out] == [3, 3]
    assert 2 in seen_lengths and 4 in seen_lengths  # per-row ids, not a padded batch


def test_min_p_keeps_tokens_within_a_factor_of_the_best():
    probs = torch.tensor([[0.5, 0.3, 0.12, 0.08]])
    draws = sample(probs.log().repeat(3000, 1), min_p=0.2, generator=torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {0, 1, 2}  # 0.08 < 0.2 * 0.5
    freq = (draws == 2).float().mean().item()
    assert abs(freq - 0.12 / 0.92) < 0.03


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_recent_ids():
    from multiar.engine.sampling import repetition_penalty

    ids = torch.tensor([[1, 2, 9, 9]])
    logits = torch.tensor([[1.0, 2.0, -2.0, 3.0, 0.5, 0, 0, 0, 0, 4.0]])
    out = repetition_penalty(2.0, window=3)(ids, logits.clone())  # window: ids 2, 9, 9
    expected = logits.clone()
    expected[0, 2], expected[0, 9] = -4.0, 2.0
    assert torch.equal(out, expected)


def test_stop_sequences_end_a_row_and_are_not_returned_nor_streamed():
    from multiar.engine.decode import stream

    model = tiny_model(seed=4)
    free = generate(model, torch.zeros(1, 1, dtype=torch.long), 20, temperature=0.0)[0]
    stop = free[5:7]  # the greedy continuation passes through these two ids
    cut = generate(model, torch.zeros(1, 1, dtype=torch.long), 20, temperature=0.0, stop=[stop])[0]
    first = next(i for i in range(len(free) - 1) if free[i : i + 2] == stop)
    assert cut == free[:first]
    events = list(stream(model, torch.zeros(1, 1, dtype=torch.long), 20, temperature=0.0, stop=[stop]))
    assert [e.token for e in events] == [*cut, None]


def test_a_strong_repetition_penalty_keeps_greedy_output_free_of_recent_repeats():
    model = tiny_model(seed=8)
    plain = generate(model, torch.zeros(1, 1, dtype=torch.long), 20, temperature=0.0)[0]
    assert len(set(plain)) < len(plain)  # the untrained model repeats itself
    out = generate(
        model,
        torch.zeros(1, 1, dtype=torch.long),
        20,
        temperature=0.0,
        repetition_penalty=1e6,
        repetition_window=8,
    )[0]
    seq = [0, *out]
    assert all(seq[i] not in seq[max(0, i - 8) : i] for i in range(1, len(seq)))


def test_kept_caches_are_reused_across_calls_and_match_fresh_ones():
    """A compiled model keeps its KV caches (its graphs hold on to them): later calls reuse the same
    tensors, and stale slots from an earlier, longer call never change a result."""
    from multiar.engine.decode import generate

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, block_size=48, n_layer=2, n_head=2, n_embd=32)).eval()
    prompts = [torch.randint(0, 64, (2, n)) for n in (9, 3)]
    fresh = [generate(model, p, 20, temperature=0.0) for p in prompts]
    model.keep_caches = True
    kept = [generate(model, p, 20, temperature=0.0) for p in prompts]
    cache = model.blocks[0].attn.kv_cache
    assert cache is not None and cache.k.size(2) == 48  # a kept cache on a CPU: the block size
    generate(model, torch.randint(0, 64, (1, 4)), 5)
    assert model.blocks[0].attn.kv_cache is cache
    assert kept == fresh
    model.keep_caches = False
    model.clear_caches()
    assert model.blocks[0].attn.kv_cache is None


def test_a_compiled_models_caches_on_a_cpu_are_the_block_size_so_that_jobs_share_its_step():
    """A CPU's compiled step is a package per cache shape (engine.ahead_of_time): a kept cache is the
    block size whatever a job asks; an eager model's is what it asks."""
    model = GPT(ModelConfig(vocab_size=8, block_size=1024, n_layer=1, n_head=1, n_embd=8))
    model.keep_caches = True
    for asked in (20, 700):
        model.setup_caches(1, asked)
        assert model.blocks[0].attn.kv_cache.k.size(2) == 1024 and model.max_seq_length == 1024
    model.keep_caches = False
    model.setup_caches(1, 20)
    assert model.blocks[0].attn.kv_cache.k.size(2) == 20


@pytest.fixture(params=["fused", "composed"])
def kernels(request, monkeypatch) -> str:
    """engine.training_backward's fp32 RMSNorm and SwiGLU gate on the fused C kernels (engine.cpu_kernels,
    where they build) or on its own Functions, whatever this machine's measured choice: both checked."""
    from multiar.engine import cpu_kernels

    if request.param == "fused" and cpu_kernels.library() is None:
        pytest.skip("no fused CPU kernels here (no C compiler): the composed Functions run")
    monkeypatch.setattr(cpu_kernels, "chosen", lambda op: request.param == "fused")
    return request.param


@pytest.mark.parametrize("mode", ["fp32", "autocast", "bf16"])
def test_training_rmsnorm_matches_f_rms_norm_values_and_gradients(mode, kernels):
    """Each backward of the hand-written RMSNorm: fp32 inputs (also under autocast) take the fused kernel
    or LayerNorm's kernel with a correction, bf16 ones the small ops."""
    from multiar.engine.model import RMSNorm

    torch.manual_seed(0)
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    norm = RMSNorm(48, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 7, 48, dtype=dtype, requires_grad=True)
    grad = torch.randn(3, 7, 48, dtype=dtype)
    autocast = mode == "autocast"
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with context:
        ours = norm(x)  # the hand-written backward (grad enabled, CPU)
    ours.backward(grad)
    ours_grads = x.grad.clone(), norm.weight.grad.clone()
    x.grad, norm.weight.grad = None, None
    with context:
        ref = F.rms_norm(x, (48,), norm.weight, 1e-5)
    ref.backward(grad)
    torch.testing.assert_close(ours, ref)
    if mode == "bf16":  # each rounds its own way: both as close to the fp32 gradients as bf16 allows
        wide = x.detach().float().requires_grad_(), norm.weight.detach().float().requires_grad_()
        F.rms_norm(wide[0], (48,), wide[1], 1e-5).backward(grad.float())
        for o, f in zip(ours_grads, (t.grad for t in wide), strict=True):
            torch.testing.assert_close(o.float(), f, atol=2e-2, rtol=2e-2)
    else:
        torch.testing.assert_close(ours_grads, (x.grad, norm.weight.grad))
    with torch.no_grad():  # sampling takes F.rms_norm itself
        torch.testing.assert_close(norm(x), ref)


def test_training_rmsnorm_fp32_backward_takes_any_layout_and_a_weight_of_another_dtype(kernels):
    """The fp32 backward (the fused kernel where chosen, else LayerNorm's kernel and a correction) on a
    2-D input, a transposed input, a gradient that is a transposed view, and a bf16 weight: F.rms_norm's
    gradients each time."""
    from multiar.engine.training_backward import rms_norm

    torch.manual_seed(0)
    cases = [
        (torch.randn(5, 32), torch.randn(5, 32), torch.float32),  # 2-D
        (torch.randn(6, 4, 32).transpose(0, 1), torch.randn(4, 6, 32), torch.float32),  # input a view
        (torch.randn(4, 6, 32), torch.randn(6, 4, 32).transpose(0, 1), torch.float32),  # gradient a view
        (torch.randn(4, 6, 32), torch.randn(4, 6, 32), torch.bfloat16),  # weight in bf16
    ]
    for x0, grad, wdtype in cases:
        grads = []
        for norm in (rms_norm, lambda x, w, eps: F.rms_norm(x, (32,), w.float(), eps)):
            x = x0.detach().requires_grad_()  # a fresh leaf each time, keeping x0's layout
            w = torch.randn(32, generator=torch.Generator().manual_seed(1)).to(wdtype).requires_grad_()
            norm(x, w, 1e-5).backward(grad)
            grads.append((x.grad, w.grad))
        torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_swiglu_gate_and_rotary_split_match_the_composed_ops(dtype, kernels):
    """engine.training_backward's SwiGLU gate and rotary split: the values and input gradients of the
    composed ops they replace (chunk, silu, product; split, apply_rope), in fp32 and bf16."""
    from multiar.engine.model import apply_rope, rope_cache
    from multiar.engine.training_backward import rotate_split, swiglu_gate

    torch.manual_seed(0)
    B, T, nh, hs = 2, 5, 3, 8
    exact = {} if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    freqs = torch.view_as_complex(rope_cache(T, hs, 10000.0)).unsqueeze(-2)  # (T, 1, hs/2)
    cases = {
        "swiglu": (
            torch.randn(B, T, 2 * 12, dtype=dtype),
            lambda h: swiglu_gate(h),
            lambda h: F.silu(h.chunk(2, -1)[0]) * h.chunk(2, -1)[1],
        ),
        "rotary": (
            torch.randn(B, T, 3 * nh, hs, dtype=dtype),
            # (B, nh, T, hs) each, back to (B, T, 3 * nh, hs)
            lambda qkv: torch.cat(rotate_split(qkv, freqs, nh), dim=1).transpose(1, 2),
            lambda qkv: torch.cat([apply_rope(qkv[:, :, : 2 * nh], freqs), qkv[:, :, 2 * nh :]], dim=2),
        ),
    }
    for name, (x, ours, composed) in cases.items():
        grad = torch.randn_like(ours(x))
        got_x, want_x = x.clone().requires_grad_(), x.clone().requires_grad_()
        got, want = ours(got_x), composed(want_x)
        got.backward(grad)
        want.backward(grad)
        assert got.dtype == want.dtype == dtype
        torch.testing.assert_close(got, want, msg=name, **exact)
        torch.testing.assert_close(got_x.grad, want_x.grad, msg=name, **exact)
    for used in range(3):  # q, k or v alone: the others' parts of the gradient are zeros (materialized)
        qkv = cases["rotary"][0].clone().requires_grad_()
        rotate_split(qkv, freqs, nh)[used].sum().backward()
        parts = qkv.grad.split(nh, dim=2)
        assert [bool(p.ne(0).any()) for p in parts] == [i == used for i in range(3)]


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize(("attention", "dropout"), [("sdpa", 0.0), ("matmul", 0.0), ("matmul", 0.2)])
def test_a_training_step_on_the_hand_written_backwards_equals_the_composed_ops(
    monkeypatch, autocast, attention, dropout, kernels
):
    """The eager CPU training step takes engine.training_backward's Functions (RMSNorm, SwiGLU gate,
    rotary split: each counted); with them switched off it takes the composed ops: same loss, same
    gradients, on either attention, with dropout too (the Functions draw no random numbers)."""
    import multiar.engine.model as model_module

    calls = dict.fromkeys(("rms_norm", "rotate_split", "swiglu_gate"), 0)
    for name in calls:
        real = getattr(model_module, name)

        def counting(*args, name=name, real=real):
            calls[name] += 1
            return real(*args)

        monkeypatch.setattr(model_module, name, counting)
    idx = torch.randint(0, 37, (3, 12), generator=torch.Generator().manual_seed(0))
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    results = []
    for hand in (True, False):
        if not hand:
            monkeypatch.setattr(model_module, "hand_backward", lambda t: False)
        model = tiny_model(dropout=dropout).train()
        model.attention = attention
        torch.manual_seed(1)  # the same dropout masks in both steps
        with context:
            logits = model(idx[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), idx[:, 1:].flatten())
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
        if hand:  # per block two norms, a split, a gate; the last norm
            n = model.config.n_layer
            assert calls == {"rms_norm": 2 * n + 1, "rotate_split": n, "swiglu_gate": n}
    assert sum(calls.values()) == 4 * model.config.n_layer + 1  # none taken with the switch off
    # fp32: each step is ~2e-6 from an fp64 step's gradients at most (the composed ops, the hand-written
    # ones and the fused C kernels alike), so two of them differ by up to about twice that (3.2e-6 seen
    # on a Zen 5 EPYC, the composed ops with dropout); a wrong formula is off by ~1e-2
    tolerance = dict(rtol=2e-2, atol=2e-3) if autocast else dict(rtol=1e-5, atol=5e-6)
    torch.testing.assert_close(results[0], results[1], **tolerance)


def test_a_mixed_step_equals_each_rows_own_forward():
    """forward_segments: decoding rows at their own positions and prompt chunks entering other rows (one
    from position 0 over its row's placeholder, one after earlier slots) in one forward give each row's
    logits of a forward of that row alone over its whole sequence."""
    from multiar.engine.segments import Segments

    model = tiny_model()
    seqs = [torch.randint(0, 37, (n,)) for n in (9, 5, 12, 7)]  # rows 0, 1 decode; 2, 3 take chunks
    with torch.inference_mode():
        want = [model(s[None])[0, -1] for s in seqs]  # each row alone, no cache
        model.setup_caches(4, 64)
        fill = Segments(0, torch.zeros(0, dtype=torch.long), [(0, 0, 8), (1, 0, 4), (3, 0, 3)])
        model.forward_segments(torch.cat([seqs[0][:8], seqs[1][:4], seqs[3][:3]]), fill)
        # rows 0 .. 2 decode; row 2's token is a placeholder its chunk overwrites in the same step
        step = Segments(3, torch.tensor([8, 4, 0]), [(2, 0, 12), (3, 3, 4)])
        ids = torch.cat([seqs[0][8:], seqs[1][4:], torch.tensor([5]), seqs[2], seqs[3][3:]])
        out = model.forward_segments(ids, step)
    assert out.shape == (5, 37)  # rows 0, 1, 2 (placeholder), then each chunk's last token
    for got, ref in zip(out[[0, 1, 3, 4]], want, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("amx", [False, True])
def test_bf16_weights_keep_fp32_caches_on_a_cpu_without_amx_and_bf16_ones_with_it(monkeypatch, amx):
    """The eager rule for the caches' dtype: bf16 weights on a CPU without AMX keep fp32 keys and values
    (its bf16 SDPA is the slower), with AMX bf16 ones (the faster: +2% to +15% tokens/s eager on a
    2-vCPU Xeon); fp32 weights fp32 either way, and a dtype asked for is kept. Decoding works on each."""
    import multiar.engine.precision as precision

    monkeypatch.setattr(precision, "has_amx", lambda: amx)
    bf16 = torch.bfloat16
    for weights, want in ((torch.float32, torch.float32), (bf16, bf16 if amx else torch.float32)):
        model = tiny_model().to(weights)
        model.setup_caches(1, 16)
        assert model.blocks[0].attn.kv_cache.k.dtype == want
        model.setup_caches(1, 16, kv_dtype=torch.float32)
        assert model.blocks[0].attn.kv_cache.k.dtype == torch.float32
        out = generate(model, prompts=[[1, 5, 9]], max_new_tokens=6, temperature=0.0)[0]
        assert len(out) == 6 and all(0 <= t < model.config.vocab_size for t in out)


def test_bf16_weights_write_unrounded_rotated_keys_into_the_fp32_cache_on_every_path(monkeypatch):
    """bf16 weights with fp32 keys and values (a CPU without AMX): the projection is cast to fp32 once
    and rotated there, so the eager step (generate), a mixed step (a window sliding) and the captured
    step's function (serve) write the same keys, not bf16-rounded ones (a rounding the compiled step
    skips)."""
    import multiar.engine.precision as precision
    from multiar.engine.captured_step import hidden_rows
    from multiar.engine.model import apply_rope
    from multiar.engine.segments import Segments

    monkeypatch.setattr(precision, "has_amx", lambda: False)
    model = tiny_model().to(torch.bfloat16)
    nh, hs, T = model.config.n_head, model.config.head_size, 5
    ids = torch.randint(0, 37, (T,))
    with torch.inference_mode():
        block = model.blocks[0]
        qkv = block.attn.qkv(block.norm_1(model.wte(ids))).float().view(T, 3 * nh, hs)
        freqs = torch.view_as_complex(model.rope)[:T].unsqueeze(-2)  # (T, 1, hs/2)
        want = apply_rope(qkv[None, :, nh : 2 * nh], freqs)[0]  # (T, nh, hs): k's heads, rotated in fp32
        assert not torch.allclose(want.bfloat16().float(), want, rtol=1e-5, atol=1e-6)  # rounding shows
        paths = {
            "eager": lambda: model(ids[None], 0),
            "mixed": lambda: model.forward_segments(ids, Segments(0, torch.zeros(0, dtype=torch.long), [(0, 0, T)])),
            "captured": lambda: hidden_rows(model, ids, torch.arange(T), T, torch.zeros(T, dtype=torch.long)),
        }  # fmt: skip
        for name, run in paths.items():
            model.setup_caches(1, 16)
            assert block.attn.kv_cache.k.dtype == torch.float32
            run()
            got = block.attn.kv_cache.k[0, :, :T].transpose(0, 1)  # (T, nh, hs)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
