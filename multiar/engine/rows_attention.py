"""The decoding rows' attention in a slot engine's mixed step (engine.segments), and which way runs it here,
chosen by measuring (`choose_rows_attention`):

- "sdpa": torch's scaled_dot_product_attention over every row's slots up to the furthest row's position,
  a mask hiding each row's slots past its own; keys and values in the model's rule (GPT.setup_caches):
  fp32 for bf16 weights on a CPU without AMX (its bf16 SDPA runs several times slower than fp32), bf16
  with AMX (there the faster: 16 rows of the 10.8M model 9.0 against 12.3 ms a step).
- "compiled": the same attention as four tensor ops (`attend_rows`) compiled by inductor, keys and
  values kept in the weights' dtype: with bf16 weights the cache is bf16, half the bytes every step
  reads (against SDPA's fp32 where the CPU lacks AMX). Six layers at 16 rows over a hundred-odd positions, caches cold: SDPA over fp32 3.0-3.5 ms, the
  compiled way over bf16 1.2-1.7 ms, over fp32 2.35-2.73 ms (benchmarks/README.md, serve).
- "operator": the same attention in engine.cpu_matvec's operator (each head's keys read once, then its
  values), keys and values in the weights' dtype as "compiled", without a compile; on the CPU where the
  operators build. In 85M's streamed decode step it read bf16 keys and values at ~47 GB/s where
  inductor's loops read ~29 (engine.cpu_matvec).

Each way decodes a few steps of the model at the slot count, rounds alternated, and the fastest wins;
the choice is cached beside the layout's (choice_cache.CACHE_FILE) under its own key once every way that
applies to the model's device and dtype was timed (the operator applies on a CPU only). A way that
applies but cannot run now (no C++ compiler for inductor or the operator) is left out and the pick not
cached. No Lightning, Hydra or domain code here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from multiar.engine import cpu_matvec
from multiar.engine.choice_cache import machine_key, read_cache, write_cache
from multiar.engine.inductor_options import make_room
from multiar.engine.model import GPT
from multiar.engine.segments import Attend, Segments
from multiar.errors import first_line

log = logging.getLogger("multiar")

WAYS = ("sdpa", "compiled", "operator")


def attend_rows(q: Tensor, keys: Tensor, values: Tensor, positions: Tensor) -> Tensor:
    """q (d, nh, hs), keys/values (d, nh, n, hs) in any float dtype, positions (d,): row b attends to its
    slots 0 .. positions[b], in fp32 -> (d, nh, hs) in q's dtype."""
    scores = torch.einsum("bhd,bhnd->bhn", q.float(), keys.float()) * q.size(-1) ** -0.5  # (d, nh, n)
    seen = torch.arange(keys.size(2), device=keys.device) <= positions[:, None, None]
    weights = scores.masked_fill(~seen, float("-inf")).softmax(-1)
    return torch.einsum("bhn,bhnd->bhd", weights, values.float()).to(q.dtype)


def operator_applies(t: Tensor) -> bool:
    """Whether the attention operator takes keys like t (or a model with weights like t): fp32 or bf16,
    on the CPU."""
    return t.device.type == "cpu" and t.dtype in (torch.float32, torch.bfloat16)


def ways_here(model: GPT) -> tuple[str, ...]:
    """The WAYS that apply to the model's device and dtype: the operator where operator_applies to its
    weights only (elsewhere it never runs, and a pick is cached without it)."""
    applies = operator_applies(model.wte.weight)
    return WAYS if applies else tuple(w for w in WAYS if w != "operator")


def operator_runs(keys: Tensor) -> bool:
    """Whether operator_attend takes these keys: operator_applies, and engine.cpu_matvec built here."""
    return operator_applies(keys) and cpu_matvec.library() is not None


def operator_attend(
    q: Tensor, keys: Tensor, values: Tensor, positions: Tensor, rows: Tensor | None = None
) -> Tensor:
    """attend_rows through engine.cpu_matvec's operator (operator_runs(keys) first): the query in fp32
    and the output back in q's dtype, as attend_rows computes them (inside a compiled graph inductor
    drops a bf16 round trip within one loop, so an int8 model's query and output are not rounded to
    bf16 there either). rows (d,): query b reads row rows[b] of keys and values (whole caches)."""
    return cpu_matvec.decode_attention(q.float().contiguous(), keys, values, positions, rows).to(q.dtype)


