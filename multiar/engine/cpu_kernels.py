"""Fused fp32 CPU kernels for the eager training step (cpu_kernels.c): SwiGLU's gate and RMSNorm, forward
and backward, each in one pass over its rows.

torch 2.13 has no fused eager CPU kernel for either, so the step composed them from 2-6 passes each way
over activations the matmuls have pushed out of cache (engine/training_backward.py). The C file holds
the fused loops; it is compiled here on first use with the system's C compiler (`$CC`, else `cc`; ~0.5 s)
for this CPU (-march=native), cached under `$MULTIAR_CACHE/kernels` (else ~/.cache/multiar/kernels)
by a digest of the source, the compiler and the CPU's flags, and called through ctypes. A machine
without a compiler, or where the build fails, keeps the composed ops, logged once.

Which of the two is faster is measured once per library, thread count and torch version (fwd + bwd at
the 10.8M model's shapes, interleaved rounds) and cached beside the library: a build whose expf is not
vectorized can lose to torch's own kernels. `MULTIAR_CPU_KERNELS=0` keeps the composed ops.

Measured on a 2-vCPU Xeon with AMX (benchmarks/README.md, training, session 27): fwd + bwd at the shapes
above, SwiGLU gate 4.0 against 6.9-10.0 ms, RMSNorm 0.85-0.89 against 1.46-1.59; the 10.8M fp32
Lightning step 1.05x the composed ops' in four runs of six (1.00 in the first, 1.03 in the fifth),
85M fp32 1.03x, bf16-mixed 1.01x.
No Lightning, Hydra or domain code here.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from multiar.engine.choice_cache import cache_root, machine_key, read_cache, write_cache
from multiar.engine.precision import cpu_flags, cpu_model

log = logging.getLogger("multiar")

SOURCE = Path(__file__).with_name("cpu_kernels.c")
BASE_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
# tried in order: x86's 512-bit vectors with glibc's vector expf, the vector expf alone, plain C
BUILDS = (
    ["-mprefer-vector-width=512", "-DMULTIAR_VECTOR_EXPF", "-lmvec", "-lm"],
    ["-DMULTIAR_VECTOR_EXPF", "-lmvec", "-lm"],
    ["-lm"],
)
OPS = ("swiglu_gate", "rms_norm")

_i64, _ptr, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
SIGNATURES = {
    "swiglu_forward": [_ptr, _ptr, _i64, _i64, _int],
    "swiglu_backward": [_ptr, _ptr, _ptr, _i64, _i64, _int],
    "rms_norm_forward": [_ptr, _ptr, _ptr, _ptr, _i64, _i64, ctypes.c_float, _int],
    "rms_norm_backward": [_ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _int],
}


def enabled() -> bool:
    """`MULTIAR_CPU_KERNELS=0` keeps the composed ops (read on each call, so a benchmark can switch)."""
    return os.environ.get("MULTIAR_CPU_KERNELS", "1") != "0"


def kernel_dir() -> Path:
    return cache_root() / "kernels"


def compiler(variable: str = "CC", default: str = "cc") -> list[str] | None:
    """The C compiler's command (`$CC`, which may carry arguments, else `cc`; engine.cpu_matvec asks for
    C++'s: `$CXX`, else `c++`), or None where absent."""
    words = shlex.split(os.environ.get(variable, default)) or [default]
    found = shutil.which(words[0])
    return None if found is None else [found, *words[1:]]


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use; None where no build succeeds (logged once): any error
    here costs the fused kernels, never the run."""
    try:
        return _load()
    except Exception as err:  # noqa: BLE001 (an unreadable source, a full disk: the composed ops run)
        log.info("fused CPU kernels: %s; the composed torch ops run", err)
        return None


def _load() -> ctypes.CDLL | None:
    cc = compiler()
    if cc is None:
        log.info(
            "fused CPU kernels: no C compiler (%s); the composed torch ops run", os.environ.get("CC", "cc")
        )
        return None
    try:
        version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as err:
        log.info("fused CPU kernels: %s --version failed (%s); the composed torch ops run", cc[0], err)
        return None
    machine = native_target()
    errors = []
    for extra in BUILDS:
        digest = hashlib.sha256(
            "\0".join([SOURCE.read_text(), *cc, version, machine, *BASE_FLAGS, *extra]).encode()
        ).hexdigest()[:16]
        path = kernel_dir() / f"cpu_kernels-{digest}.so"
        if not path.exists():
            error = build_library(cc, extra, path)
            if error:
                errors.append(error)
                continue
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as err:  # e.g. built against a libmvec this process cannot load
            errors.append(f"{path}: {err}")
            continue
        for name, argtypes in SIGNATURES.items():
            getattr(lib, name).argtypes = argtypes
        lib.multiar_path = path
        return lib
    log.info("fused CPU kernels: no build succeeded (%s); the composed torch ops run", errors[-1])
    return None


def native_target() -> str:
    """What a -march=native library is built for: this CPU's model and flags (x86's flags, ARM's
    implementer and part), part of its cache key."""
    return f"{platform.machine()} {cpu_model()} {' '.join(sorted(cpu_flags()))}"


def build_library(cc: list[str], extra: list[str], path: Path, source: Path = SOURCE) -> str | None:
    """Compile source (with BASE_FLAGS and extra) into the shared library at path atomically (a temporary
    file renamed); the error's last line, or None."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
        os.close(fd)
    except OSError as err:
        return f"{path.parent}: {err}"
    # the link libraries after the source, where the linker resolves them
    flags = [f for f in extra if not f.startswith("-l")]
    libs = [f for f in extra if f.startswith("-l")]
    cmd = [*cc, *BASE_FLAGS, *flags, str(source), "-o", tmp, *libs]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as err:
        done = None
        failure = str(err)
    if done is not None and done.returncode == 0:
        os.replace(tmp, path)
        return None
    Path(tmp).unlink(missing_ok=True)
    if done is not None:
        failure = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
    return f"{' '.join(cmd)}: {failure}"


