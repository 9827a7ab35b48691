"""The fastest way to sample with a model on this machine, chosen by measuring it: `prepare_for_decoding`.

Float candidates are a weight layout and a dtype: `fp32/linear` (nn.Linear), `fp32/packed` (oneDNN's
packed Linear for fp32 weights of 512 KiB or more, `multiar.engine.packed`), `bf16/linear` and
`bf16/packed`. Each candidate's copy of the model decodes a few steps at the batch size asked (prefill,
then one token a step), rounds interleaved, and the fastest step wins. `dtype=` and `layout=` narrow the
candidates (one left: nothing is measured); a missing kernel (oneDNN's packed Linear) removes its
candidates. Quantized models (int8, int4) keep their weights; each layer shape's kernel (the int8/int4
kernel, or the weights dequantized once to bf16, packed where oneDNN packs bf16) is picked the same
way, per shape (`engine.quantized_kernels`); where the picks mix in bf16 copies, the whole model
decodes with them and with its own kernels, and the faster set is kept. Their layers' calls of many
rows (a prompt's prefill) dequantize the weight for one dense GEMM from a row count measured too, and
below it run the kernel or, where measured faster, engine.cpu_matvec's operator
(`engine.quantized_prefill`).

The choice is cached in `cache_dir/decode_layout.json`, keyed by CPU model, torch version, thread
count, device, batch size, the model's layer shapes and the narrowing asked: later runs on that
machine decide at once, and the same settings give the same choice (hence the same samples).
No Lightning, Hydra or domain code here.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from multiar.engine import ahead_of_time, cpu_matvec, huge_pages
from multiar.engine.choice_cache import CACHE_FILE, cache_key, read_cache, write_cache
from multiar.engine.compile_choice import (
    CompileDecision,
    StepClock,
    compile_pays,
    eager_seconds,
    forget_eager,
    note_eager,
    read_measured,
)
from multiar.engine.compiled_dtype import compiled_dtype
from multiar.engine.decode_choice import TORCH_DTYPES, DecodeChoice, Timer
from multiar.engine.float_rows import choose_rows, float_linears
from multiar.engine.float_rows import clear as clear_rows
from multiar.engine.float_rows import rows_seconds as float_rows_seconds
from multiar.engine.packed import decode_layout, packs
from multiar.engine.quantize import Int4Linear, Int8Linear, quantized_mode
from multiar.engine.quantized_kernels import choose_kernels, layer_seconds, own_kernels
from multiar.engine.quantized_prefill import RowsTimer, choose_prefill, is_prefill_key, rows_seconds
from multiar.errors import first_line

log = logging.getLogger("multiar")
DTYPES = tuple(TORCH_DTYPES)
LAYOUTS = ("linear", "packed")


def float_candidates(device: torch.device, dtype: str, layout: str) -> list[str]:
    """The dtype/layout pairs to measure: those dtype= and layout= allow ("auto": any), less packed ones
    where this torch, device or CPU has no oneDNN packed Linear for that dtype (on an AVX2-only CPU
    `dtype=auto layout=packed` leaves fp32/packed; where no pair is left, each dtype's nn.Linear)."""
    dtypes = DTYPES if dtype == "auto" else (dtype,)
    layouts = LAYOUTS if layout == "auto" else (layout,)
    if device.type == "cuda" and dtype == "auto" and not torch.cuda.is_bf16_supported():
        dtypes = ("fp32",)
    usable = [
        f"{d}/{x}"
        for d in dtypes
        for x in layouts
        if x != "packed" or (device.type == "cpu" and packs(TORCH_DTYPES[d]))
    ]
    return usable or [f"{d}/linear" for d in dtypes]


def build_float(model: nn.Module, candidate: str) -> nn.Module:
    """model (in place) as candidate "dtype/layout" lays it out, its weights in huge pages where the
    kernel has them (engine.huge_pages: every candidate timed as it will run)."""
    dtype, layout = candidate.split("/")
    model = model.to(TORCH_DTYPES[dtype]).eval()
    model = decode_layout(model) if layout == "packed" else model
    huge_pages.place(model)
    return model


def decode_step_seconds(models: dict[str, nn.Module], batch_size: int, rounds: int = 3) -> dict[str, float]:
    """Seconds per one-token decode step of each model at batch_size (after an 8-token prefill),
    candidates interleaved: each round runs a few steps of every model; the best round counts."""
    best = dict.fromkeys(models, float("inf"))
    config = next(iter(models.values())).config
    length = max(1, min(8, config.block_size // 2))  # a prompt, then up to 6 steps within the block
    prompt = torch.randint(0, config.vocab_size, (batch_size, length))
    steps = max(1, min(6, config.block_size - length))
    with torch.inference_mode():
        for m in models.values():
            m.setup_caches(batch_size, min(m.config.block_size, 64))
        try:
            for r in range(rounds + 1):  # the first round warms up
                for name, m in models.items():
                    seconds = _time_steps(m, prompt.to(m.wte.weight.device), steps)
                    if r:
                        best[name] = min(best[name], seconds)
        finally:
            for m in models.values():
                m.clear_caches()
    return best


def _time_steps(model: nn.Module, prompt: torch.Tensor, steps: int) -> float:
    model(prompt, 0, logits_at=-1)
    token = prompt[:, -1:]
    sync = torch.cuda.synchronize if prompt.device.type == "cuda" else lambda: None
    sync()
    start = time.perf_counter()
    for i in range(steps):
        model(token, prompt.size(1) + i)
    sync()
    return (time.perf_counter() - start) / steps


def choose_float(
    model: nn.Module,
    batch_size: int,
    dtype: str,
    layout: str,
    cache_file: Path | None,
    timer: Timer,
    rows: Callable[[nn.Module], dict[str, str]] = lambda m: {},
) -> tuple[nn.Module, DecodeChoice]:
    """model laid out as the fastest float candidate (measured, or read from the cache). rows: sets a
    model's rule for calls of a few rows (engine.float_rows), on each candidate before it is timed and
    on the one returned (compile=auto times it eagerly next)."""
    device = next(model.parameters()).device
    candidates = float_candidates(device, dtype, layout)
    if len(candidates) == 1:  # "forced" only when it is what was asked (bf16/packed on AVX2: bf16/linear)
        how = "forced" if candidates[0] == f"{dtype}/{layout}" else "only candidate"
        built = build_float(model, candidates[0])
        rows(built)
        return built, _float_choice(candidates[0], how, batch_size, {})
    # a pick timed where the Linears had no operator, or another version of it, is measured again
    offered = f" rows matvec {cpu_matvec.source_digest()}" if float_linears(model) else ""
    key = cache_key(model, batch_size, f"dtype={dtype} layout={layout}{offered}")
    entry = read_cache(cache_file, key)
    if entry is not None and entry.get("picked") in candidates:
        cached = build_float(model, entry["picked"])
        rows(cached)
        return cached, _float_choice(entry["picked"], "cached", batch_size, entry["step_ms"])
    built = {c: build_float(copy.deepcopy(model), c) for c in candidates}
    for m in built.values():
        rows(m)
    seconds = timer(built)
    picked = min(candidates, key=lambda c: seconds[c])
    for c in candidates:  # the others dropped: their rules' cycles undone, so they are freed at once
        if c != picked:
            clear_rows(built[c])
    step_ms = {c: 1e3 * seconds[c] for c in candidates}
    write_cache(cache_file, key, {"picked": picked, "step_ms": step_ms})
    return built[picked], _float_choice(picked, "measured", batch_size, step_ms)


def _float_choice(candidate: str, how: str, batch_size: int, step_ms: dict) -> DecodeChoice:
    dtype, layout = candidate.split("/")
    return DecodeChoice(dtype=dtype, layout=layout, how=how, batch_size=batch_size, step_ms=step_ms)


def prepare_for_decoding(
    model: nn.Module,
    *,
    batch_size: int = 1,
    dtype: str = "auto",
    layout: str = "auto",
    cache_dir: str | Path | None = None,
    compile: bool | str = False,
    steps: int | None = None,
    timer: Timer | None = None,
    layer_timer: Callable | None = None,
    prefill_timer: RowsTimer | None = None,
    kernels: dict[str, str] | None = None,
    decided: bool | None = None,
    gemms: str | None = None,
    rows_timer: Callable | None = None,
) -> tuple[nn.Module, DecodeChoice]:
    """model (converted in place, or a converted copy) laid out for sampling at batch_size as fast as
    this machine runs it, and the choice made.

    model: fp32 weights (dtype and layout are chosen here), or already quantized by
    `multiar.engine.quantize` (its layers' kernels are chosen here; dtype and layout do not apply).
    dtype: auto|fp32|bf16; layout: auto|linear|packed; cache_dir: where decode_layout.json keeps
    measured choices (None: measure every time); compile: True, the chosen model compiled for sampling
    (float layouts: nn.Linear only, inductor packs weights itself); "auto", compiled when that pays for
    a job of `steps` decode steps (`multiar.engine.compile_choice`; a quantized model's own kernels,
    as compile=True compiles them; a job of no steps, or layout="packed", stays eager); kernels: a
    quantized model's per-shape kernels and prefill rules, or a float model's rule for calls of a few
    rows (engine.float_rows), to use rather than choose (a resume pins the killed run's; without the
    rule, every call on the kernel, or on F.linear; None: chosen);
    decided: what compile="auto" decided for the run a resume continues (pinned, not weighed anew: one
    graph for the batch size, eager when it fails, as then); gemms: the GEMMs a compiled CPU step runs
    (engine.ahead_of_time; a resumed run's, pinned; None: measured or recorded). timer / layer_timer: seconds per decode
    step of each candidate model / per call of each layer, prefill_timer: of each mode's quantized layers at many rows
    (`engine.quantized_prefill`), rows_timer: of a float model's Linears at a few rows (`engine.float_rows`;
    tests inject them)."""
    if dtype not in ("auto", *DTYPES) or layout not in ("auto", *LAYOUTS):
        raise ValueError(
            f"dtype={dtype!r}, layout={layout!r}: dtype auto|fp32|bf16, layout auto|linear|packed"
        )
    if compile not in (True, False, "auto"):
        raise ValueError(f"compile={compile!r}: True, False or 'auto'")
    if compile is True and layout == "packed":
        raise ValueError("compile=true takes layout=auto or linear: inductor packs the weights itself")
    if compile == "auto" and decided is None and (not steps or layout == "packed"):
        compile = False  # no one-token steps to repay it (a speculative job), or packed weights pinned
    cache_file = Path(cache_dir).expanduser() / CACHE_FILE if cache_dir is not None else None
    quantized = [m for m in model.modules() if isinstance(m, Int8Linear | Int4Linear)]
    timer = timer or (lambda models: decode_step_seconds(models, batch_size))
    # a quantized model's layers at many rows (prefill): on their kernel, operator or dense, set on them
    # before anything copies them; pinned by a resume's kernels (a journal from before the rules: the
    # kernel)
    prefill = (
        choose_prefill(model, cache_file, kernels or None, prefill_timer or rows_seconds) if quantized else {}
    )
    if quantized and compile is True:  # inductor compiles the kernels quantize made
        choice = DecodeChoice(
            dtype="fp32", layout=quantized_mode(quantized), how="forced", batch_size=batch_size
        )
        choice.kernels = own_kernels(quantized) | prefill
        return _in_huge_pages(
            _compiled(model, choice, _clock(model, choice, cache_file), gemms), choice
        ), choice
    if quantized:  # compile=auto compiles quantize's kernels: a copy before any is swapped for bf16
        spare = copy.deepcopy(model) if compile == "auto" else None
        model, choice = choose_kernels(
            model, batch_size, cache_file, layer_timer or layer_seconds, kernels, model_timer=timer
        )
        choice.kernels |= prefill
        if compile == "auto":
            model = _compile_if_it_pays(model, choice, spare, steps or 0, cache_file, timer, decided, gemms)
        return _in_huge_pages(model, choice), choice
    # a compiled step is nn.Linear weights (inductor packs them itself) in compiled_dtype_of's dtype; an
    # fp32 copy for when that is not the eager pick's layout and dtype
    device = next(model.parameters()).device
    packable = any(c.endswith("/packed") for c in float_candidates(device, dtype, layout))
    spare = copy.deepcopy(model) if compile and packable else None

    memo: dict[str, str] = {}  # each dtype's rule decided once here (measured, cached or pinned)

    def rows(m: nn.Module) -> dict[str, str]:  # a float model's rule for calls of a few rows, set on it
        return choose_rows(m, cache_file, kernels, rows_timer or float_rows_seconds, memo)

    model, choice = choose_float(model, batch_size, dtype, layout, cache_file, timer, rows)
    if compile is True:
        choice.dtype = compiled_dtype_of(choice, spare, cache_file, gemms)
        clock = _clock(_compile_source(model, choice, spare, choice.dtype), choice, cache_file)  # as auto's
        model = _compiled(_as_linear(model, choice, spare), choice, clock, gemms)
    elif compile == "auto":
        model = _compile_if_it_pays(model, choice, spare, steps or 0, cache_file, timer, decided, gemms)
    # the model that runs, as it is now (the eager pick, or rebuilt to compile): its prefill's and eager
    # steps' Linears
    choice.kernels = rows(model)
    return _in_huge_pages(model, choice), choice


def _in_huge_pages(model: nn.Module, choice: DecodeChoice) -> nn.Module:
    """model's weights in huge pages (an eager one's placed now: a quantized model's, its layers swapped
    for bf16 ones; a compiled one's were, before its package was bound to them), the MiB noted."""
    if not choice.layout.endswith(", compiled"):
        huge_pages.place(model)
    if next(model.parameters()).device.type == "cpu":
        mib = round(huge_pages.placed_bytes(model) / 2**20, 1)
        choice.huge_pages = huge_pages.decision(model) | {"mib": mib}
    return model


def compiled_dtype_of(
    choice: DecodeChoice, spare: nn.Module | None, cache_file: Path | None, gemms: str | None = None
) -> str:
    """The dtype a compiled float step is built in: where both dtypes were candidates and spare (the fp32
    copy either is built from) is on a CPU, the one whose weights read faster at the batch's rows
    (engine.compiled_dtype: a compiled step streams them, its eager step's timings foretell it badly),
    its figures noted in choice.weights_ms (gemms: the step's GEMMs pinned); else the eager pick's (a
    GPU's; one dtype asked; no spare, as with layout=linear pinned or where nothing packs: the pick's own
    weights are all there is)."""
    dtypes = {c.split("/")[0] for c in choice.step_ms}
    if spare is None or dtypes != set(DTYPES) or next(spare.parameters()).device.type != "cpu":
        return choice.dtype
    dtype, choice.weights_ms = compiled_dtype(spare, choice.batch_size, cache_file, gemms)
    return dtype


def _compile_source(
    model: nn.Module, choice: DecodeChoice, spare: nn.Module | None, dtype: str | None = None
) -> nn.Module:
    """What a compiled step is made from: the eager pick where it is on nn.Linear in the compiled dtype
    (dtype; None: the pick's own), else spare (the fp32 copy, or a quantized model before any layer
    went to bf16); where spare is None the pick is the model itself."""
    weights = next(model.parameters()).dtype
    as_is = choice.layout == "linear" and (dtype is None or weights == TORCH_DTYPES[dtype])
    return model if as_is or spare is None else spare


def _as_linear(model: nn.Module, choice: DecodeChoice, spare: nn.Module | None) -> nn.Module:
    """model as choice's dtype on nn.Linear (what compiles): itself, or spare (fp32) rebuilt so."""
    same = choice.layout == "linear" and next(model.parameters()).dtype == TORCH_DTYPES[choice.dtype]
    choice.layout = "linear"
    return model if same else build_float(spare, f"{choice.dtype}/linear")


def _clock(
    model: nn.Module,
    choice: DecodeChoice,
    cache_file: Path | None,
    dtype: str | None = None,
    weigh: bool = True,
) -> StepClock:
    """A clock for a compiled step of model as choice lays it out: its figures are kept under a key of
    the machine, batch size, layer shapes and dtype (what compile=auto reads next time). weigh: the
    digest of model's weights taken now (a CPU's step is a package per model, engine.ahead_of_time: the
    clock notes which is these weights'); False: by _weigh, where it is needed (0.3 s at 85M fp32)."""
    device = next(model.parameters()).device
    cuda = ", cuda graph" if device.type == "cuda" else ""  # not a frozen graph's figures
    key = cache_key(model, choice.batch_size, f"compiled {_graph_of(choice, dtype)}{cuda}")
    clock = StepClock(cache_file, key, device, choice.batch_size)
    if weigh:
        _weigh(clock, model)
    return clock


def _packaged(clock: StepClock) -> bool:
    """Whether clock's step would be a package kept in a cache (engine.ahead_of_time)."""
    return clock.device.type == "cpu" and ahead_of_time.enabled() and clock.cache_file is not None


def _weigh(clock: StepClock, model: nn.Module) -> None:
    """Set clock.weights to model's digest where its step would be a package kept in a cache."""
    if _packaged(clock):
        clock.weights = ahead_of_time.weights_digest(model)


def _graph_of(choice: DecodeChoice, dtype: str | None = None) -> str:
    """What a compiled step of choice's model is made of: quantize's kernels, or dtype/linear (dtype:
    choice's own when None)."""
    mode = choice.layout.removesuffix(", compiled")
    return mode if mode in ("int8", "int4") else f"{dtype or choice.dtype}/linear"


def _compiled(
    model: nn.Module, choice: DecodeChoice, clock: StepClock | None, gemms: str | None = None
) -> nn.Module:
    from multiar.engine.decode import compile_for_sampling  # decode imports this module's neighbours

    choice.layout = f"{choice.layout}, compiled"
    rows, on_failure = None, None  # compile=true: a graph for every row count met
    if choice.compile:  # compile=auto: one graph, the job's batch; a failed compile leaves it eager
        rows = choice.batch_size

        def on_failure(err: Exception) -> None:
            log.warning(
                "compile=auto: the decode step did not compile (%s): decoding eagerly", first_line(err)
            )
            choice.layout = choice.layout.removesuffix(", compiled")
            choice.compile["compile"] = False

    return compile_for_sampling(model, rows=rows, clock=clock, on_failure=on_failure, gemms=gemms)


def _compile_if_it_pays(
    model: nn.Module,
    choice: DecodeChoice,
    spare: nn.Module | None,
    steps: int,
    cache_file: Path | None,
    timer: Timer,
    decided: bool | None,
    gemms: str | None = None,
) -> nn.Module:
    """model as choice laid it out, compiled when that pays for a job of `steps` decode steps
    (choice.compile says why): from nn.Linear weights (spare, the fp32 model, when the eager choice was
    packed), or a quantized model's own kernels (spare: before any shape went to bf16)."""
    quantized = choice.layout in ("int8", "int4")
    picked = choice.layout if quantized else f"{choice.dtype}/{choice.layout}"
    measured_ms = None if quantized else choice.step_ms.get(picked)  # a quantized one's are per layer
    dtype = None if quantized else compiled_dtype_of(choice, spare, cache_file, gemms)
    source = _compile_source(model, choice, spare, dtype)  # what would compile: the clock's key
    clock = _clock(source, choice, cache_file, dtype, weigh=False)
    device = next(model.parameters()).device.type
    if decided is not None:  # a resume: as the killed run decided
        decision = CompileDecision(decided, steps, measured_ms or 0.0, resumed=True, device=device)
    else:
        eager_ms = measured_ms or 1e3 * timer({picked: model})[picked]
        packages = (read_cache(cache_file, clock.key) or {}).get("packages") or {}
        config = ahead_of_time.any_weights_key(source) if _packaged(clock) else None
        if config in packages:  # a package for any weights of this config: no digest to take
            clock.weights = config
        elif packages:  # is one of them these weights'? (a digest to take)
            _weigh(clock, source)
        measured = read_measured(cache_file, clock.key, clock.weights, ahead_of_time.on_disk)
        # a ski rental (compile_choice): earlier eager jobs' seconds count where a compile buys what lasts,
        # a package kept on disk; not where each job compiles again (CUDA, torch.compile) or where one
        # is on disk already (each job pays its load)
        rental = _packaged(clock) and not (measured or {}).get("cached")
        before = eager_seconds(cache_file, clock.key) if rental else 0.0
        decision = compile_pays(steps, eager_ms, measured, device, eager_s_before=before)
        if rental and decision.compile:
            forget_eager(cache_file, clock.key)  # bought, whether or not the build succeeds
        elif rental:
            note_eager(cache_file, clock.key, steps * eager_ms / 1e3)
    choice.compile = decision.as_dict() | ({} if quantized else {"eager": picked})
    log.info("%s", decision.log_line())
    if not decision.compile:
        choice.weights_ms = {}  # the eager pick's dtype decodes: not what the pass chose
        return model
    if clock.weights is None:  # the package this job uses is noted under these weights for the next
        _weigh(clock, source)
    if (
        quantized
    ):  # every shape on its own kernel in the graph (and in the eager fallback); the prefill rules kept
        rule = {k: v for k, v in choice.kernels.items() if is_prefill_key(k)}
        choice.kernels = (
            own_kernels([m for m in spare.modules() if isinstance(m, Int8Linear | Int4Linear)]) | rule
        )
        return _compiled(spare, choice, clock, gemms)
    choice.dtype = dtype
    return _compiled(_as_linear(model, choice, spare), choice, clock, gemms)
