"""How a served model's decoding steps run, `step=`: `eager` (every op dispatched from Python, weights in
the layout generate measures fastest), `captured` (each step, decoding rows and prompt chunks, as one
compiled graph, engine.captured_step: nn.Linear weights, which inductor freezes and packs itself), or
`auto`: both built and timed at `slots` rows spread over the context, rounds alternated, the faster kept. The choice is
cached per machine, slot count, model shape and the keys that narrow it ($MULTIAR_CACHE/
decode_layout.json), so a later start builds the winner only. A captured step that fails to build
(inductor needs a C++ compiler on a CPU), now or since its choice was cached, leaves eager, with one
warning line."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig

from multiar.commands.sampling_setup import sampling_model
from multiar.engine import cpu_matvec
from multiar.engine.captured_step import CapturedStep
from multiar.engine.choice_cache import machine_key, read_cache, write_cache
from multiar.engine.float_rows import float_linears
from multiar.engine.model import GPT
from multiar.engine.rows_attention import RowsAttention, choose_rows_attention
from multiar.engine.segments import Segments
from multiar.errors import first_line
from multiar.run_folder import Run

log = logging.getLogger("multiar")

STEPS = ("eager", "captured")

# a timer: (step name -> one decoding step of `slots` rows) -> seconds per step of each; tests inject one
Timer = Callable[[dict[str, Callable[[], object]]], dict[str, float]]


@dataclass
class ServedModel:
    """A run's model as its engine steps it: the weights, the rows' attention, whether steps without a
    prompt chunk run captured, how that was decided, and each way's ms per step where measured."""

    model: GPT
    attention: RowsAttention
    step: str  # eager | captured
    how: str  # forced | measured | cached | only candidate
    step_ms: dict[str, float] = field(default_factory=dict)

    def log_line(self) -> str:
        timed = ", ".join(f"{k} {v:.2f}" for k, v in sorted(self.step_ms.items(), key=lambda kv: kv[1]))
        return f"{self.step} steps, {self.how}" + (f" (ms per step at slots rows: {timed})" if timed else "")


def build(
    run: Run, cfg: DictConfig, step: str, cache_file: Path, copy: bool = False
) -> tuple[GPT, RowsAttention]:
    """The run's model laid out for `step` (captured: nn.Linear) and its rows' attention; copy: from a
    copy of the run's weights (laying out converts them in place)."""
    layout = "linear" if step == "captured" else cfg.layout
    if copy:
        run = dataclasses.replace(run, model=deepcopy(run.model))
    model, _ = sampling_model(run, cfg.quantize, cfg.dtype, layout=layout, batch_size=cfg.slots)
    return model, choose_rows_attention(model, cfg.slots, cfg.attention, cache_file)


def cache_key(run: Run, cfg: DictConfig) -> str:
    c = run.model.config
    return (
        f"serve step | {machine_key(run.model.wte.weight.device)} | {cfg.slots} rows | "
        f"{c.n_layer}x{c.n_head}x{c.head_size} | mlp {run.model.blocks[0].mlp.down.in_features} | "
        f"block {c.block_size} | vocab {c.vocab_size} | "
        f"dtype {cfg.dtype} | layout {cfg.layout} | quantize {cfg.quantize} | attention {cfg.attention}"
        # eager steps' Linears on the operator (engine.float_rows): a pick timed without it, or on
        # another version of it, is timed again
        + (f" | rows matvec {cpu_matvec.source_digest()}" if float_linears(run.model) else "")
    )


def best_seconds(
    steps: dict[str, Callable[[], object]], device: torch.device, rounds: int = 3, calls: int = 8
) -> dict[str, float]:
    """Seconds per call of each step, the best of `rounds` rounds of `calls` calls, rounds alternated
    (on a GPU each round waits for its kernels: a launch is not a step)."""
    best = {name: float("inf") for name in steps}
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        for _ in range(rounds):
            for name, step in steps.items():
                step()
                sync()
                start = time.perf_counter()
                for _ in range(calls):
                    step()
                sync()
                best[name] = min(best[name], (time.perf_counter() - start) / calls)
    return best