def attend_for(keys: Tensor) -> Attend:
    """The attention a compiled step traces for these keys: engine.cpu_matvec's operator where it runs
    (each head's keys read once, then its values: ~47 GB/s of 85M's bf16 cache where inductor's fused
    ops read ~29), else attend_rows's ops."""
    return operator_attend if operator_runs(keys) else attend_rows


def compiled_attend_rows(
    n_head: int, head_size: int, max_seq_length: int, dtype: torch.dtype, device: torch.device
) -> Attend:
    """attend_rows compiled for every row count and length (dynamic shapes), for queries, keys and values
    of dtype (the weights') with n_head heads of head_size, keys and values read from a cache of
    max_seq_length positions. Inductor specializes a size of 1, so one row or one slot is doubled to two (the copy row
    is dropped; the copy slot comes after the row's position, masked). Compiled here, on the loading
    thread, for every case a step meets: a server whose kernel compiled again on its engine thread
    served 1,488 tokens/s where the same server without compiled 1,905 (benchmarks/README.md, serve)."""
    kernel = torch.compile(attend_rows, dynamic=True)
    make_room(7)  # its seven cases below: a server of several runs compiles attend_rows for each

    def attend(q: Tensor, keys: Tensor, values: Tensor, positions: Tensor) -> Tensor:
        d, q = q.size(0), q.contiguous()  # a split's view otherwise: its strides would be guarded
        if keys.size(2) == 1:
            keys, values = torch.cat([keys, keys], dim=2), torch.cat([values, values], dim=2)
        if d == 1:
            q, keys, values, positions = (torch.cat([t, t]) for t in (q, keys, values, positions))
        return kernel(q, keys, values, positions)[:d]

    # like the engine's: a cache made outside inference mode, read in it, in views; rows, lengths and the
    # cache's rows unlike each other and the heads' sizes (equal sizes at the first compile are guarded
    # equal, and a step where they are not would compile again, on the engine's thread); a view of the
    # cache's whole length has other strides (guarded too): with some rows, and with all of them
    full = max_seq_length
    rows, length, batch = [x for x in range(3, 99) if x not in (n_head, head_size, full)][:3]
    cache = torch.zeros(batch, n_head, full, head_size, dtype=dtype, device=device)
    with torch.inference_mode():
        for d, n in ((rows, length), (1, length), (rows, 1), (1, 1), (rows, full), (batch, full), (1, full)):
            q = torch.zeros(d, n_head, head_size, dtype=dtype, device=device)  # the activations'
            attend(q, cache[:d, :, :n], cache[:d, :, :n], torch.zeros(d, dtype=torch.long, device=device))
    return attend


@dataclass
class RowsAttention:
    """The way picked, the cache dtype it keeps keys and values in (None: the model's rule), the function
    a Segments step calls (None: SDPA), how it was decided, and each way's ms per step."""

    way: str
    kv_dtype: torch.dtype | None
    attend: Attend | None
    how: str
    step_ms: dict[str, float] = field(default_factory=dict)

    def log_line(self) -> str:
        timed = ", ".join(f"{k} {v:.2f}" for k, v in sorted(self.step_ms.items(), key=lambda kv: kv[1]))
        return f"rows attention {self.way}, {self.how}" + (f" (ms per step: {timed})" if timed else "")


def build_way(model: GPT, way: str) -> RowsAttention:
    """A way's attend function and cache dtype for model (a compiled one is compiled now); an error where
    it cannot run here."""
    if way == "sdpa":
        return RowsAttention("sdpa", None, None, "")
    c, weight = model.config, model.wte.weight
    if way == "operator":
        if not operator_runs(weight):
            raise RuntimeError(
                f"the attention operator does not run here ({weight.device.type}, {weight.dtype})"
            )
        return RowsAttention("operator", weight.dtype, operator_attend, "")
    attend = compiled_attend_rows(c.n_head, c.head_size, c.block_size, weight.dtype, weight.device)
    return RowsAttention("compiled", weight.dtype, attend, "")


