"""What `engine.layout.prepare_for_decoding` picked and why (`DecodeChoice`: the log line, generate.json's
provenance, a resume's journal), and the timer type its measurements take. No Lightning, Hydra or domain
code here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

# the float dtypes a choice names
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# a timer: (candidate name -> model) -> seconds per decode step of each; injected by tests
Timer = Callable[[dict[str, nn.Module]], dict[str, float]]


@dataclass
class DecodeChoice:
    """What prepare_for_decoding picked, and why: for the log line and generate.json's provenance."""

    dtype: str  # fp32 | bf16 (activations of a quantized model: its kernels decide)
    layout: str  # linear | packed | compiled | int8 | int4
    how: str  # measured | cached | forced | only candidate
    batch_size: int
    step_ms: dict[str, float] = field(default_factory=dict)  # candidate -> ms per decode step
    # quantized: layer shape -> kernel, and "<mode> prefill" -> the rule for calls of many rows
    # (engine.quantized_prefill); float: "<dtype> rows" -> the rule for calls of a few rows
    # (engine.float_rows)
    kernels: dict[str, str] = field(default_factory=dict)
    compile: dict = field(default_factory=dict)  # compile=auto: its decision and figures (CompileDecision)
    # a compiled float step: ms of a pass over its weights per "<dtype> <kernel>", which chose its dtype
    # (engine.compiled_dtype); empty where it did not (one dtype a candidate, no fp32 copy, a GPU, a
    # quantized model, an eager job)
    weights_ms: dict[str, float] = field(default_factory=dict)
    # engine.huge_pages' decision for this machine ("place", "how", "pass_ms" where measured) and "mib",
    # the MiB of the model's tensors it placed; empty before one was made
    huge_pages: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)

    def log_line(self) -> str:
        """One line: what was picked and the alternatives measured."""
        picked = f"{self.dtype}/{self.layout}" if self.layout not in ("int8", "int4") else self.layout
        alts = ", ".join(f"{k} {v:.2f}" for k, v in sorted(self.step_ms.items(), key=lambda kv: kv[1]))
        kernels = (
            f"; kernels {', '.join(f'{s}: {k}' for s, k in self.kernels.items())}" if self.kernels else ""
        )
        # a quantized model's candidates are its layers' kernels (a float model's kernels: its rows rule)
        unit = "ms per layer call" if self.layout.split(",")[0] in ("int8", "int4") else "ms per decode step"
        timed = f" ({unit} at batch {self.batch_size}: {alts})" if alts else ""
        reads = sorted(self.weights_ms.items(), key=lambda kv: kv[1])
        weights = (
            f"; its dtype by a pass over the weights (ms: {', '.join(f'{k} {v:.2f}' for k, v in reads)})"
        )
        return f"decoding with {picked}, {self.how}{timed}{kernels}{weights if reads else ''}{self._pages()}"

    def _pages(self) -> str:
        """Where the weights are: "; 325 MiB of weights in huge pages (...)", or nothing where the machine
        has none or no tensor was big enough for one."""
        pages = self.huge_pages
        if pages.get("how") in (None, "off") or (pages.get("place") and not pages.get("mib")):
            return ""
        ms = pages.get("pass_ms") or {}
        timed = (
            f" ({pages['how']}: a pass {ms['huge pages']:.2f} ms in them, {ms['4 KiB pages']:.2f} in 4 KiB pages)"
            if ms
            else f" ({pages['how']})"
        )
        if pages.get("place"):
            return f"; {pages.get('mib', 0):g} MiB of weights in huge pages{timed}"
        return f"; weights in 4 KiB pages{timed}"
