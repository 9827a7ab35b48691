"""A sampling model's weights in memory the kernel may back with 2 MiB pages (Linux's transparent huge
pages, asked for per region with madvise). A batch-1 decode step reads every weight once from RAM; in
4 KiB pages that is a page-table walk every 4 KiB (85M fp32: ~85,000 a token). Each tensor of 2 MiB or
more gets a private region of its own, its start 2 MiB-aligned and its whole 2 MiB pages advised (in
"madvise" mode the tail past the last whole page stays in 4 KiB pages, so no huge page is half used);
values, shapes and dtypes are unchanged, so every result has the same bits. Where a region cannot be
made (mmap or madvise refused), the tensor stays where it is. A compiled step whose package freezes the
weights in (engine.ahead_of_time's autotuned or ATen GEMMs) reads its own copy of them: only an eager
step and a streamed package read the placed tensors.

Whether it pays is measured once per machine (CPU model, torch, threads, the kernel's THP settings),
layer shapes and dtypes and the operators' source, and kept in $MULTIAR_CACHE's decode_layout.json: a
one-row pass through the model's first layers (up to PASS_BYTES) as they are and through copies in huge
pages, in turns; huge pages where the rounds' median ratio is at most GAIN. MULTIAR_HUGE_PAGES=1 places
without measuring, =0 never places. Measured on a
2-vCPU Zen 3 EPYC (session 41, /tmp probes, one process each, the same model's copies in turns): the
85M compile=true step 1.12-1.16x the tokens/s in fp32 (three processes), 1.08x in bf16 (one); a copy into
fresh 4 KiB pages alone 1.06x / 0.99x, so the pages are the gain. Sessions 32 (Zen 5) and 38-39 (this
Zen 3) had seen the mat-vecs faster but whole jobs not, with one arena of huge pages for every weight
(cpu_matvec.py): `benchmarks/inference_speed.py` times the compiled rows with and without, side by side.

Off where the kernel has no transparent huge pages ("never") and off Linux. Only for sampling: a model
being trained keeps its tensors (an optimizer, DDP or FSDP hold on to them). No Lightning, Hydra or
domain code here."""

from __future__ import annotations

import copy
import logging
import mmap
import os
import statistics
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

from multiar.engine import cpu_matvec
from multiar.engine.choice_cache import CACHE_FILE, cache_key, cache_root, read_cache, write_cache
from multiar.engine.quantize import Int4Linear, Int8Linear
from multiar.engine.quantized_prefill import operator_of

log = logging.getLogger("multiar")

HUGE = 2 << 20  # bytes in a huge page on x86-64 and most arm64 kernels
MIN_BYTES = HUGE  # a smaller tensor gets no whole huge page (tests lower it: tiny models' tensors move)
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")

PASS_BYTES = 256 << 20  # the layers a pass times, in model order: a copy of these is held while it runs
ROUNDS = 11  # timed passes of each placement in turns, after one untimed; the median ratio counts
GAIN = 0.97  # huge pages where their pass takes at most this share of the 4 KiB pages' one, round by round

# data_ptr -> (bytes, the region's id) of each tensor placed here and still alive
_REGIONS: dict[int, tuple[int, int]] = {}
_DECIDED: dict[str, dict] = {}  # this process's decision per cache key
_REFUSED: list[OSError] = []  # the first region the kernel refused, if any (logged once)

# model -> {"4 KiB pages": s, "huge pages": s, "ratio": median of the rounds' ratios}; injected by tests
PassTimer = Callable[[nn.Module], dict[str, float]]


def available() -> bool:
    """Whether weights can be placed: MULTIAR_HUGE_PAGES is not 0, madvise can ask for huge pages, and
    the kernel's mode is "always" or "madvise"."""
    if os.environ.get("MULTIAR_HUGE_PAGES") == "0" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        return "[never]" not in THP_MODE.read_text()
    except OSError:
        return False


def _thp_settings() -> list[str]:
    """The kernel's THP mode and defrag setting (what a measurement here holds for)."""
    try:
        return [THP_MODE.read_text().strip(), (THP_MODE.parent / "defrag").read_text().strip()]
    except OSError:
        return []


def _big(t: Tensor) -> bool:
    """A tensor place() moves or moved."""
    return _plain_cpu(t) and (placed(t) or _movable(t))


