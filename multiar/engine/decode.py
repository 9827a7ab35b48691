"""Sampling from a GPT with its KV cache: the sampler, logits processors, prefill, and the batched decode
loop, streaming tokens as they are produced.

Everything that shapes the next-token distribution beyond temperature/top-k/top-p/min-p (grammar masks,
banned ids, repetition penalty) plugs in as a `LogitsProcessor`; they compose in order. A processor is a
function of the ids it is given: when rows have different lengths it is called once per row with that
row's ids. Knows no domain.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from multiar.engine.model import GPT
from multiar.engine.sampling import LogitsProcessor, apply_processors, repetition_penalty, sample

log = logging.getLogger("multiar")


_penalize_repeats = repetition_penalty  # `stream` has an argument of that name


def prefill(model: GPT, idx: Tensor, last: Tensor | None = None) -> Tensor:
    """Run prompts idx (B, T) through the model from position 0, filling the cache; logits for the token
    after each row's last prompt token (B, V). last: (B,) index of each row's last real token (ragged)."""
    return model(idx, 0, logits_at=-1 if last is None else last)[:, -1]


def decode_one_token(model: GPT, token: Tensor, pos: int) -> Tensor:
    """Feed one token per row (B, 1) at position pos; logits for the following token (B, V)."""
    return model(token, pos)[:, -1]


def freezing_context() -> contextlib.AbstractContextManager:
    """What turns on inductor's freezing around a compiled call: its private config switch where this
    torch has it, else nothing (one warning line; the graph then reads the weights as inputs)."""
    try:
        import torch._inductor.config as config
    except ImportError:
        config = None
    if not (hasattr(config, "patch") and hasattr(config, "freezing")):
        log.warning("torch._inductor.config.freezing is missing in this torch: compiling without freezing")
        return contextlib.nullcontext()
    return config.patch(freezing=True)


def compile_for_sampling(model: GPT) -> GPT:
    """model (in place) with its one-token decode step compiled by torch.compile, gpt-fast style: static
    shapes (per-row tensor positions, attention over the whole cache with a mask), so one graph serves
    every step and inductor's freezing folds the weights in (on a CPU it packs fp32 linears for MKL,
    bf16 ones for oneDNN).
    The KV caches are kept between calls (the graph holds on to them). Prefill and other multi-token
    passes stay eager. The first step compiles (tens of seconds on 2 CPU cores)."""
    model.eval()
    model.keep_caches = True
    eager = model.forward
    step = torch.compile(eager, dynamic=False)
    freezing = freezing_context()  # re-entered at every call

    def forward(idx: Tensor, input_pos: int | Tensor | None = None, **kwargs) -> Tensor:
        if input_pos is None or idx.size(1) != 1 or kwargs.get("logits_at") is not None:
            return eager(idx, input_pos, **kwargs)
        if isinstance(input_pos, int):  # every row at one position: one (1,) tensor
            input_pos = torch.tensor([input_pos], device=idx.device)
        # freezing for this graph only (compile's options= did not apply it, torch 2.13); it is read
        # when a call compiles, so the patch is around every call
        with freezing:
            return step(idx, input_pos, kv_len=model.max_seq_length)

    model.forward = forward
    return model


def as_rows(prompt: Tensor | Sequence[Sequence[int]]) -> list[list[int]]:
    """Prompts as lists of ids: a (B, T) tensor or a list of (possibly different-length) id lists."""
    rows = prompt.tolist() if isinstance(prompt, Tensor) else [list(map(int, r)) for r in prompt]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("the prompt is empty: each row needs at least a BOS token")
    return rows


def extend_row(row: list[int], token: int, eos_id: int | None, stops: Sequence[list[int]]) -> bool:
    """Append token to a row's new ids unless it is EOS, and drop a stop sequence the row now ends with;
    returns whether the row has ended (EOS or a stop)."""
    if eos_id is not None and token == eos_id:
        return True
    row.append(token)
    for s in stops:
        if row[-len(s) :] == s:
            del row[-len(s) :]
            return True
    return False


def window_tail(ids: list[int], keep: int, window_starts: Sequence[bool] | None = None) -> list[int]:
    """The last `keep` ids as a training window past a document's first begins: no BOS or tags put
    back; with window_starts (per id), from the first id a window may start at, when one is there."""
    tail = ids[-keep:]
    if window_starts is not None:
        first = next((j for j, i in enumerate(tail) if 0 <= i < len(window_starts) and window_starts[i]), 0)
        tail = tail[first:]
    return tail


class Token(NamedTuple):
    """One streamed event: row `row` produced `token`; token None means the row has finished, and
    `end` says why: "eos", "stop" (a stop sequence), "length" (max_new_tokens) or "no_valid_token"
    (the logits processors banned every token)."""

    row: int
    token: int | None
    end: str | None = None


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
    window_keep: int | None = None,
    window_starts: Sequence[bool] | None = None,
    should_stop: Callable[[int, list[int]], bool] | None = None,
) -> Iterator[Token]:
    """Continue each prompt row, yielding Token(row, id) as tokens are produced and Token(row, None)
    when a row ends (EOS, a stop sequence, or max_new_tokens). EOS and stop ids are never yielded:
    a row holds back as many tokens as the longest stop sequence minus one until they cannot start one.

    should_stop(row, new ids so far) ends a row when it says so (end "stop"): a rule on the decoded
    text, such as the end of a code block. A row whose processors ban every token ends there (end
    "no_valid_token"); the others go on. Rows may have different lengths (a list of id lists): each
    gets its own positions in the cache.
    Longer than the context: when prompt + new tokens pass block_size, the window slides: the cache is
    refilled with each row's last `window_keep` ids (default block_size // 2), and decoding goes on
    after them, so a piece can be longer than the model's training windows. The kept ids are what a
    training window past a document's first looks like (no BOS, no tags); window_starts (per id, e.g.
    music's bar-start flags) makes them begin at the first flagged id, as the packer's windows do.
    """
    rows = as_rows(prompt)
    B, device = len(rows), model.wte.weight.device
    lengths = [len(r) for r in rows]
    T = max(lengths)
    block = model.config.block_size
    if block <= T:
        raise ValueError(f"a prompt of {T} tokens leaves no room in the model's block_size ({block})")
    keep = min(window_keep or block // 2, block - 1)
    stops = [list(s) for s in stop if len(s)]
    hold = max((len(s) for s in stops), default=1) - 1
    procs = list(processors)
    if repetition_penalty != 1.0:
        procs.insert(0, _penalize_repeats(repetition_penalty, repetition_window))
    was_training = model.training
    model.eval()
    capacity = min(T + max_new_tokens, block)  # past it, the window slides (re-prefill)
    model.setup_caches(max_batch_size=B, max_seq_length=capacity)
    seq = torch.zeros(B, T + max_new_tokens, dtype=torch.long, device=device)  # row b's ids at [0, hist_b)
    for b, r in enumerate(rows):
        seq[b, : len(r)] = torch.tensor(r)
    hist, hist_t = list(lengths), torch.tensor(lengths, device=device)  # ids per row so far
    cache, cache_t = list(lengths), torch.tensor(lengths, device=device)  # filled cache slots per row
    rows_idx = torch.arange(B, device=device)
    finished = [False] * B
    finished_t = torch.zeros(B, dtype=torch.bool, device=device)
    generated: list[list[int]] = [[] for _ in range(B)]
    sent = [0] * B  # tokens of each row already yielded
    try:  # the caches are released whatever happens, so a failed call leaves the model as it was
        logits = prefill(model, seq[:, :T], hist_t - 1 if min(lengths) != T else None)
        for n in range(max_new_tokens):
            aligned = min(hist) == max(hist)
            if procs:
                if aligned:
                    logits = apply_processors(procs, seq[:, : hist[0]], None, logits)
                else:
                    logits = apply_processors(procs, seq, hist, logits)
            if eos_id is not None and n < min_new_tokens:
                logits[:, eos_id] = float("-inf")
            dead = None
            if procs or (eos_id is not None and n < min_new_tokens):
                # a row with every token banned has nothing to sample from (its probabilities are NaN):
                # it draws from flat logits, which is thrown away, and ends below
                banned = torch.isneginf(logits).all(dim=-1, keepdim=True)
                logits = logits.masked_fill(banned, 0.0)
                dead = banned[:, 0] & ~finished_t
            token = sample(logits, temperature, top_k, top_p, generator, min_p)  # (B,)
            if eos_id is not None:
                token = token.masked_fill(finished_t, eos_id)  # finished rows only repeat EOS
            if aligned:
                seq[:, hist[0]] = token
            else:
                seq[rows_idx, hist_t] = token
            hist, hist_t = [h + 1 for h in hist], hist_t + 1
            # the row flags come to the host with the tokens: one sync per step
            tokens, dead_rows = (
                (token.tolist(), [False] * B) if dead is None else torch.stack([token, dead.long()]).tolist()
            )
            for b, t in enumerate(tokens):
                if finished[b]:
                    continue
                row = generated[b]
                if dead_rows[b]:
                    end: str | None = "no_valid_token"
                elif extend_row(row, t, eos_id, stops) or (should_stop is not None and should_stop(b, row)):
                    end = "eos" if t == eos_id else "stop"
                else:
                    end = "length" if n + 1 == max_new_tokens else None
                if end is not None:
                    finished[b] = True
                    finished_t[b] = True
                    for tok in row[sent[b] :]:
                        yield Token(b, tok)
                    sent[b] = len(row)
                    yield Token(b, None, end)
                else:
                    while len(row) - sent[b] > hold:
                        yield Token(b, row[sent[b]])
                        sent[b] += 1
            if all(finished):
                break
            if max(cache) >= capacity:
                # the cache is full: slide the window to each row's tail, cut as training windows are
                # (multiar.data.packing.pack), prefilled in one pass, and go on decoding after them
                ctxs = [
                    window_tail(seq[b, max(h - keep, 0) : h].tolist(), keep, window_starts)
                    for b, h in enumerate(hist)
                ]
                cache = [len(c) for c in ctxs]
                cache_t = torch.tensor(cache, device=device)
                width = max(cache)
                padded = torch.tensor([c + [0] * (width - len(c)) for c in ctxs], device=device)
                logits = prefill(model, padded, cache_t - 1 if min(cache) != width else None)
            elif min(cache) == max(cache):
                logits = decode_one_token(model, token[:, None], cache[0])
                cache, cache_t = [c + 1 for c in cache], cache_t + 1
            else:
                logits = model(token[:, None], cache_t[:, None], kv_len=max(cache) + 1)[:, -1]
                cache, cache_t = [c + 1 for c in cache], cache_t + 1
    finally:
        model.clear_caches()
        model.train(was_training)


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
