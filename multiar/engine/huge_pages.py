"""A sampling model's weights in memory the kernel may back with 2 MiB pages (Linux's transparent huge
pages, asked for per region with madvise). A batch-1 decode step reads every weight once from RAM; in
4 KiB pages that is a page-table walk every 4 KiB (85M fp32: ~85,000 a token). Each tensor of 2 MiB or
more gets a private region of its own, its start 2 MiB-aligned and its whole 2 MiB pages advised (the
tail past the last whole page stays in 4 KiB pages, so no huge page is half used); values, shapes and
dtypes are unchanged, so every result has the same bits.

Whether it pays is measured once per machine (CPU model, torch, threads) and kept in the choice cache:
a one-row pass over a 64 MiB weight in each placement, in turns; huge pages when their median pass is
at least 3% shorter. MULTIAR_HUGE_PAGES=1 places without measuring, =0 never places. Measured on a
2-vCPU Zen 3 EPYC (session 41, /tmp probes, one process each, the same model's copies in turns): the
85M compile=true step 1.07-1.16x the tokens/s in fp32 (four processes), 1.08x in bf16; a copy into
fresh 4 KiB pages alone 1.06x / 0.99x, so the pages are the gain. Sessions 32 (Zen 5) and 38-39 (this
Zen 3) had seen the mat-vecs faster but whole jobs not, with one arena of huge pages for every weight
(cpu_matvec.py): `benchmarks/inference_speed.py` times the compiled rows with and without, side by side.

Off where the kernel has no transparent huge pages ("never") and off Linux. Only for sampling: a model
being trained keeps its tensors (an optimizer, DDP or FSDP hold on to them). No Lightning, Hydra or
domain code here."""

from __future__ import annotations

import mmap
import os
import statistics
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from multiar.engine.choice_cache import CACHE_FILE, cache_root, machine_key, read_cache, write_cache

HUGE = 2 << 20  # bytes in a huge page on x86-64 and most arm64 kernels
MIN_BYTES = HUGE  # a smaller tensor gets no whole huge page (tests lower it: tiny models' tensors move)
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")

PROBE = (8192, 2048)  # the weight a pass reads: 64 MiB of fp32, beyond every cache
GAIN = 0.97  # huge pages where their pass takes at most this share of the 4 KiB pages' one

_REGIONS: dict[int, int] = {}  # data_ptr -> bytes of each tensor placed here and still alive
_DECIDED: dict[str, dict] = {}  # this process's decision per cache key


def available() -> bool:
    """Whether weights can be placed: MULTIAR_HUGE_PAGES is not 0, madvise can ask for huge pages, and
    the kernel's mode is "always" or "madvise"."""
    if os.environ.get("MULTIAR_HUGE_PAGES") == "0" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        return "[never]" not in THP_MODE.read_text()
    except OSError:
        return False


def pass_seconds(rounds: int = 9) -> dict[str, float]:
    """Median seconds of a one-row pass (F.linear) over PROBE's weight in 4 KiB pages and in huge pages,
    the two in turns, either first in every other round."""
    plain = torch.randn(*PROBE)
    huge = copy_to_huge_pages(plain)
    x = torch.randn(1, PROBE[1])
    times: dict[str, list[float]] = {"4 KiB pages": [], "huge pages": []}
    with torch.inference_mode():
        for r in range(rounds + 1):  # the first round warms up
            order = [("4 KiB pages", plain), ("huge pages", huge)]
            for name, w in order if r % 2 else order[::-1]:
                start = time.perf_counter()
                F.linear(x, w)
                if r:
                    times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def decision(timer: Callable[[], dict[str, float]] | None = None) -> dict:
    """Whether a sampling model's weights go into huge pages on this machine, and why: {"place": bool,
    "how": off | forced | measured | cached, "pass_ms": each placement's pass where measured}. Measured
    once per machine and kept in the choice cache (timer: pass_seconds; tests inject one)."""
    asked = os.environ.get("MULTIAR_HUGE_PAGES", "auto")
    if not available():
        return {"place": False, "how": "off"}
    if asked == "1":
        return {"place": True, "how": "forced"}
    key = f"{machine_key(torch.device('cpu'))} | huge pages"
    if key in _DECIDED:
        return _DECIDED[key]
    cache_file = cache_root() / CACHE_FILE
    entry = read_cache(cache_file, key)
    if entry is not None and isinstance(entry.get("place"), bool) and isinstance(entry.get("pass_ms"), dict):
        made = {"place": entry["place"], "how": "cached", "pass_ms": entry["pass_ms"]}
    else:
        ms = {name: 1e3 * s for name, s in (timer or pass_seconds)().items()}
        made = {"place": ms["huge pages"] <= GAIN * ms["4 KiB pages"], "how": "measured", "pass_ms": ms}
        write_cache(cache_file, key, {"place": made["place"], "pass_ms": ms})
    _DECIDED[key] = made
    return made