def fits(*tensors: Tensor) -> bool:
    """Whether the kernels take these: fp32, contiguous, on the CPU, not empty (shapes: the callers')."""
    return all(
        t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() and t.numel() > 0
        for t in tensors
    )


def fits_rms_norm(x: Tensor, weight: Tensor) -> bool:
    return fits(x, weight) and weight.shape == (x.size(-1),)


def fits_swiglu(gate_up: Tensor) -> bool:
    return fits(gate_up) and gate_up.size(-1) % 2 == 0


def chosen(op: str) -> bool:
    """Whether the fused kernel of op ("swiglu_gate" or "rms_norm") runs: enabled, built, and measured
    faster than the composed ops on this machine at this thread count."""
    return enabled() and library() is not None and _choice(torch.get_num_threads())[op]


@functools.cache
def _choice(threads: int) -> dict[str, bool]:
    """Each op's measured choice at this thread count, from the library's choice file or measured now;
    a measurement that fails (e.g. inside a forward under hooks it cannot run with) chooses neither."""
    try:
        return _measured_choice(threads)
    except Exception as err:  # noqa: BLE001 (the composed ops run, as without a compiler)
        log.info("fused CPU kernels: the measurement failed (%s); the composed torch ops run", err)
        return dict.fromkeys(OPS, False)


def measured() -> dict | None:
    """The cached measurement behind the choice at torch's thread count: per op its `fused` pick and
    `fused_ms` / `composed_ms`; None before one is made or without the library."""
    lib = library()
    if lib is None:
        return None
    entry = read_cache(_choice_file(lib), _choice_key())
    ops_there = entry is not None and all(
        isinstance(entry.get(op), dict) and "fused" in entry[op] for op in OPS
    )
    return entry if ops_there else None


def _choice_file(lib: ctypes.CDLL) -> Path:
    return lib.multiar_path.with_suffix(".choice.json")


def _choice_key() -> str:
    # the library's digest holds the compiler; the composed ops it is measured against are torch's
    return f"fused CPU kernels | {machine_key(torch.device('cpu'))}"


def _measured_choice(threads: int) -> dict[str, bool]:
    entry = measured()
    if entry is None:
        entry = measure()
        line = "; ".join(
            f"{op} fused {m['fused_ms']:.2f} ms, composed {m['composed_ms']:.2f}" for op, m in entry.items()
        )
        log.info("fused CPU kernels at %d threads: %s (fwd + bwd, medians)", threads, line)
        write_cache(_choice_file(library()), _choice_key(), entry)  # unwritable: measured again next process
    return {op: bool(entry[op]["fused"]) for op in OPS}


