"""The decode loop's edges: a row whose processors ban every token ends at that step, a draw never picks
a token of probability 0 (whatever its number; a checked row's race never races one to the top) and
follows its distribution, the window slid past block_size is one the packer could produce, and
compiled graphs fall back when one of inductor's private switches is missing."""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch

from multiar.data.packing import pack
from multiar.engine.decode import generate, stream
from multiar.engine.model import GPT, ModelConfig
from multiar.engine.sampling import ban_tokens, draw, flat_at_zeros, race, sample

PAD, BOS, EOS = 0, 1, 2
SPECIAL = ban_tokens([PAD, BOS, EOS])  # generated ids never look like a document's ends


def tiny(seed: int = 6, block_size: int = 16, vocab: int = 37) -> GPT:
    """A tiny model whose next token depends on its context (at the default init it hardly does)."""
    torch.manual_seed(seed)
    model = GPT(ModelConfig(vocab_size=vocab, block_size=block_size, n_layer=2, n_head=2, n_embd=16)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:  # embeddings and linears; the norms stay at 1
                p.normal_(0.0, 0.3)
    return model


def ban_all_at(prompt_second_id: int, length: int):
    """A processor that bans every token for the row whose second id is prompt_second_id once it holds
    `length` ids (called on the whole batch or row by row)."""

    def processor(ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if ids.size(1) == length:
            logits[ids[:, 1] == prompt_second_id] = float("-inf")
        return logits

    return processor


def events_by_row(events) -> tuple[list[list[int]], list[str | None]]:
    rows: dict[int, list[int]] = {}
    ends: dict[int, str | None] = {}
    for e in events:
        assert e.row not in ends, "a row yielded after it ended"
        if e.token is None:
            ends[e.row] = e.end
        else:
            rows.setdefault(e.row, []).append(e.token)
    n = max(ends) + 1
    return [rows.get(b, []) for b in range(n)], [ends.get(b) for b in range(n)]


# --- item 9: every token banned ---------------------------------------------------------------------


@pytest.mark.parametrize("prompts", [[[1, 5, 9], [1, 4, 7]], [[1, 5, 9], [1, 4]]], ids=["aligned", "ragged"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_row_with_every_token_banned_ends_at_that_step_and_the_others_go_on(prompts, temperature):
    model = tiny(block_size=64)
    dead_at = len(prompts[1]) + 2  # row 1 has two new tokens when its processors ban everything
    common = dict(temperature=temperature, stop=[[90, 91]])  # a stop sequence: one token held back
    events = list(
        stream(
            model,
            prompts,
            10,
            processors=[SPECIAL, ban_all_at(4, dead_at)],
            generator=torch.Generator().manual_seed(3),
            **common,
        )
    )
    rows, ends = events_by_row(events)
    assert ends == ["length", "no_valid_token"]
    assert len(rows[0]) == 10 and len(rows[1]) == 2  # nothing drawn from the all-banned distribution
    # the others are untouched: the same draws as without the dead row's processor
    alone = generate(
        model,
        prompts=prompts,
        max_new_tokens=10,
        processors=[SPECIAL],
        generator=torch.Generator().manual_seed(3),
        **common,
    )
    assert rows[0] == alone[0] and rows[1] == alone[1][:2]


def test_zero_noise_never_races_a_zero_probability_token_to_the_top(monkeypatch):
    # an exponential sample of exactly 0 made p / noise 0/0 = NaN, which argmax takes as the largest
    monkeypatch.setattr(torch.Tensor, "exponential_", lambda self, *a, **k: self.zero_())
    probs = torch.tensor([[0.0, 0.3, 0.7, 0.0], [0.5, 0.0, 0.0, 0.5]])
    assert race(probs).argmax(-1).tolist()[0] == 2 and race(probs).argmax(-1).tolist()[1] in (0, 3)


@pytest.mark.parametrize("u", [0.0, 0.3, 0.5, 0.7, 1.0 - 2**-53])
def test_a_draw_never_picks_a_zero_probability_token_whatever_its_number(monkeypatch, u):
    """draw inverts each row's cumulative distribution at a uniform number: at its ends (0, the largest
    below 1) and at the boundaries between tokens, a token of probability 0 is never the one picked."""
    real = torch.rand
    monkeypatch.setattr(torch, "rand", lambda *a, **k: real(*a, **k).fill_(u))
    probs = torch.tensor([[0.0, 0.3, 0.0, 0.7, 0.0], [0.5, 0.0, 0.0, 0.5, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0]])
    picked = draw(probs).tolist()
    assert all(probs[b, t] > 0 for b, t in enumerate(picked)), picked
    assert picked[0] == (1 if u <= 0.3 else 3) and picked[2] == 2


def test_sums_held_flat_skip_a_zero_probability_token_when_they_wobble():
    """A device that sums in another order (a GPU) can leave a zero-probability token a rounding step's
    width in the cumulative sums: held flat (what a draw off the CPU does), no number picks it."""
    probs = torch.tensor([[0.5, 0.0, 0.5]], dtype=torch.float64)
    wobbly = probs.cumsum(-1)
    wobbly[..., 1] += 1e-9
    u = torch.full((1, 1), 0.5 + 1e-10, dtype=torch.float64)
    assert torch.searchsorted(wobbly, u, right=True).tolist() == [[1]]  # the wobble alone picks it
    assert torch.searchsorted(flat_at_zeros(wobbly, probs), u, right=True).tolist() == [[2]]


def test_a_draw_follows_its_distribution():
    """10,000 draws of one row land on each token about as often as its probability says."""
    probs = torch.tensor([0.05, 0.0, 0.25, 0.1, 0.0, 0.6]).expand(10_000, 6)
    counts = torch.bincount(draw(probs, torch.Generator().manual_seed(0)), minlength=6) / 10_000
    assert counts[1] == counts[4] == 0
    assert torch.allclose(counts, probs[0], atol=0.015), counts


# --- item 10: the slid window is a training window -------------------------------------------------


def tail_window(hist: list[int], keep: int, starts: list[bool] | None) -> list[int]:
    """What the packer could put at a window's start: the last keep ids, from the first flagged id."""
    tail = hist[-keep:]
    if starts is not None:
        first = next((j for j, i in enumerate(tail) if starts[i]), 0)
        tail = tail[first:]
    return tail


def sliding_reference(
    model: GPT, prompt: list[int], n: int, keep: int, starts: list[bool] | None, seed: int
) -> list[int]:
    """Reference without a cache, sampling as stream does: when the context fills block_size it restarts
    from the row's tail."""
    ctx, hist, out = list(prompt), list(prompt), []
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        with torch.no_grad():
            logits = SPECIAL(torch.tensor([ctx]), model(torch.tensor([ctx]))[:, -1])
        t = int(sample(logits, 1.0, generator=g)[0])
        out.append(t)
        hist.append(t)
        ctx = tail_window(hist, keep, starts) if len(ctx) >= model.config.block_size else [*ctx, t]
    return out


def capture_prefills(model: GPT) -> list[dict[int, list[int]]]:
    """Record each prefill's contexts (row -> its ids, padding cut) as the model is fed them: a prefill of
    every row, or a mixed step's chunks (the rows whose window slid while the others decoded)."""
    calls: list[dict[int, list[int]]] = []
    eager, mixed = model.forward, model.forward_segments

    def forward(idx, input_pos=None, **kwargs):
        if isinstance(input_pos, int) and input_pos == 0 and idx.size(1) > 1:
            at = kwargs.get("logits_at")
            ends = at.tolist() if isinstance(at, torch.Tensor) else [idx.size(1) - 1] * idx.size(0)
            calls.append({b: row[: e + 1] for b, (row, e) in enumerate(zip(idx.tolist(), ends, strict=True))})
        return eager(idx, input_pos, **kwargs)

    def forward_segments(idx, segments):
        ids, at = idx.tolist(), segments.rows
        calls.append({})
        for b, start, n in segments.chunks:
            assert start == 0  # a slid window starts the row's cache again
            calls[-1][b], at = ids[at : at + n], at + n
        return mixed(idx, segments)

    model.forward, model.forward_segments = forward, forward_segments
    return calls


STARTS = [i > EOS and i % 3 == 0 for i in range(37)]  # bar-like: every third id may open a window


def occurrences(stream_: list[int], part: list[int]) -> list[int]:
    return [s for s in range(len(stream_)) if stream_[s : s + len(part)] == part]


@pytest.mark.parametrize("starts", [None, STARTS], ids=["plain", "window_starts"])
def test_the_slid_context_is_a_window_the_packer_could_produce(starts):
    model = tiny()
    block, keep = model.config.block_size, model.config.block_size // 2
    prompts = [[BOS, 4, 9], [BOS, 7, 7, 3, 30, 11, 5]]  # ragged: each row slides when its own cache is full
    calls = capture_prefills(model)
    out = generate(
        model,
        prompts=prompts,
        max_new_tokens=50,
        processors=[SPECIAL],
        window_starts=starts,
        generator=torch.Generator().manual_seed(0),
    )
    slides = calls[1:]  # the first prefill is the prompt's
    assert len(slides) >= 3
    starts_ids = [i for i, ok in enumerate(starts) if ok] if starts is not None else None
    for b, (prompt, row) in enumerate(zip(prompts, out, strict=True)):
        doc_stream = [*prompt, *row, EOS]  # BOS doc EOS, as pack concatenates a document
        cuts = 0
        for call in slides:
            if b not in call:  # its cache had room: it decoded on
                continue
            ctx = call[b]
            cuts += 1
            assert BOS not in ctx  # past a document's first window: no BOS, and no tags after it
            at = occurrences(doc_stream, ctx)  # a contiguous slice of the document's stream ...
            assert at and min(at) > 0
            # ... that is the row's tail, from its first id a window may start at when there is one
            assert any(ctx == tail_window(doc_stream[: s + len(ctx)], keep, starts) for s in at)
            if starts is None:
                # pack cuts a window here when a document before this one puts the stride here
                filler = [5] * ((-(2 + at[0])) % block)
                blocks = pack({"ids": [filler, doc_stream[1:-1]]}, block, BOS, EOS, PAD)["block"]
                assert any(w[: len(ctx)] == ctx for w in blocks)
            elif any(starts[i] for i in ctx):
                assert starts[ctx[0]]
        assert cuts >= 2  # each row slid, more than once
        if starts is not None:
            # and pack, given the same flags, starts its windows on this document the same way: at a
            # flagged id whenever the window before holds one
            blocks = pack({"ids": [doc_stream[1:-1]]}, block, BOS, EOS, PAD, window_starts=starts_ids)[
                "block"
            ]
            assert len(blocks) >= 3
            for prev, w in zip(blocks, blocks[1:], strict=False):
                if any(starts[i] for i in prev[1:]):
                    assert starts[w[0]]


@pytest.mark.parametrize(
    "starts", [None, STARTS, [False] * 37], ids=["plain", "window_starts", "none_flagged"]
)
def test_sliding_decoding_equals_a_reference_loop_over_training_like_windows(starts):
    model = tiny()
    for prompt, keep in (([BOS, 4, 9], None), ([BOS, 7, 7, 3, 30, 11, 5], 5)):
        out = generate(
            model,
            prompts=[prompt],
            max_new_tokens=50,
            processors=[SPECIAL],
            window_keep=keep,
            window_starts=starts,
            generator=torch.Generator().manual_seed(1),
        )
        assert out[0] == sliding_reference(model, prompt, 50, keep or 8, starts, seed=1)


# --- item 18: inductor's freezing switch is private ---------------------------------------------------


def test_compiled_graphs_fall_back_without_an_inductor_switch(monkeypatch, caplog):
    import contextlib

    import torch._inductor.config as inductor_config

    from multiar.engine.inductor_options import inductor_options

    assert not isinstance(inductor_options(), contextlib.nullcontext)  # this torch has both
    monkeypatch.delattr(inductor_config, "cpp_wrapper")
    with caplog.at_level(logging.WARNING, logger="multiar"):
        chosen = inductor_options()
    with chosen:
        assert inductor_config.freezing  # the switch still there is on
    assert not inductor_config.freezing
    monkeypatch.delattr(inductor_config, "freezing")
    with caplog.at_level(logging.WARNING, logger="multiar"):
        assert isinstance(inductor_options(cpp_wrapper=False), contextlib.nullcontext)
    assert [r.message for r in caplog.records if "inductor" in r.message] == [
        "torch._inductor.config.cpp_wrapper is missing in this torch: compiling without a C++ wrapper",
        "torch._inductor.config.freezing is missing in this torch: compiling without frozen weights",
    ]


def test_inductor_switches_hold_for_the_thread_that_entered_them_only():
    """Every compiled call enters the switches (decode, captured_step), and a server runs one engine thread
    per model: a thread leaving them must not take them from another still inside (its next compile would
    be a slower graph), nor may a thread outside see them (they would leak to every compile). True from
    torch 2.13 on, whose inductor config is per thread."""
    import threading

    import torch._inductor.config as inductor_config

    from multiar.engine.inductor_options import inductor_options

    before = inductor_config.freezing
    if before:
        pytest.skip("freezing is on outside the switches (TORCHINDUCTOR_FREEZING): nothing to tell apart")
    options, entered, left, seen = (
        inductor_options(cpp_wrapper=True),
        threading.Event(),
        threading.Event(),
        {},
    )

    def engine() -> None:
        with options:
            entered.set()
            assert left.wait(10)
            seen["inside, after the other thread left"] = inductor_config.freezing
        seen["after leaving"] = inductor_config.freezing

    thread = threading.Thread(target=engine)
    try:
        with options:
            thread.start()
            assert entered.wait(10)
            outside = threading.Thread(
                target=lambda: seen.setdefault("a thread outside", inductor_config.freezing)
            )
            outside.start()
            outside.join()
        left.set()
        thread.join(10)
        assert not inductor_config.freezing
        assert seen == {
            "a thread outside": False,
            "inside, after the other thread left": True,
            "after leaving": False,
        }
    finally:  # a torch whose config is shared would leave the switches on for every later test
        left.set()
        if thread.ident is not None:
            thread.join(10)
        inductor_config.freezing = before


def test_autotuned_graphs_time_inductors_gemm_template_beside_aten_quietly(monkeypatch, caplog):
    import torch._inductor.config as inductor_config

    from multiar.engine.inductor_options import inductor_options

    with inductor_options(cpp_wrapper=True, autotune=True):
        assert inductor_config.max_autotune and inductor_config.freezing and inductor_config.cpp_wrapper
        assert inductor_config.max_autotune_gemm_backends == "CPP,ATEN"  # measured against each other
        assert inductor_config.autotune_num_choices_displayed == 0  # no tables on a user's stderr
    assert not inductor_config.max_autotune
    with inductor_options(cpp_wrapper=False, autotune=True):  # not a CPU: inductor's own backends
        assert inductor_config.max_autotune and not inductor_config.cpp_wrapper
        assert inductor_config.max_autotune_gemm_backends != "CPP,ATEN"
    monkeypatch.delattr(inductor_config, "max_autotune")
    with caplog.at_level(logging.WARNING, logger="multiar"), inductor_options(autotune=True):
        assert inductor_config.freezing
    assert "max_autotune is missing in this torch" in caplog.text


def test_a_cuda_step_is_replayed_as_a_cuda_graph_over_static_caches():
    """compile=true on CUDA (measured on an H200: 85M batch 1, 6.1x the eager step): inductor's CUDA
    graphs on and the weights not frozen (graph inputs it replays from where they are), and the KV
    caches marked static, so the graph writes them in place (a graph that mutates an input not marked
    static is not captured)."""
    import torch._inductor.config as inductor_config

    from multiar.engine.decode import static_caches
    from multiar.engine.inductor_options import inductor_options

    with inductor_options(cpp_wrapper=False, cuda_graphs=True):
        assert inductor_config.triton.cudagraphs and not inductor_config.freezing
    assert not inductor_config.triton.cudagraphs
    with inductor_options(cpp_wrapper=True):  # a CPU: frozen weights, no CUDA graphs
        assert inductor_config.freezing and not inductor_config.triton.cudagraphs
    model = GPT(ModelConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=16))
    model.setup_caches(2, 16)
    static_caches(model)
    caches = [t for b in model.blocks for t in (b.attn.kv_cache.k, b.attn.kv_cache.v)]
    assert [getattr(t, "_dynamo_static_input_type", None) for t in caches] == ["unguarded"] * 4


def test_each_compiled_model_gets_its_own_room_under_dynamos_recompile_limit(monkeypatch):
    """dynamo counts the graphs of one function, and every compiled model's step is decode_filled: past
    its limit (8) a model's step ran uncompiled, silently (a benchmark of 4 compiled models at 2 batch
    sizes, or a server of three runs with captured steps)."""
    import torch._dynamo.config as dynamo_config

    import multiar.engine.decode as decode
    from multiar.engine.decode import GRAPHS_PER_MODEL, compile_for_sampling

    asked = []

    def recording(**kwargs):
        asked.append(kwargs)
        return contextlib.nullcontext()

    monkeypatch.setattr(decode, "inductor_options", recording)
    monkeypatch.setenv("MULTIAR_AHEAD_OF_TIME", "0")  # torch.compile's graphs (a package is not dynamo's)
    # the config module's own patch: pytest's monkeypatch, undone, deletes the key from dynamo's config
    # (every later compile in the process then failed with "recompile_limit does not exist")
    before = dynamo_config.recompile_limit  # earlier tests' compiled models raised it already
    with dynamo_config.patch(recompile_limit=8):
        model = GPT(ModelConfig(vocab_size=16, block_size=16, n_layer=1, n_head=1, n_embd=8))
        compile_for_sampling(model)
        compile_for_sampling(GPT(ModelConfig(vocab_size=16, block_size=16, n_layer=1, n_head=1, n_embd=8)))
        assert dynamo_config.recompile_limit == 8 + 2 * GRAPHS_PER_MODEL
    assert dynamo_config.recompile_limit == before
    assert (
        asked == [{"cpp_wrapper": True, "autotune": True, "cuda_graphs": False}] * 2
    )  # a CPU: timed GEMMs, C++ wrapper


@pytest.mark.parametrize("ahead_of_time", ["package", "torch.compile", "torch.compile after a failed build"])
def test_the_compiled_step_reads_the_filled_slots_alone_in_one_graph_for_every_length(
    monkeypatch, tmp_path, ahead_of_time
):
    """The compiled one-token step attends to the slots up to the furthest row's position, not the whole
    cache (a step over 1,024 slots cost 9.2 ms where one over 160 cost 5.0 at 85M int8): NaN in every
    slot past them must not reach its logits (the whole cache read, NaN x a weight of 0 is NaN). One
    graph serves every length, and the cache's last slot steps eagerly rather than compile another:
    one package built ahead of time, or (MULTIAR_AHEAD_OF_TIME=0, or where the package fails to build)
    one torch.compile graph."""
    from multiar.engine import ahead_of_time as aot
    from multiar.engine.decode import compile_for_sampling, decode_one_token

    def no_export(*args):
        raise RuntimeError("export failed")

    monkeypatch.setenv("MULTIAR_CACHE", str(tmp_path))
    monkeypatch.setenv("MULTIAR_AHEAD_OF_TIME", "0" if ahead_of_time == "torch.compile" else "1")
    if ahead_of_time.endswith("failed build"):
        monkeypatch.setattr(aot, "_build", no_export)
    model = tiny(block_size=24)
    compiled = compile_for_sampling(tiny(block_size=24))
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    token = torch.tensor([[5], [9]])
    with torch.inference_mode():
        for m in (model, compiled):
            m.setup_caches(2, 24)
            m(torch.tensor([[1, 4, 7], [1, 3, 3]]), 0)  # prefill: slots 0-2
            for b in m.blocks:
                b.attn.kv_cache.v[:, :, 3:] = float("nan")  # slots no step has written yet
        for pos in range(3, 24):  # each step writes its slot before it attends: no NaN seen
            expected = decode_one_token(model, token, pos)
            got = decode_one_token(compiled, token, pos)
            assert torch.isfinite(got).all(), pos
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    if ahead_of_time == "package":
        assert (compiled.compiled_step.built, compiled.compiled_step.loaded) == (1, 0)
    else:
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 1


def test_the_compiled_step_keeps_keys_in_bf16_where_the_linears_make_them_so(monkeypatch):
    """Keys and values in bf16 for the compiled step of bf16 weights or bf16-activation int8 / int4
    kernels (its attention reads half the bytes: 10.8M batch 8 1.81 -> 1.56 ms a step), fp32 weights keep
    fp32, and the eager model keeps its rule (fp32 on a CPU without AMX, whose bf16 SDPA is slow). A
    compile that fails returns the model to the eager rule."""
    import multiar.engine.decode as decode
    import multiar.engine.precision as precision
    from multiar.engine import ahead_of_time
    from multiar.engine.decode import compile_for_sampling
    from multiar.engine.quantize import quantize

    monkeypatch.setattr(precision, "has_amx", lambda: False)  # the rule where it differs from compiled

    def cache_dtype(model: GPT) -> torch.dtype:
        model.setup_caches(1, 8)
        dtype = model.blocks[0].attn.kv_cache.k.dtype
        model.keep_caches = False
        model.clear_caches()
        return dtype

    bf16 = tiny().to(torch.bfloat16)
    assert cache_dtype(bf16) == torch.float32  # eager: the CPU rule
    cases = [
        (tiny(), torch.float32),
        (bf16, torch.bfloat16),
        (quantize(tiny(), "int8", bf16_activations=True), torch.bfloat16),
        (quantize(tiny(), "int8", bf16_activations=False), torch.float32),
    ]
    for model, dtype in cases:
        assert cache_dtype(compile_for_sampling(model)) == dtype

    def broken(fn, **kwargs):
        def fails(*args):
            raise RuntimeError("no C++ compiler found")

        return fails

    def no_export(*args):
        raise RuntimeError("export failed")

    monkeypatch.setattr(decode.torch, "compile", broken)
    monkeypatch.setattr(ahead_of_time, "_build", no_export)  # to torch.compile's step, which fails too
    model = compile_for_sampling(tiny().to(torch.bfloat16), on_failure=lambda err: None)
    assert len(generate(model, prompts=[[1, 5, 9]], max_new_tokens=4, temperature=0.0)[0]) == 4  # eagerly
    assert model.cache_dtype is None and cache_dtype(model) == torch.float32


@pytest.mark.parametrize("amx", [False, True])
def test_eager_passes_over_bf16_caches_attend_in_fp32_on_a_cpu_without_amx(monkeypatch, amx):
    """A compiled model's eager passes (prefill, slides, other row counts) over its bf16 caches: SDPA in
    fp32 where the CPU lacks AMX (its bf16 SDPA is the slower there), in bf16 where it has it (the
    faster: a 512-token prefill 1.35 against 3.95 ms)."""
    import torch.nn.functional as F

    import multiar.engine.precision as precision

    seen = []
    sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(precision, "has_amx", lambda: amx)
    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    model = tiny().to(torch.bfloat16)
    model.cache_dtype = torch.bfloat16
    out = generate(model, prompts=[[1, 5, 9]], max_new_tokens=3, temperature=0.0)
    assert len(out[0]) == 3 and len(seen) == 3 * len(model.blocks)  # a prefill and two steps
    want = torch.bfloat16 if amx else torch.float32
    assert set(seen) == {(want, want, want)}


@pytest.mark.parametrize("amx", [False, True])
def test_a_prompt_chunk_over_a_bf16_cache_attends_in_fp32_on_a_cpu_without_amx(monkeypatch, amx):
    """A slot engine's prompt chunk (engine.segments) over bf16 caches: SDPA in fp32 where the CPU lacks
    AMX, in bf16 where it has it, as the model's own eager passes; the same logits to bf16's rounding."""
    import torch.nn.functional as F

    import multiar.engine.precision as precision
    from multiar.engine.segments import Segments

    seen = []
    sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        return sdpa(q, k, v, **kwargs)

    model = tiny().to(torch.bfloat16)
    ids = torch.tensor([1, 5, 9, 2, 7])
    logits = {}
    for flag in (not amx, amx):  # the other answer first: a reference to compare with
        monkeypatch.setattr(precision, "has_amx", lambda flag=flag: flag)
        model.setup_caches(1, 16, kv_dtype=torch.bfloat16)
        seen.clear()
        monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
        with torch.inference_mode():
            logits[flag] = model.forward_segments(
                ids, Segments(0, torch.zeros(0, dtype=torch.long), [(0, 0, 5)])
            )
        monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    want = torch.bfloat16 if amx else torch.float32
    assert len(seen) == len(model.blocks) and set(seen) == {(want, want, want)}
    torch.testing.assert_close(logits[amx].float(), logits[not amx].float(), rtol=0.05, atol=0.05)
