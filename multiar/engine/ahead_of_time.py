"""The compiled one-token decode step on a CPU, built ahead of time: `torch.export` traces
engine.captured_step's `decode_rows` once, AOTInductor compiles it (the same inductor switches as
torch.compile's graph: frozen weights but in a streamed package, C++ code; its GEMMs measured, below) into a package kept on disk, and every
later job with the same model loads that package in milliseconds instead of compiling again. A call
runs the package's C++ entry point directly: no dynamo guards, no Python wrapper around the kernels.

Measured on the 2-vCPU AMX Xeon (benchmarks/README.md, session 28), 10.8M batch 1 in bf16: a step
0.88-0.94 ms against torch.compile's 1.09-1.14 ms and eager's 2.4-2.7 ms; a later job's load costs
0.04 s over its steady steps where building took ~20 s and torch.compile's compile ~16 s.

A package of frozen weights is this model's alone: its key hashes the weights (a package holds them
frozen, packed for oneDNN), the model's shapes and settings, the KV caches' shape and dtype, the engine's source, torch's
version and the machine (CPU model, threads). The KV caches it runs on are the model's own tensors,
handed to the package (user-managed constants), so prefill's eager passes and the package's steps
write the same memory (the package stores zeroed caches of their shape, traced over and unused). A
streamed package (below) holds no weights either: it is handed the model's, and serves every model of
the same kind. Packages live under `$MULTIAR_CACHE/decode_steps` (else
~/.cache/multiar/decode_steps); the KEEP most recently used are kept. `MULTIAR_AHEAD_OF_TIME=0` turns this off
(decode then compiles with torch.compile, as before). No Lightning, Hydra or domain code here.

Which GEMMs the package calls is measured too, once per machine, layer shapes, dtypes and row count
(decode_layout.json): inductor's autotuned choice (it times its C++ template against oneDNN / MKL at
compile time, over weights hot in cache), ATen's oneDNN / MKL calls alone, or (up to streamed_rows()
rows) no GEMM at all: each Linear streamed, its weight read once per step (through engine.cpu_matvec's
operators where they build, else as a multiply-and-sum that inductor fuses into one loop). Each
candidate's package is built and their steps timed in turns on the job's first step; the fastest is kept
(streamed where within 3% of it: pick_gemms), the others' packages deleted. On the AMX Xeon the autotuned
GEMMs were the fast ones before the operators; since them, streamed and autotuned run close at batch 1
(session 44, the 85M bf16 step: 4.73 ms streamed against 5.18 autotuned in one run, 5.08 against 5.02 in
another), and autotuned wins at batch 8 (6.87 against 9.81 on ATen, 12.58 streamed). On a Zen 5 EPYC
without AMX (benchmarks/README.md, session 29) the 85M bf16 step ran 8.07 ms autotuned against 6.08 on
ATen (a job: 123 against 174 tokens/s), while fp32 there ran faster autotuned in a probe (146 against
108), and 10.8M bf16 went either way between processes; streamed, the 85M bf16 step ran 3.9 ms against
ATen's 4.0-4.5 (session 30), and the 85M int8 step through the operator 2.4 ms against the int8 kernel's
2.6-3.3 (session 31). `MULTIAR_COMPILE_GEMMS=autotuned|aten|streamed` pins one (tests pin autotuned).

Whatever its GEMMs, a package's attention runs through engine.cpu_matvec's attention operator where it
builds (each head's keys read once, then its values): 0.79 us a cached position a step at 85M bf16
against 1.26 through inductor's fused ops (session 33), else through those ops.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

from multiar.engine import cpu_matvec
from multiar.engine.captured_step import decode_rows
from multiar.engine.choice_cache import (
    CACHE_FILE,
    cache_key,
    cache_root,
    machine_key,
    read_cache,
    write_cache,
)
from multiar.engine.compile_choice import ANY_WEIGHTS
from multiar.engine.inductor_options import inductor_options
from multiar.engine.quantize import Int4Linear, Int8Linear
from multiar.engine.quantized_prefill import has_operator, operator_matvec
from multiar.engine.rows_attention import attend_for

log = logging.getLogger("multiar")

FORMAT = 2  # bump when what a package holds changes
# the weights as one file beside the code, read into memory at load, not inside the .so's data section:
# the int8 85M step read them from there at 132 tok/s, from the blob at 178-192 (torch.compile's 181-187)
PACKAGE_SWITCHES = {
    "aot_inductor.package_constants_in_so": False,
    "aot_inductor.package_constants_on_disk_format": "binary_blob",
}
WEIGHTLESS = {"aot_inductor.package_constants_in_so": False}  # and none beside it: handed at load
# packages kept on disk, the most recently used: each holds zeroed KV caches of the block size and (but a
# streamed one) its model's weights (10.8M bf16 batch 1: ~31 MB; 85M bf16 batch 8: ~0.5 GB)
KEEP = 8
ENGINE = Path(__file__).parent  # its sources are in every key: a changed engine builds anew


# the package's GEMMs, each candidate's switches: inductor's `autotune` (engine.inductor_options), and
# `streamed`: every float nn.Linear and int8 or int4 layer traced as a mat-vec that streams the weight once
# (no GEMM kernel): engine.cpu_matvec's operators (where they build; else a multiply-and-sum that inductor
# fuses into one loop per output row; in the 85M fp32 package that loop took 1.25-1.29x the operator's step,
# session 34). At one row that loop read 85M's bf16 weights at 48 GB/s where oneDNN's mat-vec read them at
# 27 (a /tmp probe, Zen 5, session 30), the operator at ~50; at 4 rows and up the fused loop reads them
# again per row, slower than a GEMM, so without the operators streamed is a candidate up to STREAMED_ROWS
# rows only. The operators read each weight once for all rows: where they build with vector loops, up to
# OPERATOR_ROWS (streamed_rows()). A float model then builds and times a streamed package at batch 3-8 as
# well, where it may lose (85M bf16 and fp32 at batch 8 on a Zen 3 EPYC, below): one more build on the
# first job; the pick is recorded
# A streamed package is also built unfrozen and holds no weights: the model's own tensors are handed to it
# at load, as its KV caches are, so its key has their shapes and dtypes, not their contents. Any model of
# the same kind loads it (no build for a newly trained model), in milliseconds: no weights digest, no
# weights read (the 85M bf16 package held 170 MB and took 0.25 s to key and load).
GEMMS = {
    "autotuned": {"autotune": True},
    "aten": {"autotune": False},
    "streamed": {"autotune": False, "streamed": True, "freeze": False},
}
STREAMED_ROWS = 2
# an 85M int8 package at batch 8 on a Zen 3 EPYC (no bf16: torch's int8 kernel takes fp32 activations)
# stepped in 327 ms autotuned, 337 on ATen, 10.8 ms streamed; bf16 and fp32 there 23.7 and 22.6 ms
# autotuned, 31.2 and 31.0 streamed; int4 20.1 autotuned, 17.9 streamed (session 39). With the float
# operator's rows in fours (session 40): bf16 15.8 streamed against 24.4 autotuned, fp32 22.1 against 25.1
OPERATOR_ROWS = 8
TIMED_ROUNDS, WARM, BLOCK = 3, 3, 6  # rounds of each candidate in turn: untimed steps, then timed
# A streamed pick within this of the fastest step is kept over it: its package loads without the
# weights' digest. On the AMX Xeon (session 44) the 85M bf16 step measured 5.02 ms autotuned against
# 5.08 streamed; a later 256-step job then counted the autotuned package's load at 1.00 s against the
# streamed one's 0.04, so compile=auto left it eager (88 tok/s against 167). 3% of a 5 ms step repays
# that second only after ~6,700 steps.
WEIGHTLESS_EDGE = 1.03


def gemms_asked() -> str:
    """`MULTIAR_COMPILE_GEMMS`: auto (measured, the default), or a candidate of GEMMS pinned."""
    asked = os.environ.get("MULTIAR_COMPILE_GEMMS", "auto")
    if asked != "auto" and asked not in GEMMS:
        raise ValueError(f"MULTIAR_COMPILE_GEMMS={asked!r}: expected auto, {' or '.join(GEMMS)}")
    return asked


def streamed_rows() -> int:
    """The most rows a streamed package is a candidate for: OPERATOR_ROWS where engine.cpu_matvec's
    operators build with vector loops (they stream its layers), else STREAMED_ROWS (inductor's loop)."""
    return OPERATOR_ROWS if cpu_matvec.library() is not None and cpu_matvec.vectorized() else STREAMED_ROWS


def candidates(model: nn.Module, rows: int) -> list[str]:
    """The GEMMs worth timing for `rows` rows of this model: streamed only at a few rows (streamed_rows),
    and where the model has a float nn.Linear or a quantized layer to stream."""
    streams = rows <= streamed_rows() and any(_streams(m) for m in model.modules())
    return [name for name in GEMMS if streams or not GEMMS[name].get("streamed")]


def _streams(module: nn.Module) -> bool:
    """Whether the streamed candidate changes this layer: a float nn.Linear, or an int8 or int4 layer on
    the CPU where engine.cpu_matvec's operators are built (without them it keeps its kernel)."""
    if type(module) is nn.Linear:
        return True
    return _on_operator(module) and cpu_matvec.library() is not None


def _on_operator(module: nn.Module) -> bool:
    """Whether streamed runs this layer through engine.cpu_matvec's operators where they are built: an
    int8 or int4 layer (quantized_prefill.has_operator), or an fp32 or bf16 nn.Linear where the
    operator's float loops are vectors (AVX-512's or AVX2's: cpu_matvec.vectorized), on the CPU."""
    floats = type(module) is nn.Linear and module.weight.dtype in (torch.float32, torch.bfloat16)
    floats = floats and cpu_matvec.vectorized()
    quantized = isinstance(module, Int8Linear | Int4Linear) and has_operator(module)
    return (floats or quantized) and module.weight.device.type == "cpu"


def _streamed(linear: nn.Linear, x: Tensor) -> Tensor:
    """linear(x) without a GEMM call: fp32 and bf16 weights through engine.cpu_matvec's operator where it
    is built (faster than inductor's loop: the figures are in that module), else a multiply-and-sum,
    (..., i) * (o, i) summed over i in fp32 -> (..., o), which inductor fuses into one loop per output
    row."""
    w = linear.weight
    if _on_operator(linear) and cpu_matvec.library() is not None:
        rows = x.reshape(-1, linear.in_features).to(w.dtype)  # (N, in)
        y = cpu_matvec.matvec(rows, w).to(x.dtype).reshape(*x.shape[:-1], linear.out_features)
    else:
        y = (x.unsqueeze(-2) * w).sum(-1, dtype=torch.float32).to(x.dtype)
    return y if linear.bias is None else y + linear.bias


def _streamed_quantized(layer: Int8Linear | Int4Linear, x: Tensor) -> Tensor:
    """An int8 or int4 layer through its engine.cpu_matvec operator: the codes read once for all rows
    (inductor's own multiply-and-sum of int8 codes ran slower than the int8 kernel: there)."""
    y = operator_matvec(layer, x.reshape(-1, layer.in_features))  # (N, out) fp32
    return y.to(x.dtype).reshape(*x.shape[:-1], layer.out_features)


@contextlib.contextmanager
def _streamed_linears(model: nn.Module) -> Iterator[None]:
    """Every plain nn.Linear and quantized layer of model computed by _streamed / _streamed_quantized
    while traced (an instance attribute over the class's forward; the one before it, an eager rule of
    engine.float_rows, put back after)."""
    linears = [m for m in model.modules() if _streams(m)]
    before = [linear.__dict__.get("forward") for linear in linears]
    try:
        for linear in linears:
            stream = _streamed if type(linear) is nn.Linear else _streamed_quantized
            linear.forward = functools.partial(stream, linear)
        yield
    finally:
        for linear, forward in zip(linears, before, strict=True):
            linear.__dict__.pop("forward", None)
            if forward is not None:
                linear.forward = forward


def enabled() -> bool:
    """`MULTIAR_AHEAD_OF_TIME=0` compiles with torch.compile instead (read at each compile)."""
    return os.environ.get("MULTIAR_AHEAD_OF_TIME", "1") != "0"


def package_dir() -> Path:
    return cache_root() / "decode_steps"


class _Step(nn.Module):
    """decode_rows as a module: export traces a module, and its fqns name the caches ("model.blocks...")."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: Tensor, positions: Tensor, slots: Tensor) -> Tensor:
        return decode_rows(self.model, ids, positions, slots.size(0), _attention)


def _attention(q: Tensor, keys: Tensor, values: Tensor, positions: Tensor) -> Tensor:
    """A package's attention, whatever its GEMMs (engine.rows_attention.attend_for)."""
    return attend_for(keys)(q, keys, values, positions)


def _tensors(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter and buffer by its fqn in the package, tied ones under each name: what a package
    that holds no weights is handed."""
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return {f"model.{name}": t.detach() for name, t in named}


def _caches(model: nn.Module) -> dict[str, Tensor]:
    """The KV cache tensors by their fqn in the package ("model.blocks.0.attn.kv_cache.k", ...)."""
    return {name: t for name, t in _tensors(model).items() if ".kv_cache." in name}


def kind_digest(model: nn.Module) -> str:
    """What a measured choice of GEMMs depends on beside the layer shapes: each module's class and plain
    settings (an int8 layer's bf16_activations), the tensors' dtypes, the KV caches' included."""
    h = hashlib.sha256()
    for line in sorted({line.split(" ", 1)[1] for line in _settings(model)}):  # module names left out
        h.update(line.encode())
    tensors = [*model.state_dict().values(), *_caches(model).values()]
    h.update(" ".join(sorted({str(t.dtype) for t in tensors})).encode())
    return h.hexdigest()[:16]


def _settings(model: nn.Module) -> Iterator[str]:
    """Each module's class and plain attributes (an int8 layer's bf16_activations, a norm's eps, ...):
    what changes the traced graph beside the tensors."""
    for name, module in model.named_modules():
        plain = {
            k: v for k, v in vars(module).items() if isinstance(v, bool | int | float | str | type(None))
        }
        plain.pop("training", None)
        yield f"{name} {type(module).__qualname__} {sorted(plain.items())!r}"


@functools.cache
def code_digest() -> str:
    """What every package of this process's code shares: FORMAT, torch's version and the engine's
    sources. It starts each package's file name, so a name recorded before a code change reads as gone."""
    h = hashlib.sha256(f"{FORMAT} {torch.__version__}".encode())
    for path in sorted([*ENGINE.glob("*.py"), *ENGINE.glob("*.c"), *ENGINE.glob("*.cpp")]):
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def _config(model: nn.Module) -> object:
    return model.config.to_dict() if hasattr(model.config, "to_dict") else repr(model.config)


def any_weights_key(model: nn.Module) -> str:
    """compile=auto's key for a package that serves any weights of model's config (a streamed one):
    compile_choice.ANY_WEIGHTS and a digest of the config, which a clock's key (machine, batch size,
    layer shapes, dtype) does not tell apart (block_size, heads, rope base, ...)."""
    digest = hashlib.sha256(json.dumps(_config(model), sort_keys=True, default=str).encode()).hexdigest()
    return f"{ANY_WEIGHTS}{digest[:16]}"


def package_key(model: nn.Module, rows: int, options: dict, weights: str | None = None) -> str:
    """The digest naming model's package for `rows` rows: everything the compiled code depends on."""
    h = hashlib.sha256()
    config = _config(model)
    device = model.wte.weight.device
    head = [FORMAT, torch.__version__, machine_key(device), rows, config, sorted(options.items(), key=str)]
    h.update(json.dumps(head, default=str).encode())
    h.update(code_digest().encode())
    for line in _settings(model):
        h.update(line.encode())
    if options.get("streamed"):  # it holds no weights: theirs are handed to it at load
        weights = (f"{n} {t.dtype} {tuple(t.shape)} {t.stride()}" for n, t in _tensors(model).items())
        h.update(" ".join(w for w in weights if ".kv_cache." not in w).encode())  # caches: below
    else:
        h.update((weights or weights_digest(model)).encode())  # weights: its digest, taken before
    # whether it calls the operators (its attention on a CPU; a streamed one's float, int8 and int4 layers
    # too; built, and loaded before the package is: it names them)
    if device.type == "cpu":
        h.update(f"operators {cpu_matvec.library() is not None}".encode())
    for name, t in _caches(model).items():  # a cache's contents change every step: its shape only
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
    return f"{code_digest()}-{h.hexdigest()[:32]}"


def weights_digest(model: nn.Module) -> str:
    """A digest of model's tensors, names, dtypes and shapes, the KV caches left out (0.04 s for the
    10.8M model in fp32, 0.3 s for 85M)."""
    h = hashlib.sha256()
    for name, t in model.state_dict(keep_vars=True).items():
        if ".kv_cache." in name:
            continue
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        h.update(memoryview(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()[:32]


def on_disk(name: str) -> bool:
    """Whether the package of that file name is in the package folder, built by this code."""
    return name.startswith(f"{code_digest()}-") and (package_dir() / name).is_file()


def _build(model: nn.Module, rows: int, path: Path, streamed: bool = False) -> None:
    """Export decode_rows for `rows` rows (the filled slots' count dynamic, 2 .. cache length - 1; its
    Linears as mat-vecs where streamed) and compile it into the package at path, written to a
    temporary file first (inductor's switches entered around this by the caller)."""
    length = model.blocks[0].attn.kv_cache.k.size(2)
    device = model.wte.weight.device
    ids = torch.zeros(rows, dtype=torch.long, device=device)
    slots = torch.empty(max(2, min(17, length - 1)), device=device)  # not 1: a size of 1 specializes
    dims = ({}, {}, {0: torch.export.Dim("filled_slots", min=2, max=length - 1)})
    # traced over empty caches of the same shape: the package is given the model's own at load, and
    # must not keep a copy of what this job's prompts wrote into them
    caches = [block.attn.kv_cache for block in model.blocks]
    live = [(cache.k, cache.v) for cache in caches]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".pt2")
    os.close(fd)
    try:
        for cache, (k, v) in zip(caches, live, strict=True):
            cache.k, cache.v = torch.zeros_like(k), torch.zeros_like(v)
        with torch.no_grad(), _streamed_linears(model) if streamed else contextlib.nullcontext():
            program = torch.export.export(
                _Step(model), (ids, ids.clone(), slots), dynamic_shapes=dims, strict=False
            )
        switches = WEIGHTLESS if streamed else PACKAGE_SWITCHES
        torch._inductor.aoti_compile_and_package(program, package_path=tmp, inductor_configs=switches)
        os.replace(tmp, path)
    finally:
        for cache, (k, v) in zip(caches, live, strict=True):
            cache.k, cache.v = k, v
        Path(tmp).unlink(missing_ok=True)


def _time_in_turns(
    runners: dict[str, _Package], ids: Tensor, positions: Tensor, slots: Tensor
) -> dict[str, float]:
    """Median ms of each runner's step at these inputs: TIMED_ROUNDS rounds, each runner in turn (the
    order flipped each round) running WARM steps untimed and then BLOCK timed in a row. A job runs one
    package step after step, so a runner is timed as it will run: after its own steps, not right after
    the other's. Strict alternation timed each step after the other package's weights had evicted its
    own, and at 10.8M (weights near the L3's size) it picked the package that ran slower over the job
    (0.64 against 0.96 ms, then 1,478 against 1,999 tokens/s; session 29)."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    for r in range(TIMED_ROUNDS):
        for name in list(runners)[:: 1 if r % 2 else -1]:
            for i in range(WARM + BLOCK):
                start = time.perf_counter()
                runners[name](ids, positions, slots)
                if i >= WARM:
                    times[name].append(1e3 * (time.perf_counter() - start))
    return {name: statistics.median(t) for name, t in times.items()}


def pick_gemms(step_ms: dict[str, float]) -> str:
    """The candidate whose step ran fastest (step_ms: ms by GEMMs' name), but streamed where its step is
    within WEIGHTLESS_EDGE of that: a package without weights loads in milliseconds for every later job."""
    fastest = min(step_ms, key=step_ms.get)
    edge = WEIGHTLESS_EDGE * step_ms[fastest]
    near = [name for name, ms in step_ms.items() if GEMMS[name].get("streamed") and ms <= edge]
    return near[0] if near else fastest


def _prune(folder: Path, keep: int) -> None:
    """Delete all but the `keep` most recently used packages (a load touches its file); other processes'
    builds in progress (dot-files) are left alone, and a file gone meanwhile is skipped."""
    used = {}
    for path in folder.glob("*.pt2"):
        if not path.name.startswith("."):
            with contextlib.suppress(OSError):
                used[path] = path.stat().st_mtime
    for old in sorted(used, key=used.get, reverse=True)[keep:]:
        with contextlib.suppress(OSError):
            old.unlink()
            log.info("ahead-of-time decode steps: removed %s, the least recently used", old.name)


class _Package:
    """A loaded package: called through torch's C++ loader directly where this torch has it (no
    torch._inductor import, no metadata check at load, no pytree per call), else through
    `torch._inductor.aoti_load_package`."""

    def __init__(self, path: Path, weightless: bool = False) -> None:
        self.weightless = weightless  # it holds no weights: the model's are handed to it with its caches
        # AMX's tile registers are granted per process on request: inductor asks when it picks an ISA, which a
        # direct load skips (a kernel using them would die of SIGILL); False and harmless without AMX
        init_amx = getattr(torch.cpu, "_init_amx", None)
        if init_amx is not None:
            init_amx()
        loader = getattr(getattr(torch._C, "_aoti", None), "AOTIModelPackageLoader", None)
        self.direct = loader is not None
        if self.direct:
            self.loader = loader(str(path), "model", False, 1, -1)  # one runner, the CPU
        else:
            self.package = torch._inductor.aoti_load_package(str(path))

    def bind(self, model: nn.Module) -> None:
        """Hand the package model's cache tensors, and a weightless one every tensor of model it names
        (user-managed: it reads and writes them where they are). A cache name it lacks would be skipped
        silently (its own zeroed caches read instead), a constant it names that model lacks would be
        left empty: errors here."""
        fqns = set(self.loader.get_constant_fqns() if self.direct else self.package.get_constant_fqns())
        caches = _caches(model)
        missing = set(caches) - fqns
        if missing:
            raise RuntimeError(f"the package has no constant {sorted(missing)[0]}")
        tensors = caches
        if self.weightless:
            tensors = {name: t for name, t in _tensors(model).items() if name in fqns}
            if fqns - set(tensors):
                raise RuntimeError(f"the model has no tensor {sorted(fqns - set(tensors))[0]}")
        if self.direct:
            self.loader.load_constants(tensors, False, False, True)  # active buffer, partial, user-managed
        else:
            self.package.load_constants(tensors, check_full_update=False, user_managed=True)

    def __call__(self, ids: Tensor, positions: Tensor, slots: Tensor) -> Tensor:
        if self.direct:
            return self.loader.boxed_run([ids, positions, slots])[0]
        return self.package(ids, positions, slots)


class AheadOfTimeStep:
    """decode_filled's signature (model, ids (B,), positions (B,), slots (n,)) -> logits (B, V), run by
    a package per row count and cache shape: loaded from disk, else built and saved. `built` / `loaded`
    count what the calls did (tests read them); `last` is the last package made ready (of candidates
    timed, the pick), ("built" | "loaded", its file name), which the clock notes for compile=auto;
    `gemms` the GEMMs it runs ({"gemms": name}, with "step_ms" where they were measured)."""

    def __init__(
        self, options: dict, fallback: Callable[[], Callable[..., Tensor]], gemms: str | None = None
    ) -> None:
        self.options = options  # inductor's switches (engine.inductor_options), entered around a build
        self.make_fallback = fallback  # torch.compile's step, for a model export or AOTInductor cannot build
        self.fallback: Callable[..., Tensor] | None = None
        self.runners: dict[tuple, tuple[_Package, list[Tensor]]] = {}  # the caches each was handed
        self.built = self.loaded = 0
        # the package made ready last (of candidates timed, the pick): ("built" | "loaded", its file
        # name, a load's seconds: after a build, its key's digest and the load that follows, what the
        # next job of this model will pay)
        self.last: tuple[str, str, float] | None = None
        # seconds the last first call spent on candidates not picked and on timing them: not what the
        # next model's build costs (compile=auto's clock leaves them out)
        self.spare_s = 0.0
        if gemms is not None and gemms not in GEMMS:
            raise ValueError(f"gemms={gemms!r}: expected {' or '.join(GEMMS)}")
        # gemms: a resumed run's, pinned; a wrong value fails here, not as a fallback's warning
        self.asked = gemms or gemms_asked()
        self.gemms: dict[str, object] | None = None  # the last pick: {"gemms", "step_ms" where measured}
        self.any_weights = False  # the package made ready last holds no weights: it serves any of the kind
        self._hot: tuple | None = None  # (rows, first cache's k, last cache's v, runner) of the last call

    def __call__(self, model: nn.Module, ids: Tensor, positions: Tensor, slots: Tensor) -> Tensor:
        if self.fallback is not None:
            return self.fallback(model, ids, positions, slots)
        # the runner of the last call while the caches are the same tensors (a reallocation replaces them
        # all): every step but the first skips listing them (38 us a step under cProfile at 10.8M bf16)
        first, last = model.blocks[0].attn.kv_cache, model.blocks[-1].attn.kv_cache
        hot = self._hot
        if hot is not None and hot[0] == ids.size(0) and hot[1] is first.k and hot[2] is last.v:
            return hot[3](ids, positions, slots)
        tensors = [t for block in model.blocks for t in (block.attn.kv_cache.k, block.attn.kv_cache.v)]
        shape = (ids.size(0), tuple(tensors[0].shape), tensors[0].dtype)
        runner, bound = self.runners.get(shape, (None, []))
        if len(bound) != len(tensors) or any(a is not b for a, b in zip(bound, tensors, strict=False)):
            try:  # a first call, or new cache tensors (a reallocation): the package reads these from now on
                runner = runner or self._chosen(model, ids, positions, slots)
                runner.bind(model)
            except Exception as err:  # noqa: BLE001 (export and AOTInductor fail many ways)
                self.gemms = None  # none of its GEMMs run: torch.compile's do
                log.warning(
                    "ahead-of-time decode step: not used (%s): compiling with torch.compile instead",
                    str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__,
                )
                self.fallback = self.make_fallback()
                return self.fallback(model, ids, positions, slots)
            self.runners[shape] = (runner, tensors)
        self._hot = (ids.size(0), tensors[0], tensors[-1], runner)
        return runner(ids, positions, slots)

    def _chosen(self, model: nn.Module, ids: Tensor, positions: Tensor, slots: Tensor) -> _Package:
        """The package of the GEMMs pinned (where a candidate here), recorded for this machine, model kind
        and candidates, or picked by this step before (another row count), else of each candidate: their
        steps timed in turns at this call's inputs, the fastest recorded and the others' packages deleted.
        A step run twice writes the same keys and values at the same slots, and the caller runs the pick
        last. A candidate that fails to build or run is left out (with one left, nothing is recorded);
        where every one fails the first error is raised."""
        rows, self.spare_s = ids.size(0), 0.0
        if model.wte.weight.device.type == "cpu":  # its attention, and maybe layers, call the operators:
            cpu_matvec.library()  # built (~6 s the first time) and loaded here, not in a package's key's time
        names = candidates(model, rows)
        # the candidates and the engine's code in the key: a pick recorded before streamed was one, or
        # before a candidate's code changed (the mat-vec operators), is measured again
        kind = f"{kind_digest(model)} {code_digest()} {' '.join(names)}"
        key = cache_key(model, rows, f"ahead-of-time gemms {kind}")
        recorded = (read_cache(cache_root() / CACHE_FILE, key) or {}).get("gemms")
        earlier = (self.gemms or {}).get("gemms")  # this job's pick at another row count, if one here
        # streamed pinned: a candidate at up to streamed_rows() rows only
        asked = self.asked if self.asked in names else "auto"
        if asked != self.asked:
            log.info(
                "ahead-of-time decode step: %s GEMMs pinned, not one at %d rows of this model",
                self.asked,
                rows,
            )
        picked = asked if asked != "auto" else recorded or (earlier if earlier in names else None)
        if picked in GEMMS:
            runner = self._runner(model, rows, picked)
            self.any_weights = runner.weightless
            self.gemms = self.gemms if (self.gemms or {}).get("gemms") == picked else {"gemms": picked}
            return runner
        runners, lasts, errors, took = {}, {}, [], {}
        start = time.perf_counter()
        weights = weights_digest(model)  # once for the frozen candidates' keys (0.3 s at 85M fp32)
        digest_s = time.perf_counter() - start  # a next job's load takes it: in each `last`'s seconds
        for name in names:
            try:
                start = time.perf_counter()
                runners[name] = self._runner(model, rows, name, weights)
                runners[name].bind(model)
                # a streamed package's key takes no weights' digest
                lasts[name] = (
                    *self.last[:2],
                    self.last[2] + (0 if GEMMS[name].get("streamed") else digest_s),
                )
                took[name] = time.perf_counter() - start
            except Exception as err:  # noqa: BLE001 (one candidate's kernels may fail where another's build)
                runners.pop(name, None)
                errors.append(err)
                log.warning("ahead-of-time decode step: the %s GEMMs' package failed (%s)", name, err)
        if not runners:
            raise errors[0]
        start = time.perf_counter()
        step_ms = _time_in_turns(runners, ids, positions, slots)
        picked = pick_gemms(step_ms)
        self.spare_s = time.perf_counter() - start + sum(s for name, s in took.items() if name != picked)
        if GEMMS[picked].get("streamed"):  # the digest taken for the others: no load of the pick takes it
            self.spare_s += digest_s
        self.last = lasts[picked]  # the pick's own build or load: the clock leaves spare_s out
        self.any_weights = runners[picked].weightless
        self.gemms = {"gemms": picked, "step_ms": step_ms}
        if len(runners) < 2:
            return runners[picked]  # one candidate measured: nothing to record
        write_cache(cache_root() / CACHE_FILE, key, self.gemms)
        for name, (_, file, _) in lasts.items():
            if name != picked:
                with contextlib.suppress(OSError):  # a slot of KEEP for a package no job will load
                    (package_dir() / file).unlink()
        timings = ", ".join(f"{name} {ms:.2f}" for name, ms in sorted(step_ms.items(), key=lambda kv: kv[1]))
        log.info(
            "ahead-of-time decode step: %s GEMMs, measured (ms per step at %d rows: %s)",
            picked,
            rows,
            timings,
        )
        return runners[picked]

    def _runner(self, model: nn.Module, rows: int, gemms: str, weights: str | None = None) -> _Package:
        start = time.perf_counter()
        options = self.options | GEMMS[gemms]
        path = package_dir() / f"{package_key(model, rows, options, weights)}.pt2"
        keyed = time.perf_counter() - start
        streamed = options.pop("streamed", False)  # not inductor's: how the Linears are traced
        if path.exists():
            try:
                start = time.perf_counter()
                runner = _Package(path, weightless=streamed)
                with contextlib.suppress(OSError):  # recently used: kept by _prune (a read-only cache too)
                    os.utime(path)
                loaded = time.perf_counter() - start
                self.loaded, self.last = self.loaded + 1, ("loaded", path.name, keyed + loaded)
                log.info("ahead-of-time decode step: loaded %s in %.2f s", path.name, loaded)
                return runner
            except Exception as err:  # noqa: BLE001 (a truncated or foreign file): built again below
                log.warning(
                    "ahead-of-time decode step: %s could not be loaded (%s): building it again", path, err
                )
        start = time.perf_counter()
        with inductor_options(**options):
            _build(model, rows, path, streamed)
        built = time.perf_counter() - start
        start = time.perf_counter()
        runner = _Package(path, weightless=streamed)
        self.built, self.last = self.built + 1, ("built", path.name, keyed + time.perf_counter() - start)
        log.info("ahead-of-time decode step: built %s in %.1f s", path.name, built)
        _prune(path.parent, KEEP)
        return runner
