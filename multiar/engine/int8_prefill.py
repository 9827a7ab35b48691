"""How an int8 layer runs a call of many rows (a prompt's prefill, a scored document): on the int8 kernel,
or with its weight dequantized for that call and one dense GEMM, from a row count measured per machine.

torch's `_weight_int8pack_mm` works row after row, so its time grows with the rows, while a dense GEMM
(oneDNN's bf16 on an AMX CPU) costs about the same from 1 row to a few hundred. The 85M model's 49 int8
layers on a 2-core AMX Xeon: the kernel 8 ms at 1 row, 29 at 16, 83 at 64, 311 at 256; dequantized to
bf16 and multiplied, 22, 25, 31 and 49 ms (benchmarks/README.md, issue 19). Where the two cross depends
on the CPU, so it is measured: the int8 layer shapes timed both ways at 4 to 256 rows, and calls of at
least the fewest rows from which the dense GEMM wins at every larger count measured take it: any call,
a prefill, a scored batch, or an eager decode step of that many rows (batch_size >= the count). The
rule is a kernel choice like the per-shape ones (`engine.layout`): named in `DecodeChoice.kernels`
under `PREFILL`, cached in decode_layout.json, pinned by a resume (a journal from before the rule:
every call on the kernel, as that run did). A compiled graph's calls keep the int8 kernel (inductor's
int8 GEMM is its own). int4 layers are left out: dequantizing their groups per call
costs more than the kernel up to ~200 rows. No Lightning, Hydra or domain code here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from multiar.engine.choice_cache import cache_key, read_cache, write_cache
from multiar.engine.quantize import Int8Linear

PREFILL = "int8 prefill"  # the key of DecodeChoice.kernels that names the rule
ROWS = (4, 8, 16, 32, 64, 128, 256)  # the row counts timed
ON_KERNEL = "int8"  # the rule's name when the kernel serves every call
SHORT_NAMES = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}

# (int8 layers, one per shape) x rows -> (seconds on the kernel, seconds dense) for one call of each
RowsTimer = Callable[[list[Int8Linear], int], tuple[float, float]]


def rule_name(rows: int, layer: Int8Linear) -> str:
    """The rule as DecodeChoice.kernels names it: "int8" (the kernel for every call) or "bf16 from 64
    rows" (the dense GEMM's dtype, from that many rows of a call on)."""
    if not rows:
        return ON_KERNEL
    dtype = layer.activation_dtype()
    return f"{SHORT_NAMES.get(dtype, str(dtype).removeprefix('torch.'))} from {rows} rows"


def rule_rows(name: str) -> int:
    """The row count a rule's name says (0: the kernel for every call); ValueError for another name."""
    if name == ON_KERNEL:
        return 0
    words = name.split()
    if len(words) != 4 or words[1] != "from" or words[3] != "rows" or not words[2].isdigit():
        raise ValueError(f"{PREFILL}: {name!r} is not a rule (int8, or '<dtype> from <n> rows')")
    return int(words[2])


def is_rule(name: object) -> bool:
    """Whether name is a rule's name."""
    try:
        rule_rows(name)
    except (ValueError, AttributeError):
        return False
    return True


def rows_seconds(layers: list[Int8Linear], rows: int, rounds: int = 3) -> tuple[float, float]:
    """Seconds for one call of every layer at `rows` rows, on the kernel and dense, interleaved, best
    round of each."""
    best = [float("inf"), float("inf")]
    with torch.inference_mode():
        inputs = [torch.randn(rows, m.in_features, device=m.weight.device) for m in layers]
        for r in range(rounds + 1):  # the first round warms up
            for way, dense_from in enumerate((0, 1)):
                start = time.perf_counter()
                for layer, x in zip(layers, inputs, strict=True):
                    kept = layer.dense_from
                    layer.dense_from = dense_from
                    try:
                        layer(x)
                    finally:
                        layer.dense_from = kept
                if r:
                    best[way] = min(best[way], time.perf_counter() - start)
    return best[0], best[1]


def fewest_dense_rows(seconds: dict[int, tuple[float, float]]) -> int:
    """The fewest rows from which the dense GEMM is faster at that count and every larger one timed
    (0: at none)."""
    rows = 0
    for n in sorted(seconds, reverse=True):
        kernel, dense = seconds[n]
        if dense >= kernel:
            break
        rows = n
    return rows


def choose_prefill(
    model: nn.Module, cache_file: Path | None, pinned: str | None = None, timer: RowsTimer = rows_seconds
) -> dict[str, str]:
    """{PREFILL: rule} for model's int8 layers, set on each of them (measured, cached, or `pinned` as a
    resumed run's journal names it); {} where the model has no int8 layer on the int8 kernel (int4,
    another device, a torch without the kernel): nothing to choose."""
    layers = [m for m in model.modules() if isinstance(m, Int8Linear) and m.on_kernel()]
    if not layers:
        return {}
    if pinned is not None:
        rule = pinned
    else:
        key = cache_key(model, None, PREFILL)
        entry = read_cache(cache_file, key)
        if entry is not None and is_rule(entry.get("rule")):
            rule = entry["rule"]
        else:  # none cached, or an entry that is not a rule (edited by hand): measured again
            shapes = list({(m.out_features, m.in_features): m for m in layers}.values())
            seconds = {n: timer(shapes, n) for n in ROWS}
            rule = rule_name(fewest_dense_rows(seconds), layers[0])
            ms = {str(n): [round(1e3 * s, 3) for s in pair] for n, pair in seconds.items()}
            write_cache(cache_file, key, {"rule": rule, "ms_kernel_dense": ms})
    use_prefill(model, rule)
    return {PREFILL: rule}


def use_prefill(model: nn.Module, rule: str) -> None:
    """Set a rule (as rule_name names it) on every int8 layer of model."""
    rows = rule_rows(rule)
    for m in model.modules():
        if isinstance(m, Int8Linear):
            m.dense_from = rows