def _plain_cpu(t: Tensor | None) -> bool:
    """A dense CPU tensor (not sparse, not oneDNN's opaque layout): one with a data pointer to read."""
    return t is not None and t.device.type == "cpu" and t.layout == torch.strided and not t.is_mkldnn


def _layers(model: nn.Module) -> list[nn.Module]:
    """model's layers that read a whole weight a token (nn.Linear, an int8 or int4 layer: an
    `in_features`) holding a tensor place() moves or moved (not an embedding: a token reads one row)."""
    return [
        m
        for m in model.modules()
        if hasattr(m, "in_features") and any(map(_big, [*m.parameters(False), *m.buffers(False)]))
    ]


def pass_seconds(model: nn.Module, rounds: int = ROUNDS) -> dict[str, float]:
    """A one-row pass through model's layers (_layers, in model order, each read as _reader reads it) as
    they are, in 4 KiB pages, and through copies of them in huge pages, the two in
    turns, either first in every other round: each one's median seconds and the median of the rounds'
    ratios (huge / 4 KiB). {} where model has no such layer. Holds a copy of those layers while it runs."""
    layers, held = [], 0
    for m in _layers(model):  # the first PASS_BYTES of them: each block reads its weights alike
        if held >= PASS_BYTES:
            break
        layers.append(m)
        held += sum(t.nbytes for t in [*m.parameters(False), *m.buffers(False)])
    if not layers:
        return {}
    huge = copy.deepcopy(layers)
    for m in huge:
        _place_tensors(m, recurse=False)
    xs = [torch.randn(1, m.in_features, dtype=_activations(m)) for m in layers]
    reads = {"4 KiB pages": list(map(_reader, layers)), "huge pages": list(map(_reader, huge))}
    times: dict[str, list[float]] = {"4 KiB pages": [], "huge pages": []}
    with torch.inference_mode():
        for r in range(rounds + 1):  # the first round warms up
            order = ["4 KiB pages", "huge pages"]
            for name in order if r % 2 else order[::-1]:
                start = time.perf_counter()
                for read, x in zip(reads[name], xs, strict=True):
                    read(x)
                if r:
                    times[name].append(time.perf_counter() - start)
    ratio = statistics.median(h / p for p, h in zip(times["4 KiB pages"], times["huge pages"], strict=True))
    return {name: statistics.median(t) for name, t in times.items()} | {"ratio": ratio}


def _activations(layer: nn.Module) -> torch.dtype:
    """The dtype a layer takes: a float weight's own; fp32 for a quantized layer."""
    weight = getattr(layer, "weight", None)
    return weight.dtype if isinstance(weight, Tensor) and weight.is_floating_point() else torch.float32


def _reader(layer: nn.Module) -> Callable[[Tensor], Tensor]:
    """What reads layer's weight at one row in a decode step here: engine.cpu_matvec's operator where
    the layer has one (a float nn.Linear's where the operators are vectorized, an int8 or int4 layer's),
    else its forward. The operator alone: the layers' Python around it would dilute the ratio."""
    if isinstance(layer, Int8Linear | Int4Linear):
        operator = operator_of(layer)
        if operator is not None:
            return lambda x: operator(x, *layer.operator_inputs())
    elif (
        type(layer) is nn.Linear
        and layer.weight.dtype in (torch.float32, torch.bfloat16)
        and cpu_matvec.vectorized()
        and cpu_matvec.library() is not None
    ):
        return lambda x: cpu_matvec.matvec(x, layer.weight)
    return layer


def decision(model: nn.Module, timer: PassTimer | None = None) -> dict:
    """Whether model's weights go into huge pages, and why: {"place": bool, "how": off | forced |
    measured | cached, "pass_ms": each placement's pass where measured, "ratio": the rounds' median
    ratio}. Measured once per machine, layer shapes and dtypes (pass_seconds; timer: tests inject one),
    kept in the choice cache and remembered in the process; where model has no layer to time, placed."""
    if not available():
        return {"place": False, "how": "off"}
    if os.environ.get("MULTIAR_HUGE_PAGES") == "1":
        return {"place": True, "how": "forced"}
    layers = _layers(model)
    kinds = sorted(
        {f"{type(m).__name__} {t.dtype}" for m in layers for t in [*m.parameters(False), *m.buffers(False)]}
    )
    if not kinds:
        return {"place": True, "how": "nothing to time"}
    thp = " ".join(_thp_settings())
    asked = f"huge pages {', '.join(kinds)} | THP {thp} | matvec {cpu_matvec.source_digest()}"
    key = cache_key(model, None, asked)
    if key in _DECIDED:
        return _DECIDED[key]
    cache_file = cache_root() / CACHE_FILE
    entry = read_cache(cache_file, key)
    if _valid(entry):  # else (none, edited, of another shape) measured anew
        made = {
            "place": entry["place"],
            "how": "cached",
            "pass_ms": entry["pass_ms"],
            "ratio": entry["ratio"],
        }
    else:
        seconds = (timer or pass_seconds)(model)
        ms = {name: 1e3 * seconds[name] for name in ("4 KiB pages", "huge pages")}
        made = {
            "place": seconds["ratio"] <= GAIN,
            "how": "measured",
            "pass_ms": ms,
            "ratio": seconds["ratio"],
        }
        write_cache(cache_file, key, {k: made[k] for k in ("place", "pass_ms", "ratio")})
    _DECIDED[key] = made
    return made


