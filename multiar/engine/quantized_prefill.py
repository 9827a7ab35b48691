"""How a quantized layer runs a call of many rows (a prompt's prefill, a scored document): on its int8 or
int4 kernel, or with its weight dequantized for that call and one dense GEMM, from a row count measured
per machine.

torch's `_weight_int8pack_mm` works row after row, so its time grows with the rows, while a dense GEMM
(oneDNN's bf16 on an AMX CPU) costs about the same from 1 row to a few hundred. The 85M model's 49 int8
layers on a 2-core AMX Xeon: the kernel 8 ms at 1 row, 29 at 16, 83 at 64, 311 at 256; dequantized to
bf16 and multiplied, 22, 25, 31 and 49 ms. The int4 kernel grows the same way (48 layers: 19 ms at 16
rows, 270 at 256) and its dequantization costs more (its 4-bit groups: ~67 ms for the 48 layers), so the
two cross later, near 100 rows (benchmarks/README.md, issue 19). Where they cross depends on the CPU, so
it is measured per mode: the model's layer shapes of that mode timed both ways at 4 to 256 rows, and
calls of at least the fewest rows from which the dense GEMM wins at every larger count measured take
it: any call, a prefill, a scored batch, or an eager decode step of that many rows (batch_size >= the
count). Where engine.cpu_matvec's operators are built, the calls below that count may run the layer's
operator instead of its kernel (it reads the codes once for all rows; a decode step's one or two rows
too, so a layer's "own kernel" among engine.quantized_kernels' candidates is then the operator): timed at
the same counts, it takes them where it beats the kernel at every count timed below the dense GEMM's
count against it (a call of more rows than the most timed, 256, takes what 256 took). On a Zen 3 EPYC
(AVX2, no bf16 in hardware; session 38) the 85M model's 49 int8 layers at 16 rows: the int8 kernel (fp32
activations there) 789 ms, dense fp32 91, the operator 24; at 64 rows 3,181 / 163 / 99. Each mode's rule
is a kernel choice like the per-shape ones (`engine.layout`): named in `DecodeChoice.kernels` under "int8
prefill" / "int4 prefill" ("int8", "fp32 from 4 rows", "matvec", "matvec, fp32 from 128 rows"), cached in
decode_layout.json, pinned by a resume (a journal from before the rules: every call on the kernel, as
that run did). A compiled graph's calls keep the kernel (inductor's int8 GEMM is its own). No Lightning,
Hydra or domain code here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from multiar.engine import cpu_matvec
from multiar.engine.choice_cache import cache_key, parses, read_cache, write_cache
from multiar.engine.quantize import INT4_GROUP, MODES, Int4Linear, Int8Linear, kernel_name, quantized_mode

ROWS = (4, 8, 16, 32, 64, 128, 256)  # the row counts timed
SHORT_NAMES = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}

Quantized = Int8Linear | Int4Linear
# (layers of one mode, one per shape) x rows -> (seconds on the kernel, seconds dense[, seconds on the
# operator, where the layers have one]) for one call of each
RowsTimer = Callable[[list[Quantized], int], tuple[float, ...]]
OPERATOR = "matvec"  # a rule's first word where calls below its dense count run the operator


def prefill_key(mode: str) -> str:
    """The key of DecodeChoice.kernels that names a mode's rule: "int8 prefill", "int4 prefill"."""
    return f"{mode} prefill"


def is_prefill_key(key: str) -> bool:
    return key in {prefill_key(mode) for mode in MODES}


def rule_name(rows: int, layer: Quantized, operator: bool = False) -> str:
    """A rule as DecodeChoice.kernels names it: the mode ("int8", "int4": the kernel for every call) or
    "bf16 from 64 rows" (the dense GEMM's dtype, from that many rows of a call on), and with operator
    "matvec" or "matvec, bf16 from 64 rows" (the operator in place of the kernel)."""
    dtype = layer.activation_dtype()
    dense = f"{SHORT_NAMES.get(dtype, str(dtype).removeprefix('torch.'))} from {rows} rows"
    if operator:
        return f"{OPERATOR}, {dense}" if rows else OPERATOR
    return dense if rows else kernel_name(layer)


def rule_rows(name: str) -> int:
    """The row count a rule's name says (0: no call dense); ValueError for another name."""
    if name in MODES or name == OPERATOR:
        return 0
    words = name.removeprefix(f"{OPERATOR}, ").split()
    if len(words) != 4 or words[1] != "from" or words[3] != "rows" or not words[2].isdigit():
        raise ValueError(
            f"prefill rule: {name!r} is not a rule (int8, int4, matvec, '[matvec, ]<dtype> from <n> rows')"
        )
    return int(words[2])


def on_operator(name: str) -> bool:
    """Whether a rule runs the calls below its dense count on the operator."""
    return name == OPERATOR or name.startswith(f"{OPERATOR}, ")


def is_rule(name: object) -> bool:
    """Whether name is a rule's name."""
    return parses(name, rule_rows)


def has_operator(layer: Quantized) -> bool:
    """Whether engine.cpu_matvec has an operator for this layer: built, the layer on the CPU (int4: in
    groups of INT4_GROUP inputs, the operator's)."""
    groups_fit = not isinstance(layer, Int4Linear) or layer.group_size == INT4_GROUP
    return groups_fit and layer.weight.device.type == "cpu" and cpu_matvec.library() is not None


def _operator(layer: Quantized) -> Callable:
    """The layer's engine.cpu_matvec operator: (x fp32, *layer.operator_inputs()) -> (N, out) fp32."""
    return cpu_matvec.int4_matvec if isinstance(layer, Int4Linear) else cpu_matvec.int8_matvec


