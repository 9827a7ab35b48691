"""How a float model's nn.Linears run a call of a few rows on a CPU: through engine.cpu_matvec's operator
(each weight read once, for all the call's rows, four at a time) up to a row count measured per
machine, else through F.linear (MKL / oneDNN).

On a Zen 3 EPYC (AVX2, no bf16 in hardware; session 40) the 85M model's 49 Linears took, F.linear
against the operator: fp32 at 1 row 23-25 ms against 13-15, at 16 rows 67-81 against 32-35, at 64
rows 139 against 187; bf16 at 16 rows 138-140 against 27-28, at 128 rows 1,114 against 336. A
prompt's prefill, an eager decode step, a scored batch and a slot engine's mixed step all go through
the model's Linears, so the rule serves each; a compiled step's Linears are its package's own
(engine.ahead_of_time traces F.linear here). Training never takes the operator (it has no backward).

The rule is measured per dtype (the model's layer shapes, one layer per shape, at ROWS), cached in
decode_layout.json under the operators' source digest, named in `DecodeChoice.kernels` under
"fp32 rows" / "bf16 rows" ("linear": every call on F.linear; "matvec up to 64 rows"; "matvec": every
count timed), and pinned by a resume (a journal from before the rule: "linear", as that run decoded).
No Lightning, Hydra or domain code here.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from multiar.engine import cpu_matvec
from multiar.engine.choice_cache import cache_key, parses, read_cache, write_cache

ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # the row counts timed, until the operator loses
LINEAR, OPERATOR = "linear", "matvec"
SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16"}
# (layers, one per shape) x rows -> (seconds on F.linear, seconds on the operator) for one call of each
RowsTimer = Callable[[list[nn.Linear], int], tuple[float, float]]


def rule_key(dtype: torch.dtype) -> str:
    """The key of DecodeChoice.kernels that names a dtype's rule: "fp32 rows", "bf16 rows"."""
    return f"{SHORT[dtype]} rows"


def is_rule_key(key: str) -> bool:
    return key in {rule_key(d) for d in SHORT}


def rule_rows(rule: str) -> int | None:
    """The most rows a rule sends to the operator: 0 for "linear", None for "matvec" (any count);
    ValueError for another name."""
    if rule == LINEAR:
        return 0
    if rule == OPERATOR:
        return None
    words = rule.split()
    if len(words) != 5 or words[:3] != [OPERATOR, "up", "to"] or words[4] != "rows" or not words[3].isdigit():
        raise ValueError(f"float rows rule: {rule!r} is not a rule (linear, matvec, 'matvec up to <n> rows')")
    return int(words[3])


def rule_name(rows: int | None) -> str:
    """rule_rows' inverse: 0 -> "linear", None -> "matvec", n -> "matvec up to n rows"."""
    if rows == 0:
        return LINEAR
    return OPERATOR if rows is None else f"{OPERATOR} up to {rows} rows"


def float_linears(model: nn.Module) -> list[nn.Linear]:
    """model's plain nn.Linears whose weights the operator takes: fp32 or bf16, on the CPU, where its
    float loops are vectors (engine.cpu_matvec.vectorized: a scalar build is no faster than F.linear;
    the library is built or loaded only where a layer is on the CPU)."""
    linears = [
        m
        for m in model.modules()
        if type(m) is nn.Linear and m.weight.dtype in SHORT and m.weight.device.type == "cpu"
    ]
    if not linears or cpu_matvec.library() is None or not cpu_matvec.vectorized():
        return []
    return linears


def rows_forward(linear: nn.Linear, most: int | None, x: Tensor) -> Tensor:
    """linear(x) through the operator where the call has at most `most` rows (None: any), x in the
    weight's dtype, and nothing asks for gradients or traces it; else F.linear."""
    w = linear.weight
    rows = x.numel() // linear.in_features if x.dim() else 0
    grads = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)
    if grads or torch.compiler.is_compiling() or x.dtype != w.dtype or (most is not None and rows > most):
        return F.linear(x, w, linear.bias)
    y = cpu_matvec.matvec(x.reshape(rows, linear.in_features), w)  # (rows, out) fp32
    y = y.to(x.dtype).reshape(*x.shape[:-1], linear.out_features)
    return y if linear.bias is None else y + linear.bias


