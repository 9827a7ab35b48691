"""Which attention the full-sequence pass (training, validation) runs: SDPA's flash kernels or batched
matmuls (engine.model.matmul_attention), picked by timing one layer's forward and backward of each at the
training shape and dtype, once per machine and shape (kept in `decode_layout.json` beside the decode
choices).

Why measure: on a 2-core Xeon with AMX, bf16, 8 x 6 heads x 256 tokens x 64, SDPA's forward and backward
took 14.3 ms and the matmuls 6.2 (its flash backward alone ~12 ms); at 1,024 tokens SDPA 49 ms against
93, and in fp32 they tie (16.2 against 16.7 ms). The bf16 training step went from 0.88-0.91x
nanoGPT's to 1.02x eager at 10.8M (0.95x -> 1.02x at 85M), and to 1.26x compiled (benchmarks/README.md,
training). The matmul path keeps
each layer's (T, T) probabilities for the backward: past SCORES_BUDGET bytes for the whole model it is
not tried. On a GPU SDPA's flash kernels are used unmeasured. No Lightning, Hydra or domain code here.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from multiar.engine.choice_cache import machine_key, read_cache, write_cache
from multiar.engine.compile_choice import synchronize
from multiar.engine.model import ModelConfig, causal_bias, matmul_attention

SETTINGS = ("auto", "sdpa", "matmul")
SCORES_BUDGET = 2**30  # bytes: every layer's saved (B, nh, T, T) probabilities together
ROUNDS = 5


def _seconds(
    kinds: dict[str, str], shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device
) -> dict[str, float]:
    """Each kind's median seconds over ROUNDS interleaved rounds, after one warm-up round."""
    q, k, v = (torch.randn(shape, dtype=dtype, device=device, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, dtype=dtype, device=device)
    bias = causal_bias(shape[2], dtype, device)
    times: dict[str, list[float]] = {name: [] for name in kinds}
    for r in range(ROUNDS + 1):
        for name, kind in kinds.items():
            synchronize(device)
            start = time.perf_counter()
            if kind == "sdpa":
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                y = matmul_attention(q, k, v, bias, 0.0)
            torch.autograd.grad(y, (q, k, v), grad)
            synchronize(device)
            if r:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def choose_attention(
    setting: str,
    config: ModelConfig,
    batch_size: int,
    dtype: torch.dtype,
    device: torch.device,
    cache_file=None,  # noqa: ANN001 (a Path or None)
    timer=_seconds,  # noqa: ANN001
) -> dict:
    """{"attention": "sdpa"|"matmul", "how": forced|measured|cached|..., "ms": {kind: ms}} for training
    config's model on (batch_size, block_size) blocks in dtype (the autocast dtype, else the weights')."""
    if setting not in SETTINGS:
        raise ValueError(f"attention must be one of {', '.join(SETTINGS)}, got {setting!r}")
    if setting != "auto":
        return {"attention": setting, "how": "forced"}
    if device.type != "cpu":
        return {"attention": "sdpa", "how": "flash kernels on a GPU, not measured"}
    shape = (batch_size, config.n_head, config.block_size, config.head_size)
    where = f"{'x'.join(map(str, shape))} {str(dtype).removeprefix('torch.')}"
    scores = config.n_layer * batch_size * config.n_head * config.block_size**2 * dtype.itemsize
    if scores > SCORES_BUDGET:
        return {
            "attention": "sdpa",
            "how": f"matmul not tried: its scores would keep {scores / 2**30:.1f} GiB",
        }
    key = f"{machine_key(device)} | attention {where}"
    entry = read_cache(cache_file, key)
    if entry is not None and set(entry.get("ms", {})) == {"sdpa", "matmul"}:
        ms, how = entry["ms"], "cached"
    else:
        ms = {
            k: 1e3 * s for k, s in timer({"sdpa": "sdpa", "matmul": "matmul"}, shape, dtype, device).items()
        }
        write_cache(cache_file, key, {"ms": ms})
        how = "measured"
    ms = {k: round(v, 3) for k, v in ms.items()}
    return {"attention": min(ms, key=ms.get), "how": how, "ms": ms, "shape": where}


def log_line(choice: dict) -> str:
    """e.g. `attention=auto: matmul (forward and backward 6.20 ms against sdpa 14.30, 8x6x256x64 bfloat16, measured)`."""
    picked, ms = choice["attention"], choice.get("ms")
    if not ms:
        return f"attention: {picked} ({choice['how']})"
    other = next(k for k in ms if k != picked)
    return (
        f"attention=auto: {picked} (forward and backward {ms[picked]:.2f} ms against {other} {ms[other]:.2f}, "
        f"{choice['shape']}, {choice['how']})"
    )
