"""Sampling from a GPT with its KV cache: the sampler, logits processors, prefill, and the batched decode
loop, streaming tokens as they are produced.

Everything that shapes the next-token distribution beyond temperature/top-k/top-p/min-p (grammar masks,
banned ids, repetition penalty) plugs in as a `LogitsProcessor`; they compose in order. A processor is a
function of the ids it is given: when rows have different lengths it is called once per row with that
row's ids. Knows no domain.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from multiar.engine import ahead_of_time, huge_pages
from multiar.engine.captured_step import decode_rows
from multiar.engine.compile_choice import ANY_WEIGHTS, StepClock
from multiar.engine.inductor_options import inductor_options, make_room
from multiar.engine.model import GPT
from multiar.engine.quantize import Int4Linear, Int8Linear
from multiar.engine.rows import Rows, Token, as_rows, extend_row, window_tail
from multiar.engine.sampling import LogitsProcessor, repetition_penalty
from multiar.engine.segments import Segments

__all__ = [
    "Token",
    "as_rows",
    "compile_for_sampling",
    "extend_row",
    "generate",
    "prefill",
    "stream",
    "window_tail",
]

log = logging.getLogger("multiar")


_penalize_repeats = repetition_penalty  # `stream` has an argument of that name


def prefill(model: GPT, idx: Tensor, last: Tensor | None = None) -> Tensor:
    """Run prompts idx (B, T) through the model from position 0, filling the cache; logits for the token
    after each row's last prompt token (B, V). last: (B,) index of each row's last real token (ragged)."""
    return model(idx, 0, logits_at=-1 if last is None else last)[:, -1]


def decode_one_token(model: GPT, token: Tensor, pos: int) -> Tensor:
    """Feed one token per row (B, 1) at position pos; logits for the following token (B, V)."""
    return model(token, pos)[:, -1]


# graphs one compiled model may need: one per batch size it meets (a run's batch, its last partial one,
# the redraws of invalid samples)
GRAPHS_PER_MODEL = 8


def compile_for_sampling(
    model: GPT,
    rows: int | None = None,
    clock: StepClock | None = None,
    on_failure: Callable[[Exception], None] | None = None,
    gemms: str | None = None,
) -> GPT:
    """model (in place) with its one-token decode step compiled by torch.compile, gpt-fast style: static
    shapes but one (per-row tensor positions; attention over the filled slots, up to the furthest row's
    position, a mask hiding each row's slots past its own: their count is the graph's one dynamic size,
    `filled_slots`), so one graph serves every step. The graph is the slot engine's layers (engine.captured_step.decode_rows: attention
    as inductor's own fused kernel, not SDPA's flash kernel, whose set-up cost a one-query row does not
    repay). On a CPU inductor freezes the weights in (but in a streamed package) and calls the kernels
    through a C++ wrapper, its GEMMs those measured fastest here (engine.ahead_of_time: its autotuned
    pick, oneDNN / MKL, or at a few rows the Linears streamed, each weight read once); on CUDA the
    step is replayed as one CUDA
    graph, its logits copied out of the graph's buffer (engine.inductor_options). The KV caches are kept
    between calls (the graph holds on to them). Prefill and other multi-token passes stay eager. The
    first step compiles (tens of seconds on 2 CPU cores). rows: the one row count the graph is for
    (others, such as a job's last partial batch, step eagerly rather than compile a graph of their own;
    None: a graph per row count met); clock: times the graph's calls at its row count (compile=auto's
    measurement); on_failure: where the first compile fails (inductor on a CPU needs a C++ compiler and
    Python's headers), called with the error, and every step runs eagerly; None: the error is raised.
    gemms: the GEMMs of a CPU package (engine.ahead_of_time.GEMMS), pinned; None: measured or recorded."""
    model.eval()
    model.keep_caches = True
    if model.wte.weight.device.type == "cpu":
        # a package is handed the model's tensors where they are (weightless: engine.ahead_of_time): they
        # move into huge pages now, before any is bound
        huge_pages.place(model)
    if makes_bf16_keys(model):
        # keys and values in bf16, not the eager rule's fp32 on a CPU without AMX: the graph's attention reads half
        # the bytes (10.8M batch 8: a step 1.81 -> 1.56 ms); the linears made them in bf16 already, only
        # rotated queries and keys round (eager passes upcast them for SDPA: engine.model)
        model.cache_dtype = torch.bfloat16
    eager = model.forward
    device = model.wte.weight.device.type
    # a CUDA step is ~100 kernel launches of a few microseconds' work each: replayed as one CUDA graph
    # (inductor's cudagraph trees; gpt-fast's "reduce-overhead"); no autotuning there (cuBLAS serves a
    # few rows well, and timing Triton's GEMMs would take minutes a graph)
    cuda_graphs = device == "cuda"
    switches = dict(cpp_wrapper=device == "cpu", autotune=not cuda_graphs, cuda_graphs=cuda_graphs)
    if device == "cpu" and ahead_of_time.enabled():
        # a package on disk per model, loaded in milliseconds by the next job, and no guards per call;
        # dynamo and inductor are imported (~1.7 s) only where it is built or fails
        step = ahead_of_time.AheadOfTimeStep(switches, lambda: compiled_step(switches), gemms)
    else:
        step = compiled_step(switches)
    # calls that must succeed before a failure is the graph's, not its build's: inductor runs a CUDA
    # graph's first call as a warm-up and captures it at the next (a capture can fail: memory, a sync)
    settled = 3 if cuda_graphs else 1
    state = {"failed": False, "ran": 0}

    def forward(idx: Tensor, input_pos: int | Tensor | None = None, **kwargs) -> Tensor:
        one_step = input_pos is not None and idx.size(1) == 1 and kwargs.get("logits_at") is None
        if not one_step or state["failed"] or (rows is not None and idx.size(0) != rows):
            return eager(idx, input_pos, **kwargs)
        B = idx.size(0)
        if isinstance(input_pos, int):  # every row at one position
            positions = torch.full((B,), input_pos, dtype=torch.long, device=idx.device)
        else:  # (1,) shared or (B, 1) per row -> (B,)
            positions = input_pos.reshape(-1).expand(B).contiguous()
        slots = filled_slots(model, input_pos, kwargs.get("kv_len"), cuda_graphs)
        if slots is None:  # the cache's last slot: one eager step rather than a graph of its own
            return eager(idx, input_pos, **kwargs)
        args = (model, idx[:, 0], positions, slots)
        if cuda_graphs and not hasattr(model.blocks[0].attn.kv_cache.k, "_dynamo_static_input_type"):
            static_caches(model)  # caches new since the last step (a first call, a larger batch)
        try:
            timed = clock is not None and clock.rows == B
            logits = clock.timed(step, *args) if timed else step(*args)
            packaged = isinstance(step, ahead_of_time.AheadOfTimeStep) and step.fallback is None
            if timed and clock.package is None and packaged:
                clock.package = step.last  # a package built or loaded: compile=auto's next cost
                clock.spare_s = step.spare_s  # its GEMMs' other candidates and their timing: not that cost
                if step.any_weights:  # it serves every model of the config: noted so, not under a digest
                    clock.weights = ahead_of_time.any_weights_key(model)
                elif (clock.weights or "").startswith(ANY_WEIGHTS):  # assumed so, but this one's is frozen
                    clock.weights = None  # (its digest not taken): not noted
        except Exception as err:  # noqa: BLE001 (inductor fails many ways: no compiler, no headers)
            if on_failure is None or state["ran"] >= settled:
                raise
            state["failed"] = True
            if isinstance(step, ahead_of_time.AheadOfTimeStep):
                step.gemms = None  # its pick runs no more: not what generate.json or a journal names
            model.cache_dtype = None  # eager steps from here: the eager rule's caches from the next job on
            on_failure(err)
            return eager(idx, input_pos, **kwargs)
        state["ran"] += 1
        if cuda_graphs:  # the graph's output buffer: the next replay writes over it
            logits = logits.clone()
        return logits[:, None]  # (B, 1, V)

    model.forward = forward
    model.compiled_step = step  # what runs the graph (tests and benchmarks read its counts)
    return model


def compiled_step(switches: dict) -> Callable[..., Tensor]:
    """decode_filled through torch.compile, inductor's switches (engine.inductor_options) entered around
    each call: they are read when a call compiles (compile's options= did not apply freezing, torch
    2.13). The filled slots' count is marked dynamic (one graph for every length) but on CUDA, whose graph
    reads every slot."""
    compiled = torch.compile(decode_filled, dynamic=False)
    make_room(GRAPHS_PER_MODEL)
    options = inductor_options(**switches)

    def step(model: GPT, ids: Tensor, positions: Tensor, slots: Tensor) -> Tensor:
        if not switches["cuda_graphs"]:
            torch._dynamo.mark_dynamic(slots, 0, min=2, max=model.max_seq_length - 1)
        with options:
            return compiled(model, ids, positions, slots)

    return step


def makes_bf16_keys(model: GPT) -> bool:
    """Whether model's linears produce keys and values in bf16: bf16 weights, or quantize's int8 / int4
    kernels, whose activations are bf16."""
    qkv = model.blocks[0].attn.qkv
    if isinstance(qkv, Int8Linear):
        return qkv.bf16_activations and qkv.on_kernel()
    if isinstance(qkv, Int4Linear):
        return qkv.kernel is not None
    return model.wte.weight.dtype == torch.bfloat16


def decode_filled(model: GPT, ids: Tensor, positions: Tensor, slots: Tensor) -> Tensor:
    """decode_rows over the cache's first slots.size(0) slots: a tensor's size, marked dynamic, so that one
    graph serves every length (an int argument would be a constant of the graph, a graph per length)."""
    return decode_rows(model, ids, positions, slots.size(0))


def filled_slots(model: GPT, input_pos: int | Tensor, kv_len: int | None, whole: bool) -> Tensor | None:
    """(n,): n the slots a one-token step attends to, the furthest row's position + 1 (kv_len when the
    caller knows it), so that a step reads keys and values up to there, not the whole cache: at 85M int8
    batch 1 a step over 1,024 slots took 9.2 ms where one over 160 took 5.0. Its size is dynamic (marked
    so by compiled_step; declared so by a package's export): one graph for every n from 2 (inductor
    specializes a size of 1; a slot past every row's position is masked) to the cache's length - 1. None at the cache's length, a step the graph does not take
    (attention over the whole cache reads it as one contiguous block, another graph). whole: every
    slot, a CUDA graph's static shape."""
    length = model.max_seq_length
    if whole:
        return torch.empty(length, device=model.wte.weight.device)
    if kv_len is None:
        kv_len = input_pos + 1 if isinstance(input_pos, int) else int(input_pos.max()) + 1
    n = max(kv_len, 2)
    if n >= length:
        return None
    return torch.empty(n, device=model.wte.weight.device)


def static_caches(model: GPT) -> None:
    """Mark the KV caches' tensors as static inputs of a CUDA graph, so that it writes the new keys and
    values in place and reads them where they are (a graph that mutates an input not static is not
    captured). dynamo marks a module's buffers so itself (torch 2.11-2.13); the graph depends on it, so
    it is said here too. Unguarded: no guard on the tensors' addresses (new caches come with a new shape,
    which recompiles anyway)."""
    for block in model.blocks:
        cache = block.attn.kv_cache
        for t in (cache.k, cache.v):
            if getattr(t, "_dynamo_static_input_type", None) is None:
                torch._dynamo.mark_static_address(t, guard=False)


@torch.inference_mode()
def stream(
    model: GPT,
    prompt: Tensor | Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    repetition_window: int = 64,
    eos_id: int | None = None,
    stop: Sequence[Sequence[int]] = (),
    min_new_tokens: int = 0,
    processors: Sequence[LogitsProcessor] = (),
    generator: torch.Generator | None = None,
    generators: Sequence[torch.Generator] | None = None,
    window_keep: int | None = None,
    window_starts: Sequence[bool] | None = None,
    should_stop: Callable[[int, list[int]], bool] | None = None,
) -> Iterator[Token]:
    """Continue each prompt row (id lists may differ in length), yielding Token(row, id) as tokens are
    produced and Token(row, None, end) when a row ends: "eos", "stop" (a stop sequence, or should_stop(row,
    new ids) saying so: a rule on the decoded text, such as the end of a code block), "length", or
    "no_valid_token" (its processors banned every token; the others go on). EOS and stop ids are never
    yielded: a row holds back as many tokens as the longest stop sequence minus one.
    generators: one per row instead of `generator`, each row drawing from its own alone (its tokens
    then depend on its prompt and generator, not on the rows beside it).
    Past block_size each row's window slides when its own cache is full: it is refilled with the row's
    last `window_keep` ids (default block_size // 2) cut as a training window past a document's first (no BOS, no tags; with
    window_starts, per id, from the first flagged id, as the packer's windows), and decoding goes on."""
    rows = as_rows(prompt)
    T, block = max(map(len, rows)), model.config.block_size
    if generators is not None and (generator is not None or len(generators) != len(rows)):
        raise ValueError(f"generators: one per row ({len(rows)}), and no generator beside them")
    if block <= T:
        raise ValueError(f"a prompt of {T} tokens leaves no room in the model's block_size ({block})")
    keep = min(window_keep or block // 2, block - 1)
    repeats = [_penalize_repeats(repetition_penalty, repetition_window)] if repetition_penalty != 1.0 else []
    state = Rows(
        rows, max_new_tokens, device=model.wte.weight.device, width=T + max_new_tokens, eos_id=eos_id,
        stop=stop, min_new_tokens=min_new_tokens, processors=[*repeats, *processors], should_stop=should_stop,
    )  # fmt: skip
    sampling = dict(
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        generator=generator if generators is None else generators,
    )  # fmt: skip
    was_training = model.training
    model.eval()
    capacity = min(T + max_new_tokens, block)  # past it, the window slides (re-prefill)
    model.setup_caches(max_batch_size=len(rows), max_seq_length=capacity)
    try:  # the caches are released whatever happens, so a failed call leaves the model as it was
        logits = prefill(model, state.seq[:, :T], state.last_index(state.length))
        for _ in range(max_new_tokens):
            logits, dead = state.process(logits)
            token, events = state.append(*state.draw(logits, dead, **sampling))
            yield from events
            if state.done:
                break
            logits = next_logits(model, state, token, capacity, keep, window_starts)
    finally:
        model.clear_caches()
        model.train(was_training)


def next_logits(
    model: GPT, rows: Rows, token: Tensor, capacity: int, keep: int, window_starts: Sequence[bool] | None
) -> Tensor:
    """Feed each row's new token (B,) to the cache; when a row's cache is full, slide its window to its
    tail instead and go on decoding after it. Logits for the next token."""
    cache = rows.cache
    if max(cache.values) >= capacity:
        full = [b for b, c in enumerate(cache.values) if c >= capacity]
        if len(full) < len(cache.values):  # ragged rows: only the full ones slide
            return slide_full_rows(model, rows, token, full, keep, window_starts)
        return prefill(model, *rows.tails(keep, window_starts))  # every row at once: one prefill
    if cache.aligned:
        logits = decode_one_token(model, token[:, None], cache.values[0])
    else:
        logits = model(token[:, None], cache.tensor[:, None], kv_len=max(cache.values) + 1)[:, -1]
    cache.add(1)
    return logits


def slide_full_rows(
    model: GPT, rows: Rows, token: Tensor, full: list[int], keep: int, window_starts: Sequence[bool] | None
) -> Tensor:
    """Ragged rows, some caches full: one mixed step (engine.segments) in which the rows with room
    decode their new token and each full row's tail enters its cache from position 0. Every row keeps
    the context it has decoding alone (its neighbours' lengths never cut it), and the rows with room
    are not prefilled again. Logits (B, V)."""
    cache, device, B = rows.cache, token.device, len(rows.cache.values)
    tails = dict(zip(full, rows.tail_ids(keep, window_starts, full), strict=True))
    # a full row's decoding slot writes a placeholder at its last position, past its tail (the chunk's
    # keys and values are written after the decoding slots' in every layer): it writes that slot again
    # before it reads it
    positions = torch.tensor([min(c, model.max_seq_length - 1) for c in cache.values], device=device)
    ids = torch.cat([token, *(torch.tensor(t, device=device) for t in tails.values())])
    chunks = [(b, 0, len(t)) for b, t in tails.items()]
    out = model.forward_segments(ids, Segments(B, positions, chunks))  # (B + len(full), V)
    logits = out[:B]
    logits[full] = out[B:]  # the full rows' chunks' logits in place of their placeholders' (no overlap)
    cache.set([len(tails[b]) if b in tails else c + 1 for b, c in enumerate(cache.values)])
    return logits


def generate(
    model: GPT,
    prompt: Tensor | Sequence[Sequence[int]] | None = None,
    max_new_tokens: int = 256,
    *,
    prompts: Sequence[Sequence[int]] | None = None,
    **kwargs,
) -> list[list[int]]:
    """Continue each row of prompt (a (B, T) tensor, or `prompts`: id lists of any lengths); return the
    new ids per row, without EOS or a matched stop sequence. Keyword arguments as `stream`."""
    if (prompt is None) == (prompts is None):
        raise ValueError("give either prompt or prompts")
    rows = as_rows(prompt if prompts is None else prompts)
    out: list[list[int]] = [[] for _ in rows]
    for event in stream(model, rows, max_new_tokens, **kwargs):
        if event.token is not None:
            out[event.row].append(event.token)
    return out
