"""Whether compiling the one-token decode step pays for a job (`compile=auto`), and the clock that measures
a compiled step so that the next job decides by this machine's own figures.

Compiling costs seconds once (cold: ~29 s for the 10.8M model on 2 CPU cores; ~7 s once inductor's
on-disk cache holds the graph) and saves a part of every step after (10.8M batch 1: ~4.0 -> ~2.0-2.6 ms
a token on an AVX2 EPYC; at batch 8 little or nothing, benchmarks/README.md). So it pays for a long
job and not a short one, by an amount only this machine can tell:

- measured (this machine has compiled this model's step at this batch size before, `StepClock`):
  compile when steps x (eager step - compiled step) > MARGIN x the last compile's seconds;
- not yet measured: compile when the job's eager time is more than PAYBACK x FIRST_COMPILE_S (a
  cold compile's cost assumed, above the 25-45 s measured on 2 cores): the first long job measures it.
  On CUDA the step is one CUDA graph, 6x the eager step at 85M batch 1 on an H200 where the compile
  took 17-19 s (benchmarks/README.md): a compile assumed at CUDA_FIRST_COMPILE_S that saves most of a
  step, repaid by CUDA_PAYBACK x its seconds of eager work.

steps is the job's most decode steps: its batches x max_new_tokens (a batch whose samples all end early
at EOS takes fewer; MARGIN leaves room for that). Jobs that stayed eager add their steps' eager seconds
to the key's `eager_s`, and a job counts those as steps of its own (at its eager pace) in either rule:
many short jobs of one model on one machine compile once they have spent what one long job would have
(a ski rental: what was paid renting buys; a decision to compile clears the count). Only where what a
compile buys lasts: a CPU package kept on disk (engine.ahead_of_time), not yet there; on CUDA or
through torch.compile every job compiles again, and a package on disk costs each job its load.
Without it a 10.8M model decoded 256 tokens at a time stayed eager forever, at 0.31-0.35x llama.cpp's
best where its package, once on disk, runs 1.17-1.33x (benchmarks/README.md, session 31). A step's
time is a batch's, all its rows. The figures
live in the layout cache (decode_layout.json) beside the measured layout, keyed alike. Training's
`compile=auto` weighs its own step by the same rule (multiar/training/compile_when_it_pays.py). No
Lightning, Hydra or domain code here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from multiar.engine.choice_cache import read_cache, update_cache, write_cache

FIRST_COMPILE_S = 60.0  # a cold compile's seconds assumed before one is measured here
PAYBACK = 4.0  # unmeasured: the job's eager time must be this many first compiles
CUDA_FIRST_COMPILE_S = 30.0  # the same on CUDA (17-19 s measured at 85M on an H200's 16-core host)
# the compiled step saves ~5/6 of the eager one there (a CPU's ~1/2): MARGIN / (5/6), as PAYBACK is
# MARGIN / (1/2) on a CPU
CUDA_PAYBACK = 2.4
MARGIN = 2.0  # measured: the steps' saving must repay the compile this many times
# a CPU's step is a package built ahead of time (engine.ahead_of_time): where this model's is on disk, the
# compile's cost is a load's (0.02-1.4 s measured: 10.8M, 85M), assumed this until one is measured here
LOAD_S_ASSUMED = 2.0
PACKAGES_KEPT = 16  # models whose package a clock entry remembers
# how the weights' key of a package that holds no weights (engine.ahead_of_time's streamed one) starts:
# it serves every model of the clock's key and config (a digest of the config follows), no digest taken
ANY_WEIGHTS = "any weights, config "


def first_compile_rule(device: str) -> tuple[float, float]:
    """(PAYBACK, FIRST_COMPILE_S) for a device type before a compile was measured there."""
    if device == "cuda":
        return CUDA_PAYBACK, CUDA_FIRST_COMPILE_S
    return PAYBACK, FIRST_COMPILE_S


@dataclass
class CompileDecision:
    """compile=auto's answer for one job, and the figures it was made from (for the log line and
    generate.json's provenance)."""

    compile: bool
    steps: int  # the job's most decode steps (batches x max_new_tokens)
    eager_ms: float  # a decode step as the job would run it uncompiled
    compiled_ms: float | None = None  # measured before on this machine (None: never)
    compile_s: float | None = None  # the last compile's seconds here (None: never measured)
    resumed: bool = False  # pinned by a resumed run's journal, not weighed anew
    device: str = "cpu"  # the device type the step runs on (an unmeasured first compile's rule)
    cached: bool = False  # this model's package is on disk: compile_s is a load's
    what: str = "the decode step"  # the step weighed, for the log line (training weighs its own)
    payback: float | None = None  # an unmeasured first compile's rule, where not the device's (training)
    first_compile_s: float | None = None
    steps_before: int = 0  # the eager seconds of earlier jobs that stayed eager, as steps at eager_ms

    def as_dict(self) -> dict:
        return {
            k: round(v, 3) if isinstance(v, float) else v for k, v in self.__dict__.items() if k != "what"
        }

    def log_line(self) -> str:
        verb = f"{'compiling' if self.compile else 'not compiling'} {self.what}"
        if self.resumed:
            return f"compile=auto: {verb}, as the run being resumed did"
        steps = self.steps + self.steps_before
        counted = (
            f"({self.steps} + {self.steps_before} steps' worth eager before)" if self.steps_before else steps
        )
        if self.compiled_ms is None:
            payback, first_s = first_compile_rule(self.device)
            payback, first_s = self.payback or payback, self.first_compile_s or first_s
            why = (
                f"{counted} steps x {self.eager_ms:.2f} ms eager = "
                f"{steps * self.eager_ms / 1e3:.0f} s"
                f" {'>' if self.compile else '<='} {payback:g} x {first_s:g} s (a first compile on"
                f" {self.device}, not measured here yet)"
            )
        else:
            saved = steps * (self.eager_ms - self.compiled_ms) / 1e3
            cost = "to load its package, built before" if self.cached else "to compile"
            why = (
                f"{counted} steps x ({self.eager_ms:.2f} - {self.compiled_ms:.2f} ms compiled, measured"
                f" here) = {saved:.1f} s saved {'>' if self.compile else '<='} {MARGIN:g} x"
                f" {self.compile_s:.2f} s {cost}"
            )
        return f"compile=auto: {verb}: {why}"