def decoding_steps(
    eager: tuple[GPT, RowsAttention], captured: CapturedStep, slots: int
) -> dict[str, Callable]:
    """One decoding step of `slots` rows spread over the context (the furthest at its end), each way;
    the eager model's caches set up in its attention's dtype, the captured one's already are."""
    model, attention = eager
    block, device = model.config.block_size, model.wte.weight.device
    model.setup_caches(max_batch_size=slots, max_seq_length=block, kv_dtype=attention.kv_dtype)
    positions = torch.linspace(block - 1, 0, slots, device=device).long()
    ids = torch.zeros(slots, dtype=torch.long, device=device)
    rows = torch.arange(slots, device=device)
    return {
        "eager": lambda: model.forward_segments(ids, Segments(slots, positions, attend=attention.attend)),
        "captured": lambda: captured(ids, rows, positions, block, rows.clone()),  # not one tensor twice
    }


def captured_candidate(
    run: Run, cfg: DictConfig, cache_file: Path
) -> tuple[GPT, RowsAttention, CapturedStep]:
    """The captured way, built (compiled) from a copy of the run's weights; raises where it cannot be."""
    model, attention = build(run, cfg, "captured", cache_file, copy=True)
    block = model.config.block_size
    model.setup_caches(max_batch_size=cfg.slots, max_seq_length=block, kv_dtype=attention.kv_dtype)
    return model, attention, CapturedStep(model, cfg.slots)


def release(model: GPT) -> None:
    """A candidate's caches freed (a captured one keeps them otherwise)."""
    model.keep_caches = False
    model.clear_caches()


def served_model(run: Run, cfg: DictConfig, cache_file: Path, timer: Timer | None = None) -> ServedModel:
    """The run's model for its engine, its steps eager or captured as cfg.step asks (auto: the faster
    here, measured or cached). The run's own weights are laid out for eager steps when those are
    served; the captured way is built from a copy."""
    if cfg.step != "auto" or cfg.layout == "packed":  # packed weights: inductor cannot lower them
        step = "eager" if cfg.step == "auto" else cfg.step
        how = "forced" if cfg.step != "auto" else "only candidate"
        return ServedModel(*build(run, cfg, step, cache_file), step, how)
    key = cache_key(run, cfg)
    entry = read_cache(cache_file, key)
    picked = entry.get("picked") if entry is not None else None
    if picked == "eager":
        return ServedModel(*build(run, cfg, "eager", cache_file), "eager", "cached", dict(entry["step_ms"]))
    try:  # only the captured way's build is guarded: an eager build's error is the load's own
        captured = captured_candidate(run, cfg, cache_file)
    except Exception as err:  # noqa: BLE001 (inductor fails many ways: no compiler, no headers)
        log.warning("serve: a captured step does not build here (%s): eager steps", first_line(err))
        return ServedModel(*build(run, cfg, "eager", cache_file), "eager", "only candidate")
    if picked == "captured":
        return ServedModel(captured[0], captured[1], "captured", "cached", dict(entry["step_ms"]))
    eager = build(run, cfg, "eager", cache_file)
    device = eager[0].wte.weight.device
    seconds = (timer or (lambda steps: best_seconds(steps, device)))(
        decoding_steps(eager, captured[2], cfg.slots)
    )
    eager[0].clear_caches()
    step_ms = {name: 1e3 * s for name, s in seconds.items()}
    picked = min(step_ms, key=step_ms.__getitem__)
    write_cache(cache_file, key, {"picked": picked, "step_ms": step_ms})
    if picked == "eager":
        release(captured[0])
        return ServedModel(*eager, "eager", "measured", step_ms)
    release(eager[0])
    return ServedModel(captured[0], captured[1], "captured", "measured", step_ms)