def step_seconds(model: GPT, ways: dict[str, RowsAttention], slots: int, rounds: int = 3) -> dict[str, float]:
    """Seconds per decoding step of `slots` rows spread over the context (one row: at its end), for each
    way (its caches set up in its dtype, as the engine's), rounds alternated; the best round of each.
    Decoding steps only: a prompt chunk's attention over a bf16 cache (converted to fp32 per layer on a
    CPU without AMX) is not in the figure."""
    block = model.config.block_size
    device = model.wte.weight.device
    positions = torch.linspace(block - 1, 0, slots, device=device).long()
    ids = torch.zeros(slots, dtype=torch.long, device=device)
    best = {w: float("inf") for w in ways}
    for _ in range(rounds):
        for name, way in ways.items():
            model.setup_caches(max_batch_size=slots, max_seq_length=block, kv_dtype=way.kv_dtype)
            with torch.inference_mode():
                model.forward_segments(ids, Segments(slots, positions, attend=way.attend))
                _sync(device)
                start, steps = time.perf_counter(), 8
                for _ in range(steps):
                    model.forward_segments(ids, Segments(slots, positions, attend=way.attend))
                _sync(device)
                best[name] = min(best[name], (time.perf_counter() - start) / steps)
    model.clear_caches()
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cache_key(model: GPT, slots: int) -> str:
    """The machine (choice_cache.machine_key), slot count, the model's attention shapes, its dtype and its
    projections' kind (a quantized model's linears are other kernels)."""
    c = model.config
    return (
        f"rows attention | {machine_key(model.wte.weight.device)} | {slots} rows | "
        f"{c.n_layer}x{c.n_head}x{c.head_size} | block {c.block_size} | {model.wte.weight.dtype} | "
        f"{type(model.blocks[0].attn.qkv).__name__}"
    )


def choose_rows_attention(
    model: GPT,
    slots: int,
    asked: str = "auto",
    cache_file: Path | None = None,
    timer: Callable[[dict[str, RowsAttention]], dict[str, float]] | None = None,
) -> RowsAttention:
    """The way the model's decoding rows attend at `slots` rows: asked (one of WAYS) as is, or "auto":
    measured (timer: seconds per step of each way; tests inject one), or read from cache_file where that
    entry timed every way of WAYS. A way that fails to run here (no C++ compiler for inductor or the
    operator) is left out of the measurement, and the pick is not cached."""
    if asked not in ("auto", *WAYS):
        raise ValueError(f"attention={asked!r}: auto, {', '.join(WAYS[:-1])} or {WAYS[-1]}")
    if asked != "auto":
        way = build_way(model, asked)
        way.how = "forced"
        return way
    key = cache_key(model, slots)
    entry = read_cache(cache_file, key)
    here = ways_here(model)
    if entry is not None and entry.get("picked") in here and set(here) <= set(entry.get("step_ms", {})):
        try:
            way = build_way(model, entry["picked"])
            way.how, way.step_ms = "cached", dict(entry.get("step_ms", {}))
            return way
        except Exception as err:  # noqa: BLE001 (the compiler went away since: measure again)
            log.warning(
                "rows attention: cached %s does not run here now (%s)", entry["picked"], first_line(err)
            )
    ways = {}
    for w in here:
        try:
            ways[w] = build_way(model, w)
        except Exception as err:  # noqa: BLE001 (inductor fails many ways: no compiler, no headers)
            log.warning("rows attention: %s does not run here (%s)", w, first_line(err))
    step_ms = {w: 1e3 * s for w, s in (timer or (lambda ws: step_seconds(model, ws, slots)))(ways).items()}
    picked = min(step_ms, key=step_ms.__getitem__)
    if len(step_ms) == len(here):  # a way left out (no compiler yet) is measured again next time
        write_cache(cache_file, key, {"picked": picked, "step_ms": step_ms})
    way = ways[picked]
    way.how, way.step_ms = "measured", step_ms
    return way
