"""Which float precision pays on this machine: bf16 where the hardware runs bf16 matmuls faster than
fp32 (a GPU with bf16, a CPU with AMX), fp32 elsewhere. On a CPU without AMX, bf16 matmuls ran at
half fp32's speed on this machine kind, so guessing from "supports bf16" would halve training speed.

A CPU without the AMX flag is measured once (a ~1 s matmul probe) and the answer cached per CPU model
and torch version, so later runs decide instantly.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import platform
import time
from pathlib import Path

import torch

log = logging.getLogger("multiar")

PROBE_FORMAT = 1


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.cache
def has_amx() -> bool:
    """Whether this CPU has AMX's bf16 matrix units (its flags read once)."""
    return "amx_bf16" in cpu_flags()


def slow_bf16_attention(device: torch.device) -> bool:
    """Whether SDPA over bf16 keys and values runs slower than over fp32 on device: a CPU without AMX
    (an AVX512-BF16 EPYC: several times slower), where keys and values are kept and attended in fp32.
    With AMX bf16 is the faster (a 512-token prefill 1.35 against 3.95 ms; benchmarks/README.md)."""
    return device.type == "cpu" and not has_amx()


ARM_FIELDS = ("CPU implementer", "CPU variant", "CPU part", "CPU revision")


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU as measured choices are keyed by: its name, family/model/stepping (an ARM core's
    implementer/variant/part/revision) and a digest of its flags. The name alone is not enough: under a
    hypervisor an AVX2-only EPYC (Milan) and an AVX512-BF16 one (Genoa) both say "AMD EPYC", and what is
    fast (or packs at all) differs between them; an ARM kernel gives no name at all."""
    try:
        fields: dict[str, str] = {}
        for line in cpuinfo.read_text().splitlines():
            if not line.strip():
                break  # the first processor's block is enough
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        fields = {}
    arm = [k for k in ARM_FIELDS if k in fields]  # an ARM kernel names no model: its core's ids instead
    if "model name" not in fields and not arm:
        return platform.processor() or platform.machine()
    name = fields.get("model name") or platform.machine()
    features = fields.get("flags") or fields.get("Features", "")  # x86's flags, ARM's features
    flags = hashlib.sha256(" ".join(sorted(features.split())).encode()).hexdigest()[:8]
    where = " ".join(f"{k} {fields[k]}" for k in ("cpu family", "model", "stepping", *arm) if k in fields)
    return f"{name} ({where}, flags {flags})"


def matmul_flops(dtype: torch.dtype, n: int = 512, seconds: float = 0.4, device: str = "cpu") -> float:
    """Measured matmul FLOP/s of an n x n product in dtype (best of repeated timings over ~seconds)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(3):  # warm-up: thread pool, kernel selection
        a @ b
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / 4)
    return 2 * n**3 / best


def _probe_cpu(cache_file: Path | None) -> tuple[bool, str]:
    key = f"{cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads"
    cached: dict = {}
    if cache_file is not None and cache_file.exists():
        try:
            cached = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            cached = {}
    entry = cached.get(key)
    if not isinstance(entry, dict) or entry.get("format") != PROBE_FORMAT:
        fp32, bf16 = matmul_flops(torch.float32), matmul_flops(torch.bfloat16)
        entry = {"format": PROBE_FORMAT, "fp32_gflops": fp32 / 1e9, "bf16_gflops": bf16 / 1e9}
        if cache_file is not None:
            try:
                cache_file.parent.mkdir(parents=True, exist_ok=True)
                cache_file.write_text(json.dumps(cached | {key: entry}, indent=1))
            except OSError:
                pass  # a read-only cache only costs the probe next time
    ratio = entry["bf16_gflops"] / entry["fp32_gflops"]
    how = f"bf16 matmul {entry['bf16_gflops']:.0f} vs fp32 {entry['fp32_gflops']:.0f} GFLOP/s on this CPU"
    return ratio >= 1.2, f"{how} (probe, {ratio:.2f}x)"


def bf16_is_fast(device: torch.device | str = "cpu", cache_file: Path | None = None) -> tuple[bool, str]:
    """Whether bf16 is the faster path on device, and why (one phrase for the log).

    cuda: bf16 support. CPU: the AMX flag says yes at once; otherwise a matmul probe, cached in
    cache_file when given (None: the flag alone decides, no probe)."""
    device = torch.device(device)
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, f"GPU {'supports' if ok else 'lacks'} bf16"
    if "amx_bf16" in cpu_flags():
        return True, "CPU has AMX (bf16 matrix units)"
    if cache_file is None:
        return False, "CPU has no AMX"
    return _probe_cpu(cache_file)


def resolve_precision(precision: str, accelerator: str, cache_dir: str | Path) -> tuple[str, str]:
    """A Lightning precision for precision='auto' (bf16-mixed where bf16 is faster, else 32-true) and
    the reason; any other value is returned as given."""
    if precision != "auto":
        return precision, "as configured"
    gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    fast, why = bf16_is_fast("cuda" if gpu else "cpu", Path(cache_dir).expanduser() / "precision.json")
    return ("bf16-mixed" if fast else "32-true"), why