def _valid(entry: dict | None) -> bool:
    """Whether a cached decision has every field the log line and provenance read."""
    if (
        entry is None
        or not isinstance(entry.get("place"), bool)
        or not isinstance(entry.get("ratio"), int | float)
    ):
        return False
    ms = entry.get("pass_ms")
    return isinstance(ms, dict) and all(
        isinstance(ms.get(k), int | float) for k in ("4 KiB pages", "huge pages")
    )


def placed(t: Tensor) -> bool:
    """Whether t is a tensor this module placed (alive: its region is not freed)."""
    return _REGIONS.get(t.data_ptr(), (None, None))[0] == t.nbytes


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
    _REGIONS[ptr] = (n, id(region))
    weakref.finalize(region, _forget, ptr, id(region))
    return out


def _forget(ptr: int, region: int) -> None:
    """A freed region's entry gone, unless a new region at that address has replaced it (the old one is
    unmapped before its finalizer runs, and Python lets other threads run in between)."""
    if _REGIONS.get(ptr, (None, None))[1] == region:
        del _REGIONS[ptr]


def _movable(t: Tensor | None) -> bool:
    """A CPU tensor of at least MIN_BYTES that owns its storage (a view of a larger one would be cut
    off from it), not placed yet."""
    return (
        _plain_cpu(t)
        and t.is_contiguous()
        and t.nbytes >= max(MIN_BYTES, 1)
        and t.untyped_storage().nbytes() == t.nbytes
        and not placed(t)
    )


def place(model: nn.Module) -> int:
    """Move model's parameters and buffers of MIN_BYTES or more (not its KV caches, made anew per job) into
    huge-page regions, in place, where decision() says so: a tied weight stays one tensor. Returns the
    bytes of model's tensors now placed (moved now or before)."""
    if not decision(model)["place"]:
        return 0
    _place_tensors(model)
    return placed_bytes(model)


def _place_tensors(model: nn.Module, recurse: bool = True) -> None:
    """Move model's movable parameters and buffers (recurse=False: its own alone) into huge pages; one
    whose region cannot be made stays (logged once)."""
    moved: dict[tuple, Tensor] = {}  # a buffer registered under two names moves once
    with torch.no_grad():
        for p in model.parameters(recurse):  # each tied parameter once
            if _movable(p.data) and (copied := _copied(p.data)) is not None:
                p.data = copied
        for name, module in model.named_modules() if recurse else [("", model)]:
            if ".kv_cache" in f".{name}":
                continue
            for key, b in list(module._buffers.items()):
                if not _plain_cpu(b):
                    continue
                same = (b.data_ptr(), b.dtype, tuple(b.shape))  # not a smaller view at the same address
                if same not in moved and _movable(b) and (copied := _copied(b)) is not None:
                    moved[same] = copied
                if same in moved:
                    module._buffers[key] = moved[same]


def _copied(t: Tensor) -> Tensor | None:
    """copy_to_huge_pages(t), or None where the kernel refuses the region (logged once a process)."""
    try:
        return copy_to_huge_pages(t)
    except OSError as err:
        if not _REFUSED:
            _REFUSED.append(err)
            log.warning("huge pages: a region was refused (%s): those weights stay where they are", err)
        return None


def placed_bytes(model: nn.Module) -> int:
    """Bytes of model's parameters and buffers in regions placed here (each tensor once)."""
    unique = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.nbytes for t in unique.values() if placed(t))