def operator_of(layer: Quantized) -> Callable | None:
    """The layer's operator where it has one (has_operator); else None."""
    return _operator(layer) if has_operator(layer) else None


def operator_matvec(layer: Quantized, rows: torch.Tensor) -> torch.Tensor:
    """A quantized layer's (N, in) rows -> (N, out) fp32 through its operator (has_operator checked
    before; no check here, a decode step's hot path): the codes read once for all N rows."""
    return _operator(layer)(rows.float(), *layer.operator_inputs())


def rows_seconds(layers: list[Quantized], rows: int, rounds: int = 3) -> tuple[float, ...]:
    """Seconds for one call of every layer at `rows` rows: on the kernel, dense, and (where the layers
    have one) on the operator; interleaved, best round of each."""
    ways = [(0, None), (1, None)]  # (dense_from, operator)
    operators = [operator_of(m) for m in layers]
    if all(operators):
        ways.append((0, True))
    best = [float("inf")] * len(ways)
    with torch.inference_mode():
        inputs = [torch.randn(rows, m.in_features, device=m.weight.device) for m in layers]
        for r in range(rounds + 1):  # the first round warms up
            for way, (dense_from, operator) in enumerate(ways):
                start = time.perf_counter()
                for layer, op, x in zip(layers, operators, inputs, strict=True):
                    kept = layer.dense_from, layer.operator
                    layer.dense_from, layer.operator = dense_from, op if operator else None
                    try:
                        layer(x)
                    finally:
                        layer.dense_from, layer.operator = kept
                if r:
                    best[way] = min(best[way], time.perf_counter() - start)
    return tuple(best)


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
    model: nn.Module,
    cache_file: Path | None,
    pinned: dict[str, str] | None = None,
    timer: RowsTimer = rows_seconds,
) -> dict[str, str]:
    """{"<mode> prefill": rule} for each mode of model's quantized layers on their kernel, set on them:
    measured, cached, or as `pinned` (a resumed run's journaled kernels) names it, a mode it does not
    name on its kernel for every call (a journal from before the rules); {} where no layer is on a
    kernel (another device, a torch without the kernels): nothing to choose."""
    rules = {}
    for mode in MODES:  # each mode's rule: its own kernel's crossing
        layers = [m for m in _layers(model, mode) if m.on_kernel()]
        if not layers:
            continue
        key = prefill_key(mode)
        if pinned is not None:  # a journal's kernels; a mode they do not name: the kernel (an old one)
            rule = pinned.get(key, mode)
        else:
            rule = _measured_rule(model, layers, cache_file, key, timer)
        use_prefill(model, mode, rule)
        rules[key] = rule
    return rules


def _measured_rule(
    model: nn.Module, layers: list[Quantized], cache_file: Path | None, key: str, timer: RowsTimer
) -> str:
    """A mode's rule from the cache, else timed (one layer per shape) and cached."""
    # the model's mode too: an int4 model's int8 layers (its head) are not an int8 model's of one shape
    # the operator a candidate too: a rule cached where it was none, or on another version of it, is
    # measured again
    offered = f" {OPERATOR} {cpu_matvec.source_digest()}" if all(operator_of(m) for m in layers) else ""
    cache = cache_key(model, None, f"{key}, quantize={quantized_mode(list(model.modules()))}{offered}")
    entry = read_cache(cache_file, cache)
    if entry is not None and is_rule(entry.get("rule")):
        return entry["rule"]
    # none cached, or an entry that is not a rule (edited by hand): measured again
    shapes = list({(m.out_features, m.in_features): m for m in layers}.values())
    seconds = {n: timer(shapes, n) for n in ROWS}
    # the operator below the dense count where it beats the kernel at every count timed below it
    operator_timed = all(len(t) > 2 for t in seconds.values())
    rows = fewest_dense_rows({n: (t[2], t[1]) for n, t in seconds.items()}) if operator_timed else 0
    below = [t for n, t in seconds.items() if not rows or n < rows]
    operator = operator_timed and all(t[2] < t[0] for t in below)
    if not operator:  # the kernel below the dense count
        rows = fewest_dense_rows({n: (t[0], t[1]) for n, t in seconds.items()})
    rule = rule_name(rows, layers[0], operator)
    ms = {str(n): [round(1e3 * s, 3) for s in times] for n, times in seconds.items()}
    timed = "ms_kernel_dense" + (f"_{OPERATOR}" if operator_timed else "")
    write_cache(cache_file, cache, {"rule": rule, timed: ms})
    return rule


def use_prefill(model: nn.Module, mode: str, rule: str) -> None:
    """Set a rule (as rule_name names it) on every layer of model of that mode: its dense count, and its
    operator where the rule names it and the layer has one (a resumed run's rule on a machine without
    the operators: the kernel)."""
    rows = rule_rows(rule)
    for m in _layers(model, mode):
        m.dense_from = rows
        m.operator = operator_of(m) if on_operator(rule) else None


def _layers(model: nn.Module, mode: str) -> list[Quantized]:
    return [m for m in model.modules() if isinstance(m, Quantized) and kernel_name(m) == mode]


def without_on_kernel_rules(kernels: dict[str, str]) -> dict[str, str]:
    """kernels without the rules that keep every call on the kernel: how journals from before the rules
    recorded the same decoding."""
    return {k: v for k, v in kernels.items() if not (is_prefill_key(k) and v in MODES)}