def placed(t: Tensor) -> bool:
    """Whether t is a tensor this module placed (alive: its region is not freed)."""
    return _REGIONS.get(t.data_ptr()) == t.nbytes


def copy_to_huge_pages(t: Tensor) -> Tensor:
    """A contiguous copy of t (CPU) in a region of its own: the first byte 2 MiB-aligned, its whole 2 MiB
    pages advised huge. The region is unmapped when the copy is freed."""
    n = t.numel() * t.element_size()
    region = mmap.mmap(-1, n + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with memoryview(region) as whole:
        start = -torch.frombuffer(whole, dtype=torch.uint8, count=1).data_ptr() % HUGE
    if n >= HUGE:
        region.madvise(mmap.MADV_HUGEPAGE, start, n // HUGE * HUGE)
    window = memoryview(region)[start : start + n]
    out = torch.frombuffer(window, dtype=torch.uint8).view(t.dtype).view(t.shape)  # holds the region
    del window
    out.copy_(t)
    ptr = out.data_ptr()
    _REGIONS[ptr] = n
    weakref.finalize(region, _REGIONS.pop, ptr, None)
    return out


def _movable(t: Tensor | None) -> bool:
    """A CPU tensor of at least MIN_BYTES that owns its storage (a view of a larger one would be cut
    off from it), not placed yet."""
    return (
        t is not None
        and t.device.type == "cpu"
        and t.layout == torch.strided
        and not t.is_mkldnn
        and t.is_contiguous()
        and t.nbytes >= max(MIN_BYTES, 1)
        and t.untyped_storage().nbytes() == t.nbytes
        and not placed(t)
    )


def place(model: nn.Module) -> int:
    """Move model's parameters and buffers of MIN_BYTES or more (not its KV caches, made anew per job) into
    huge-page regions, in place: a tied weight stays one tensor. Returns the bytes of model's tensors now
    placed (moved now or before); 0 where they do not go there (decision())."""
    if not decision()["place"]:
        return 0
    moved: dict[int, Tensor] = {}  # a buffer registered under two names moves once
    with torch.no_grad():
        for p in model.parameters():  # each tied parameter once
            if _movable(p.data):
                p.data = copy_to_huge_pages(p.data)
        for name, module in model.named_modules():
            if ".kv_cache" in f".{name}":
                continue
            for key, b in list(module._buffers.items()):
                if b is not None and b.data_ptr() not in moved and _movable(b):
                    moved[b.data_ptr()] = copy_to_huge_pages(b)
                if b is not None and b.data_ptr() in moved:
                    module._buffers[key] = moved[b.data_ptr()]
    return placed_bytes(model)


def placed_bytes(model: nn.Module) -> int:
    """Bytes of model's parameters and buffers in regions placed here (each tensor once)."""
    unique = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.nbytes for t in unique.values() if placed(t))
