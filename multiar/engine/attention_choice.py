"""Which attention a training step's full-sequence pass runs: SDPA's flash kernels or batched matmuls
(engine.model.matmul_attention), picked by timing one layer's forward and backward of each at the
training shape, dtype and dropout, once per machine and shape (kept in `decode_layout.json` beside the
decode choices). Passes without gradients (validation, scoring) and the cached ones (prefill, decode)
keep SDPA, whose forward is the faster.

Why measure: on a 2-core Xeon with AMX, bf16, 8 x 6 heads x 256 tokens x 64, SDPA's forward and backward
took 14.3 ms and the matmuls 6.2 (its flash backward alone ~12 ms); at 1,024 tokens SDPA 49 ms against
93, and in fp32 they tie (16.2 against 16.7 ms). The bf16 10.8M training step went from 0.88-0.91x
nanoGPT's to 1.02-1.03x eager and to 1.26-1.29x compiled (benchmarks/README.md, training). The matmul path keeps
each layer's (T, T) probabilities for the backward: past SCORES_BUDGET bytes for the whole model it is
not tried. On a GPU SDPA's flash kernels are used unmeasured. No Lightning, Hydra or domain code here.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypedDict

import torch
import torch.nn.functional as F

from multiar.engine.choice_cache import machine_key, read_cache, write_cache
from multiar.engine.compile_choice import synchronize
from multiar.engine.matmul_attention import causal_bias, matmul_attention
from multiar.engine.model import ModelConfig

SETTINGS = ("auto", "sdpa", "matmul")
KINDS = ("sdpa", "matmul")
SCORES_BUDGET = 2**30  # bytes: what every layer's backward keeps of its (B, nh, T, T) probabilities
ROUNDS = 5

Shape = tuple[int, int, int, int]  # (B, nh, T, hs)
Timer = Callable[[Shape, torch.dtype, torch.device, float], dict[str, float]]


class AttentionChoice(TypedDict, total=False):
    attention: str  # sdpa | matmul
    how: str  # forced | measured | cached | why it was not measured
    ms: dict[str, float]  # each kind's forward and backward, one layer
    shape: str  # "B x nh x T x hs dtype, dropout p" as timed


def attention_seconds(
    shape: Shape, dtype: torch.dtype, device: torch.device, dropout: float
) -> dict[str, float]:
    """Each kind's median seconds of one layer's forward and backward over ROUNDS interleaved rounds (after
    a warm-up round), on q, k, v laid out as the model's are (views of one (B, T, 3 nh, hs) projection).
    Its own random stream: the run's (dropout masks, data order) is left where it was."""
    B, nh, T, hs = shape
    with torch.random.fork_rng(devices=[]):
        qkv = torch.randn(B, T, 3 * nh, hs, dtype=dtype, device=device, requires_grad=True)
        q, k, v = (t.transpose(1, 2) for t in qkv.split(nh, dim=2))  # (B, nh, T, hs) views
        grad = torch.randn(shape, dtype=dtype, device=device)
        bias = causal_bias(T, dtype, device)
        times: dict[str, list[float]] = {kind: [] for kind in KINDS}
        for r in range(ROUNDS + 1):
            for kind in KINDS:
                synchronize(device)
                start = time.perf_counter()
                if kind == "sdpa":
                    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
                else:
                    y = matmul_attention(q, k, v, bias, dropout)
                torch.autograd.grad(y, qkv, grad)
                synchronize(device)
                if r:
                    times[kind].append(time.perf_counter() - start)
    return {kind: statistics.median(t) for kind, t in times.items()}


def choose_attention(
    setting: str,
    config: ModelConfig,
    batch_size: int,
    dtype: torch.dtype,
    device: torch.device,
    cache_file: Path | None = None,
    timer: Timer = attention_seconds,
) -> AttentionChoice:
    """Which attention config's model trains with on (batch_size, block_size) blocks in dtype (the autocast
    dtype, else the weights'), at its dropout: as set, or the faster one measured (or cached)."""
    if setting not in SETTINGS:
        raise ValueError(f"attention must be one of {', '.join(SETTINGS)}, got {setting!r}")
    if setting != "auto":
        return {"attention": setting, "how": "forced"}
    if device.type != "cpu":
        return {"attention": "sdpa", "how": "flash kernels on a GPU, not measured"}
    shape = (batch_size, config.n_head, config.block_size, config.head_size)
    where = f"{'x'.join(map(str, shape))} {str(dtype).removeprefix('torch.')}, dropout {config.dropout:g}"
    # the softmax's output, and with dropout its mask and the dropped probabilities too
    kept = dtype.itemsize * (2.5 if config.dropout else 1.0)
    scores = config.n_layer * batch_size * config.n_head * config.block_size**2 * kept
    if scores > SCORES_BUDGET:
        return {
            "attention": "sdpa",
            "how": f"matmul not tried: its scores would keep {scores / 2**30:.1f} GiB",
        }
    key = f"{machine_key(device)} | attention {where}"
    entry = read_cache(cache_file, key)
    if entry is not None and set(entry.get("ms", {})) == set(KINDS):
        ms, how = entry["ms"], "cached"
    else:
        ms = {k: 1e3 * s for k, s in timer(shape, dtype, device, config.dropout).items()}
        write_cache(cache_file, key, {"ms": ms})
        how = "measured"
    ms = {k: round(v, 3) for k, v in ms.items()}
    return {"attention": min(ms, key=ms.get), "how": how, "ms": ms, "shape": where}


def log_line(choice: AttentionChoice) -> str:
    """e.g. `attention=auto: matmul (forward and backward 6.20 ms against sdpa 14.30, 8x6x256x64 bfloat16, measured)`."""
    picked, ms = choice["attention"], choice.get("ms")
    if not ms:
        return f"attention: {picked} ({choice['how']})"
    other = next(k for k in ms if k != picked)
    return (
        f"attention=auto: {picked} (forward and backward {ms[picked]:.2f} ms against {other} {ms[other]:.2f}, "
        f"{choice['shape']}, {choice['how']})"
    )