def measure(rounds: int = 7) -> dict[str, dict]:
    """Forward + backward of each op fused and composed, interleaved rounds, medians in ms, at the 10.8M
    model's step: 2048 rows, SwiGLU 2 x 1024 wide, RMSNorm 384 wide."""
    from multiar.engine import training_backward as composed  # the Functions these replace

    gen = torch.Generator().manual_seed(0)
    f32 = dict(generator=gen, dtype=torch.float32, device="cpu")  # whatever the default dtype or device
    gate_up, weight, x = (
        torch.randn(2048, 2048, **f32),
        torch.randn(384, **f32),
        torch.randn(2048, 384, **f32),
    )
    gate_up.requires_grad_(), x.requires_grad_(), weight.requires_grad_()
    cases: dict[str, tuple[tuple[Tensor, ...], dict[str, Callable[[], Tensor]]]] = {
        "swiglu_gate": (
            (gate_up,),
            {"fused": lambda: swiglu_gate(gate_up), "composed": lambda: composed._SwiGLUGate.apply(gate_up)},
        ),
        "rms_norm": (
            (x, weight),
            {
                "fused": lambda: rms_norm(x, weight, 1e-5),
                "composed": lambda: composed._RMSNorm.apply(x, weight, 1e-5),
            },
        ),
    }
    result = {}
    with torch.autocast("cpu", enabled=False), torch.enable_grad():
        for op, (inputs, fns) in cases.items():
            times: dict[str, list[float]] = {name: [] for name in fns}
            for _ in range(rounds + 1):  # the first round warms up, not counted
                for name, fn in fns.items():
                    start = time.perf_counter()
                    out = fn()
                    torch.autograd.grad(out, inputs, torch.ones_like(out))
                    times[name].append(time.perf_counter() - start)
            fused_ms, composed_ms = (statistics.median(times[n][1:]) * 1e3 for n in ("fused", "composed"))
            result[op] = {"fused": fused_ms < composed_ms, "fused_ms": fused_ms, "composed_ms": composed_ms}
    return result


def swiglu_gate(gate_up: Tensor) -> Tensor:
    """silu(gate) * up of gate_up (..., 2 * hidden) -> (..., hidden); fp32, contiguous (`fits`)."""
    return _SwiGLUGate.apply(gate_up)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over x's last dim; fp32, contiguous (`fits`)."""
    return _RMSNorm.apply(x, weight, eps)


def _p(t: Tensor) -> int:
    return t.data_ptr()


class _SwiGLUGate(torch.autograd.Function):
    """One pass each way; saves gate_up alone (silu(gate) is recomputed in the backward)."""

    @staticmethod
    def forward(ctx, gate_up: Tensor) -> Tensor:  # noqa: ANN001
        hidden = gate_up.size(-1) // 2
        out = gate_up.new_empty(*gate_up.shape[:-1], hidden)
        rows = gate_up.numel() // gate_up.size(-1)
        library().swiglu_forward(_p(gate_up), _p(out), rows, hidden, torch.get_num_threads())
        ctx.save_for_backward(gate_up)
        return out

    @staticmethod
    @once_differentiable  # first derivatives only: a clear error under create_graph
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: ANN001
        (gate_up,) = ctx.saved_tensors
        grad = grad.contiguous()  # (a gradient may come as a view: expanded or transposed)
        d = torch.empty_like(gate_up)
        rows, hidden = grad.numel() // grad.size(-1), grad.size(-1)
        library().swiglu_backward(_p(grad), _p(gate_up), _p(d), rows, hidden, torch.get_num_threads())
        return d


class _RMSNorm(torch.autograd.Function):
    """One pass each way (a row's second read hits L1); saves x and one rstd per row."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:  # noqa: ANN001
        C = x.size(-1)
        y = torch.empty_like(x)
        rstd = x.new_empty(x.numel() // C)
        library().rms_norm_forward(
            _p(x), _p(weight), _p(y), _p(rstd), rstd.numel(), C, eps, torch.get_num_threads()
        )
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    @once_differentiable  # first derivatives only: a clear error under create_graph
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:  # noqa: ANN001
        x, weight, rstd = ctx.saved_tensors
        grad = grad.contiguous()
        threads = torch.get_num_threads()
        dx, dw = torch.empty_like(x), torch.empty_like(weight)
        partial = x.new_empty(threads, x.size(-1))  # each thread's sum of dw over its rows
        library().rms_norm_backward(
            _p(grad),
            _p(x),
            _p(weight),
            _p(rstd),
            _p(dx),
            _p(dw),
            _p(partial),
            rstd.numel(),
            x.size(-1),
            threads,
        )
        return dx, dw, None
