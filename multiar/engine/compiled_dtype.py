"""The dtype a compiled float decode step is built in, fp32 or bf16, chosen by timing what dominates that
step here: one pass over the model's Linear weights at the batch's rows, in each dtype, through the
kernels a compiled CPU step may run them with (engine.ahead_of_time's GEMMs):

- `matvec`: engine.cpu_matvec's operator, what a streamed package calls (up to streamed_rows() rows,
  where the operator is built and vectorized, and a package may stream: ahead of time, its GEMMs
  measured or pinned to streamed);
- `packed`: oneDNN's packed Linear (engine.packed), the frozen, packed weights ATen's and autotuned
  GEMMs run on, where oneDNN packs that dtype; else `linear`, F.linear.

Each dtype's fastest kernel stands for it; the faster dtype is built. The eager step's timings (what
the choice used before) foretell it badly since the step streams its weights: at 10.8M batch 1 on the
Zen 5 EPYC an eager fp32 packed step timed 2.57 ms against bf16 packed's 2.72 (Python's overhead and
the noise, not the weights), so fp32 was built, and compile=true ran 1,058-1,145 tokens/s where bf16's
streamed package ran 2,671-2,937 in earlier runs (benchmarks/README.md, session 34).

The pick and its figures are cached in decode_layout.json beside the eager choice (its key also names
the kernels timed and the engine's code: a kernel gone or pinned off, or changed, is timed anew), so
the same settings build the same dtype. The pass holds a bf16 copy and the packed copies of every
weight while it runs (at 85M ~0.7 GB), none after. No Lightning, Hydra or domain code here.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from multiar.engine import ahead_of_time, cpu_matvec
from multiar.engine.choice_cache import cache_key, read_cache, write_cache
from multiar.engine.decode_choice import TORCH_DTYPES
from multiar.engine.packed import PACK_ROWS, PackedLinear, packs

log = logging.getLogger("multiar")

ROUNDS = 5  # timed passes of every (dtype, kernel) in turns, after one untimed; the median counts

# (model, rows, {dtype name: its kernels}) -> {"<dtype> <kernel>": seconds per pass over the weights};
# injected by tests
WeightsTimer = Callable[[nn.Module, int, dict[str, list[str]]], dict[str, float]]


def kernels(dtype: torch.dtype, rows: int, gemms: str | None = None) -> list[str]:
    """The kernels a compiled step may run dtype's weights through at `rows` rows, on this CPU, its
    GEMMs as gemms pins them (None: MULTIAR_COMPILE_GEMMS's)."""
    streams = ahead_of_time.enabled() and (gemms or ahead_of_time.gemms_asked()) in ("auto", "streamed")
    streams = streams and rows <= ahead_of_time.streamed_rows() and cpu_matvec.vectorized()
    streamed = ["matvec"] if streams and cpu_matvec.library() is not None else []  # built only if it may run
    return [*streamed, "packed" if rows <= PACK_ROWS and packs(dtype) else "linear"]


def weights_seconds(model: nn.Module, rows: int, kernel_names: dict[str, list[str]]) -> dict[str, float]:
    """Seconds of one pass over model's Linear weights (fp32, on the CPU) at `rows` rows, for each dtype
    and each of its kernels ("bf16 matvec", ...): each pass every Linear once, in model order, as a
    decode step reads them; every (dtype, kernel) in turns, ROUNDS rounds, the median of each."""
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    passes: dict[str, list[Callable[[], torch.Tensor]]] = {}
    for name, names in kernel_names.items():
        weights = [m.weight.detach().to(TORCH_DTYPES[name]) for m in linears]
        xs = [torch.randn(rows, w.size(1), dtype=w.dtype) for w in weights]
        for kernel in names:
            passes[f"{name} {kernel}"] = [_call(kernel, w, x) for w, x in zip(weights, xs, strict=True)]
    times: dict[str, list[float]] = {name: [] for name in passes}
    with torch.inference_mode():
        for r in range(ROUNDS + 1):
            for name, calls in passes.items():
                start = time.perf_counter()
                for call in calls:
                    call()
                if r:  # the first round warms up
                    times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _call(kernel: str, w: torch.Tensor, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """x @ w.T through kernel, as a call of no arguments (a packed weight packed once, here)."""
    if kernel == "matvec":
        return lambda: cpu_matvec.matvec(x, w)
    if kernel == "packed":
        linear = nn.Linear(w.size(1), w.size(0), bias=False, device="meta")  # no weight of its own
        linear.weight = nn.Parameter(w, requires_grad=False)
        packed = PackedLinear(linear)
        return lambda: packed(x)
    return lambda: F.linear(x, w)


def compiled_dtype(
    fp32_model: nn.Module,
    batch_size: int,
    cache_file: Path | None,
    gemms: str | None = None,
    timer: WeightsTimer | None = None,
) -> tuple[str, dict[str, float]]:
    """The dtype whose weights read faster at batch_size rows (each dtype's fastest kernel; gemms: a
    compiled step's GEMMs pinned, as for `kernels`), and the figures in ms ("<dtype> <kernel>"): cached,
    or measured on fp32_model (the fp32 copy either dtype is built from; timer: weights_seconds, looked
    up at the call) and cached."""
    names = {name: kernels(dtype, batch_size, gemms) for name, dtype in TORCH_DTYPES.items()}
    timed = ", ".join(f"{name} {kernel}" for name, ks in names.items() for kernel in ks)
    key = cache_key(fp32_model, batch_size, f"compiled dtype ({timed}) {ahead_of_time.code_digest()}")
    entry = read_cache(cache_file, key)
    if entry is not None and entry.get("picked") in TORCH_DTYPES:
        return entry["picked"], dict(entry.get("weights_ms") or {})
    seconds = (timer or weights_seconds)(fp32_model, batch_size, names)
    weights_ms = {name: 1e3 * s for name, s in seconds.items()}
    best = {d: min(ms for k, ms in weights_ms.items() if k.split()[0] == d) for d in names}
    picked = min(best, key=best.get)
    write_cache(cache_file, key, {"picked": picked, "weights_ms": weights_ms})
    log.info(
        "compiled step in %s: its weights read fastest so (ms a pass at %d rows: %s)",
        picked,
        batch_size,
        ", ".join(f"{k} {v:.2f}" for k, v in sorted(weights_ms.items(), key=lambda kv: kv[1])),
    )
    return picked, weights_ms
