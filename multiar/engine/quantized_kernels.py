"""Each layer shape of a quantized model on its fastest kernel: its own (int8, int4), its weight
dequantized once to bf16 (`DequantizedLinear`), or at a decode step's few rows engine.cpu_matvec's
int8 or int4 operator (`MatvecLinear`), measured per shape at the batch size asked, and checked
on the whole model where the picks mix in bf16 copies (`choose_kernels`, called by
`engine.layout.prepare_for_decoding`). No Lightning, Hydra or domain code here.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from multiar.engine import cpu_matvec
from multiar.engine.choice_cache import cache_key, read_cache, write_cache
from multiar.engine.decode_choice import DecodeChoice, Timer
from multiar.engine.packed import PackedLinear, packs
from multiar.engine.quantize import Int4Linear, Int8Linear, kernel_name, quantized_mode
from multiar.engine.quantized_prefill import has_operator, is_prefill_key, operator_matvec


class DequantizedLinear(nn.Module):
    """A quantized layer's weight dequantized once to bf16 (packed where oneDNN packs bf16, `packs`):
    for shapes whose int8/int4 kernel is slower than a bf16 mat-vec. For sampling only."""

    def __init__(self, layer: Int8Linear | Int4Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        linear = nn.Linear(layer.in_features, layer.out_features, bias=False, device=layer.weight.device)
        linear.weight.data = dequantized_weight(layer).to(torch.bfloat16)
        cpu = linear.weight.device.type == "cpu"
        self.linear = PackedLinear(linear) if cpu and packs(torch.bfloat16) else linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.to(torch.bfloat16)).to(x.dtype)


MATVEC_ROWS = 2  # calls of up to this many rows run the operator: it reads the codes once for all rows


class MatvecLinear(nn.Module):
    """A quantized layer whose calls of up to MATVEC_ROWS rows run its engine.cpu_matvec operator
    (operator_matvec: the codes against fp32 activations or, where the build rounds them, int16 ones on a
    per-row scale (int8: AVX512-VNNI, or AVX2 without AVX-512; int4: AVX2), int8 scaled after the sum,
    int4 per group), and longer calls (a prompt's prefill) the layer's own (itself the operator below
    its dense count where engine.quantized_prefill's rule says "matvec"). The 85M model's 49 int8
    mat-vecs took 1.50 ms through it against `_weight_int8pack_mm`'s 2.72-2.76 (a /tmp probe on the Zen 5
    EPYC, session 31), and the 85M eager int8 job ran 245 tok/s against 181 on the int8 kernel in one run
    (benchmarks/README.md); its 49 int4 mat-vecs took 2.9 ms against `_weight_int4pack_mm_for_cpu`'s 6.6
    (a /tmp probe on the Zen 3 EPYC, session 38). Without the operator (a resumed run's pick on a machine
    with no C++ compiler) every call is the layer's own."""

    def __init__(self, layer: Int8Linear | Int4Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.layer = layer
        self.on_operator = has_operator(layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # (N, in)
        if not self.on_operator or rows.size(0) > MATVEC_ROWS:
            return self.layer(x)
        y = operator_matvec(self.layer, rows)  # (N, out) fp32
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def matvec_kernel(layer: nn.Module, batch_size: int) -> bool:
    """Whether MatvecLinear is a candidate for this layer at this batch size (one row a step)."""
    return isinstance(layer, Int8Linear | Int4Linear) and batch_size <= MATVEC_ROWS and has_operator(layer)


def dequantized_weight(layer: Int8Linear | Int4Linear) -> torch.Tensor:
    """The (out, in) fp32 weight a quantized layer stands for."""
    if isinstance(layer, Int4Linear):
        return layer.dequantized()
    return layer.weight.float() * layer.scales.float()[:, None]


def own_kernels(layers: list[nn.Module]) -> dict[str, str]:
    """Each quantized layer shape on its own kernel (a compiled graph of quantize's kernels)."""
    return {f"{kernel_name(m)} {m.out_features}x{m.in_features}": kernel_name(m) for m in layers}


def layer_seconds(layers: dict[str, nn.Module], batch_size: int, rounds: int = 5) -> dict[str, float]:
    """Seconds per call of each layer on (batch_size, 1, in) inputs, interleaved, best round."""
    best = dict.fromkeys(layers, float("inf"))
    with torch.inference_mode():
        inputs = {n: torch.randn(batch_size, 1, m.in_features, device=_device(m)) for n, m in layers.items()}
        for r in range(rounds + 1):
            for name, layer in layers.items():
                start = time.perf_counter()
                for _ in range(4):
                    layer(inputs[name])
                if r:
                    best[name] = min(best[name], (time.perf_counter() - start) / 4)
    return best


def _device(module: nn.Module) -> torch.device:
    return next(module.buffers(), next(module.parameters(), torch.empty(0))).device


def choose_kernels(
    model: nn.Module,
    batch_size: int,
    cache_file: Path | None,
    timer: Callable = layer_seconds,
    pinned: dict[str, str] | None = None,
    model_timer: Timer | None = None,
) -> tuple[nn.Module, DecodeChoice]:
    """model (in place) with each quantized layer shape on its fastest kernel: its own (int8, int4), its
    weight dequantized once to bf16, or (one row or two a step) its mat-vec operator (measured per shape,
    or read from the cache); pinned: the
    kernels a resumed run's journal names, used as they are when they name these shapes. model_timer
    (seconds per decode step of each named model): where the per-shape picks mix in bf16 copies, the
    whole model decodes with them and with its own kernels, and the faster set is kept: a layer timed
    alone leaves out the casts between its neighbours (10.8M batch 8: int4's own kernels 2,195 tok/s,
    the per-shape picks 1,793)."""
    quantized = [m for m in model.modules() if isinstance(m, Int8Linear | Int4Linear)]
    mode = quantized_mode(quantized)
    shapes = {f"{kernel_name(m)} {m.out_features}x{m.in_features}": m for m in quantized}
    # the operator a candidate too, for these modes' layers: a pick made where it was none (int4's, before
    # its operator), or on another version of it, is measured again
    modes = sorted({kernel_name(m) for m in quantized if matvec_kernel(m, batch_size)})
    offered = f" matvec={'+'.join(modes)} {cpu_matvec.source_digest()}" if modes else ""
    key = cache_key(model, batch_size, f"quantize={mode}{offered}")
    pinned = {s: k for s, k in (pinned or {}).items() if not is_prefill_key(s)}  # the rules: not shapes
    forced = bool(pinned) and set(pinned) == set(shapes)
    entry = None if forced else read_cache(cache_file, key)  # a resume's journal decides: no cache read
    if forced:
        kernels, step_ms, how = dict(pinned), {}, "forced"
    elif entry is not None and set(entry.get("kernels", {})) == set(shapes):
        kernels, step_ms, how = entry["kernels"], entry["step_ms"], "cached"
    else:
        timed, tried = {}, {}
        for shape, layer in shapes.items():
            tried[shape] = [kernel_name(layer), "bf16"]
            timed[f"{shape} {kernel_name(layer)}"] = layer
            timed[f"{shape} bf16"] = DequantizedLinear(layer)
            if matvec_kernel(layer, batch_size):
                tried[shape].append("matvec")
                timed[f"{shape} matvec"] = MatvecLinear(layer)
        seconds = timer(timed, batch_size)
        kernels = {s: min(tried[s], key=lambda k, s=s: seconds[f"{s} {k}"]) for s in shapes}
        step_ms = {name: 1e3 * s for name, s in seconds.items()}
        own = own_kernels(quantized)
        if model_timer is not None and kernels != own:
            mixed = copy.deepcopy(model)
            _use_kernels(mixed, kernels)
            whole = model_timer({mode: model, f"{mode} per shape": mixed})
            step_ms |= {f"model {name}": 1e3 * s for name, s in whole.items()}
            if whole[mode] <= whole[f"{mode} per shape"]:
                kernels = own
        write_cache(cache_file, key, {"kernels": kernels, "step_ms": step_ms})
        how = "measured"
    _use_kernels(model, kernels)
    choice = DecodeChoice(dtype="fp32", layout=mode, how=how, batch_size=batch_size, kernels=kernels)
    choice.step_ms = step_ms
    return model, choice


def _use_kernels(model: nn.Module, kernels: dict[str, str]) -> None:
    for parent in list(model.modules()):
        if isinstance(parent, MatvecLinear | DequantizedLinear):
            continue  # a layer given its kernel before
        for name, child in list(parent.named_children()):
            if isinstance(child, Int8Linear | Int4Linear):
                shape = f"{kernel_name(child)} {child.out_features}x{child.in_features}"
                if kernels.get(shape) == "bf16":
                    setattr(parent, name, DequantizedLinear(child))
                elif kernels.get(shape) == "matvec":
                    setattr(parent, name, MatvecLinear(child))