def compile_pays(
    steps: int,
    eager_ms: float,
    measured: dict | None,
    device: str = "cpu",
    what: str = "the decode step",
    first_rule: tuple[float, float] | None = None,
    eager_s_before: float = 0.0,
) -> CompileDecision:
    """Whether a job of at most `steps` steps of eager_ms each is faster compiled, from what this
    machine measured before (`measured`: a StepClock's figures, or None; device: the step's device
    type, whose rule applies before anything was measured, unless first_rule gives (payback, first
    compile's seconds) for it; what: the step, for the log line; eager_s_before: the eager seconds of
    earlier jobs that stayed eager (`eager_seconds`), counted as steps of this job)."""
    before = round(1e3 * eager_s_before / eager_ms) if eager_ms > 0 else 0
    total = steps + before
    if not measured:
        payback, first_s = first_rule or first_compile_rule(device)
        pays = total * eager_ms / 1e3 > payback * first_s
        rule = dict(payback=payback, first_compile_s=first_s) if first_rule else {}
        return CompileDecision(pays, steps, eager_ms, device=device, what=what, steps_before=before, **rule)
    cached = bool(measured.get("cached"))
    compiled_ms = float(measured["compiled_ms"])
    compile_s = float(measured.get("load_s", LOAD_S_ASSUMED) if cached else measured["compile_s"])
    pays = total * (eager_ms - compiled_ms) / 1e3 > MARGIN * compile_s
    return CompileDecision(
        pays,
        steps,
        eager_ms,
        compiled_ms,
        compile_s,
        device=device,
        what=what,
        cached=cached,
        steps_before=before,
    )


def eager_seconds(cache_file: Path | None, key: str) -> float:
    """The eager decode seconds noted under key by jobs that stayed eager since the last compile."""
    return float((read_cache(cache_file, key) or {}).get("eager_s", 0.0))


def note_eager(cache_file: Path | None, key: str, seconds: float) -> None:
    """Add a job's eager decode seconds (its most steps x its eager step: a job that ends early at EOS
    counts in full, erring toward compiling sooner) to key's count."""

    def add(entry: dict | None) -> dict:
        entry = entry or {}
        return entry | {"eager_s": float(entry.get("eager_s", 0.0)) + seconds}

    update_cache(cache_file, key, add)