def use_rule(linears: list[nn.Linear], rule: str) -> None:
    """Set a rule on the layers: the operator up to its row count (an instance forward over
    nn.Linear's; it refers to its layer, a cycle that only the cyclic GC frees: clear() a model that
    is dropped), or none ("linear")."""
    most = rule_rows(rule)
    for linear in linears:
        linear.__dict__.pop("forward", None)
        if most != 0:
            linear.forward = functools.partial(rows_forward, linear, most)


def clear(model: nn.Module) -> None:
    """Take every rule off model's plain nn.Linears (F.linear's every call), e.g. a candidate not
    picked, freed with the rest of it once dropped."""
    for m in model.modules():
        if type(m) is nn.Linear:
            m.__dict__.pop("forward", None)


def rows_seconds(layers: list[nn.Linear], rows: int, rounds: int = 3) -> tuple[float, float]:
    """Seconds for one call of every layer at `rows` rows on F.linear and on the operator; interleaved,
    the best round of each."""
    best = [float("inf"), float("inf")]
    with torch.inference_mode():
        inputs = [torch.randn(rows, m.in_features, dtype=m.weight.dtype) for m in layers]
        ways = [lambda m, x: F.linear(x, m.weight, m.bias), lambda m, x: rows_forward(m, None, x)]
        for r in range(rounds + 1):  # the first round warms up
            for way, run in enumerate(ways):
                start = time.perf_counter()
                for layer, x in zip(layers, inputs, strict=True):
                    run(layer, x)
                if r:
                    best[way] = min(best[way], time.perf_counter() - start)
    return best[0], best[1]


def choose_rows(
    model: nn.Module,
    cache_file: Path | None,
    pinned: dict[str, str] | None = None,
    timer: RowsTimer = rows_seconds,
    memo: dict[str, str] | None = None,
) -> dict[str, str]:
    """{"<dtype> rows": rule} for model's float nn.Linears, set on them (a rule set before taken off
    first): measured, cached, or as `pinned` (a resumed run's journaled kernels) names it ("linear"
    where it names none: a journal from before the rule); {} where no layer can take the operator
    (another device, no operators built). memo: rules decided before in the same preparation, reused
    (without a cache file, each call would measure anew and could differ)."""
    clear(model)
    linears = float_linears(model)
    if not linears:
        return {}
    key = rule_key(linears[0].weight.dtype)
    if pinned is not None:
        rule = pinned.get(key, LINEAR)
    elif memo is not None and key in memo:
        rule = memo[key]
    else:
        rule = _measured_rule(model, linears, cache_file, key, timer)
    if memo is not None:
        memo[key] = rule
    use_rule(linears, rule)
    return {key: rule}


def _measured_rule(
    model: nn.Module, linears: list[nn.Linear], cache_file: Path | None, key: str, timer: RowsTimer
) -> str:
    """A dtype's rule from the cache, else timed (one layer per shape) and cached: the operator up to
    the most rows at which it beat F.linear at that count and every smaller one timed."""
    cache = cache_key(model, None, f"{key} {OPERATOR} {cpu_matvec.source_digest()}")
    entry = read_cache(cache_file, cache)
    if entry is not None and parses(entry.get("rule"), rule_rows):
        return entry["rule"]
    shapes = list({(m.out_features, m.in_features): m for m in linears}.values())
    seconds: dict[int, tuple[float, float]] = {}
    most: int | None = 0
    for n in ROWS:
        seconds[n] = timer(shapes, n)
        if seconds[n][1] >= seconds[n][0]:
            break
        most = n
    else:
        most = None  # the operator at every count timed: at any
    rule = rule_name(most)
    ms = {str(n): [round(1e3 * s, 3) for s in t] for n, t in seconds.items()}
    write_cache(cache_file, cache, {"rule": rule, "ms_linear_matvec": ms})
    return rule


def without_linear_rules(kernels: dict[str, str]) -> dict[str, str]:
    """kernels without the rules that keep every call on F.linear: how journals from before the rule
    recorded the same decoding."""
    return {k: v for k, v in kernels.items() if not (is_rule_key(k) and v == LINEAR)}