def forget_eager(cache_file: Path | None, key: str) -> None:
    """Clear key's count: a job decided to compile (a failed build starts the count again; StepClock's
    saved figures carry none either)."""
    if "eager_s" in (read_cache(cache_file, key) or {}):
        update_cache(
            cache_file, key, lambda entry: {k: v for k, v in (entry or {}).items() if k != "eager_s"}
        )


def synchronize(device: torch.device) -> None:
    """Wait for device's queued work (a GPU's), so that a clock read after it times the work itself."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def read_measured(
    cache_file: Path | None,
    key: str,
    weights: str | None = None,
    on_disk: Callable[[str], bool] | None = None,
) -> dict | None:
    """What a StepClock saved under key (a compiled step's ms and a compile's seconds), or None; with
    "cached": True where the package its clock recorded for these weights (a digest, or a key for any
    weights of a config) is still on disk (on_disk tells, given its file name)."""
    entry = read_cache(cache_file, key)
    if entry is None or "compiled_ms" not in entry:
        return None
    package = entry.get("packages", {}).get(weights) if weights else None
    cached = bool(package and on_disk and on_disk(package))
    if not cached and "compile_s" not in entry:  # only loads measured: a build's cost is not known
        return None
    return entry | {"cached": True} if cached else entry


@dataclass
class StepClock:
    """Times a compiled model's one-token steps: the first call (compiling, and one step) and the
    rest, and keeps the figures for the next job's decision (`save`: after the first 20 steps, then
    each time their count doubles, so a killed job has saved them too)."""

    cache_file: Path | None
    key: str
    device: torch.device
    rows: int  # the batch size its figures are for: steps of other row counts are not timed
    # a digest of the model's weights (the package it used is kept under it), or a key for any weights
    # of its config (ANY_WEIGHTS...)
    weights: str | None = None
    compile_s: float | None = None
    times: list[float] = field(default_factory=list)
    # how the first call got its step, for a package made ahead of time (engine.ahead_of_time): ("built" |
    # "loaded", the package's file name, a load's seconds: after a build, the load that followed it);
    # None: torch.compile compiled it
    package: tuple[str, str, float] | None = None
    spare_s: float = 0.0  # of the first call's seconds, those a later model's first call will not pay

    WARM_UP = 4  # steps after the compiling one whose time still includes first-touch costs

    def timed(self, step, *args):  # noqa: ANN001, ANN201
        """step(*args), timed (synchronized on a GPU: its time is the step's, not the launch's)."""
        start = time.perf_counter()
        out = step(*args)
        synchronize(self.device)
        self.record(time.perf_counter() - start)
        return out

    def record(self, seconds: float) -> None:
        """One compiled step's seconds: the first is the compile's (with one step in it), the rest steps."""
        if self.compile_s is None:
            self.compile_s = seconds
        elif len(self.times) < 100_000:  # a job's first 100k steps tell the step's time well enough
            self.times.append(seconds)
            n = len(self.times) - self.WARM_UP
            if n >= 16 and n & (n - 1) == 0:  # 16, 32, 64, ... timed steps
                self.save()

    def compiled_ms(self) -> float | None:
        """The median step after warm-up, in ms; None before enough steps were timed."""
        steady = sorted(self.times[self.WARM_UP :])
        return 1e3 * steady[len(steady) // 2] if len(steady) >= 16 else None

    def save(self) -> None:
        """Write compiled_ms and the first call's seconds under key: compile_s where it compiled or built
        a package, load_s where it loaded one, and the package's name under the weights' digest
        (nothing when too few steps were timed)."""
        ms = self.compiled_ms()
        if ms is None or self.compile_s is None:
            return
        entry = read_cache(self.cache_file, self.key) or {}
        entry = {k: v for k, v in entry.items() if k in ("compile_s", "load_s", "packages")} | {
            "compiled_ms": ms
        }
        how, name, load_s = self.package or ("built", None, None)
        entry["load_s" if how == "loaded" else "compile_s"] = max(self.compile_s - self.spare_s, 0.0)
        if how == "built" and load_s is not None:  # a load measured since is the better figure
            entry.setdefault("load_s", load_s + ms / 1e3)  # a loaded first call: key, load, a step
        if name is not None and self.weights is not None:
            packages = {k: v for k, v in entry.get("packages", {}).items() if k != self.weights}
            entry["packages"] = dict(list(packages.items())[-(PACKAGES_KEPT - 1) :]) | {self.weights: name}
        write_cache(self.cache_file, self.key, entry)
