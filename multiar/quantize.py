"""Weight-only int8 quantization for sampling: a quarter of fp32's bytes per token, which is what batch-1
decode on a CPU is bound by.

Every Linear's weight becomes int8 with one fp32 scale per output channel (round(w / scale), scale =
max|w| / 127 per row). Activations stay as they are, except that on CPUs the int8 mat-mul runs through
`torch._weight_int8pack_mm` with bf16 activations: that kernel is fast with bf16 and several times slower
with fp32 (measured in benchmarks/). The quantized weights can be stored in a run folder
(`model.int8.safetensors`) with a hash of the weights they came from, so later loads skip the
conversion; a stale file is ignored with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor

from multiar.domain import write_new_file
from multiar.precision import cpu_flags

log = logging.getLogger("multiar")

MODES = ("int8",)
INT8_FILE = "model.int8.safetensors"


class Int8Linear(nn.Module):
    """y = x @ (q * scale).T with q int8 (out, in) and scale (out,): weight-only int8, no bias."""

    def __init__(self, in_features: int, out_features: int, bf16_activations: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features, dtype=torch.float32))
        self.bf16_activations = bf16_activations

    @classmethod
    def from_linear(cls, linear: nn.Linear, bf16_activations: bool) -> Int8Linear:
        if linear.bias is not None:
            raise ValueError("Int8Linear holds no bias; multiar's model has none")
        w = linear.weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (out,)
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        module = cls(linear.in_features, linear.out_features, bf16_activations)
        module.weight.copy_(q)
        module.scales.copy_(scales)
        return module.to(linear.weight.device)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (N, in)
        if x2.device.type == "cpu":
            act = torch.bfloat16 if self.bf16_activations else x.dtype
            y = torch._weight_int8pack_mm(x2.to(act), self.weight, self.scales.to(act))
        else:  # no int8 kernel assumed: dequantize on the fly (still a quarter of the bytes to keep)
            y = F.linear(x2, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)


PACK_ROWS = 8  # the row count oneDNN packs for; measured as fast as a 1-row packing for one row
# oneDNN costs ~20-30 us a call whatever the size: an fp32 weight under 512 KiB is faster through
# nn.Linear (benchmarks/README.md); bf16 through oneDNN is faster at every size measured
PACK_MIN_FP32_ELEMENTS = 1 << 17


class PackedLinear(nn.Module):
    """y = x @ w.T with w held in oneDNN's blocked layout (packed once, for up to 8 rows): the mat-vec of
    batch-1 decode streams it at ~2x nn.Linear's speed on CPU, and a few rows at once (batch 8, a
    speculative verify pass of k + 1 tokens) cost little more than one (benchmarks/README.md). fp32 or
    bf16, as the Linear was. For sampling only: the packed weight is no buffer and not in state_dict."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if linear.bias is not None:
            raise ValueError("PackedLinear holds no bias; multiar's model has none")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), PACK_ROWS)

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")


def decode_layout(model: nn.Module) -> nn.Module:
    """model (in place) with its Linears as PackedLinears where that is faster (bf16, and fp32 weights
    of 512 KiB or more): sampling at full speed on CPU. GPUs gain nothing from it, and a CPU without
    oneDNN keeps nn.Linear."""
    weight = next(model.parameters())
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return model
    if weight.dtype not in (torch.float32, torch.bfloat16):
        return model

    def pack(linear: nn.Linear) -> nn.Module:
        big = linear.weight.numel() >= PACK_MIN_FP32_ELEMENTS
        return PackedLinear(linear) if big or linear.weight.dtype == torch.bfloat16 else linear

    return _replace_linears(model, pack)


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def quantize(model: nn.Module, mode: str = "int8", bf16_activations: bool | None = None) -> nn.Module:
    """Replace every nn.Linear of model (in place) by its weight-only quantized form; returns model,
    ready to generate. The tied embedding keeps its fp32 table for look-ups; lm_head gets its own int8
    copy."""
    if mode not in MODES:
        raise ValueError(f"quantize: unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    bf16 = cpu_has_bf16() if bf16_activations is None else bf16_activations
    return _replace_linears(model, lambda linear: Int8Linear.from_linear(linear, bf16))


def _replace_linears(model: nn.Module, make) -> nn.Module:  # noqa: ANN001
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, make(child))
    return model.eval()


def weights_digest(path: Path) -> str:
    """sha256 of a weights file: what a stored quantized copy says it came from."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_quantized(model: nn.Module, run_dir: Path, source: Path, overwrite: bool = True) -> Path:
    """Write the quantized buffers to run_dir/model.int8.safetensors with the source weights' hash."""
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k.endswith(("weight", "scales"))}
    state = {
        k: v for k, v in state.items() if not k.startswith("wte.")
    }  # the embedding is in model.safetensors
    meta = {"mode": "int8", "source_sha256": weights_digest(source)}
    return write_new_file(
        run_dir / INT8_FILE, lambda tmp: save_file(state, str(tmp), metadata=meta), overwrite=overwrite
    )


def load_quantized(model: nn.Module, run_dir: Path, source: Path) -> nn.Module | None:
    """model (fp32 weights loaded) quantized from run_dir/model.int8.safetensors when that file matches
    source; None when there is none or it is stale (warned), so the caller converts instead."""
    path = run_dir / INT8_FILE
    if not path.exists():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("source_sha256") != weights_digest(source):
        log.warning("%s: made from other weights than %s; ignored, converting again", path, source.name)
        return None
    if meta.get("mode") not in MODES:
        raise ValueError(f"{path}: unknown quantization mode {meta.get('mode')!r}")
    bf16 = cpu_has_bf16()
    device = next(model.parameters()).device
    # empty int8 modules, filled from the file: no conversion at load time
    _replace_linears(model, lambda lin: Int8Linear(lin.in_features, lin.out_features, bf16).to(device))
    state = load_file(str(path), device=str(device))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("wte.") for k in missing):
        raise ValueError(f"{path}: does not match this model ({json.dumps((missing, unexpected))[:200]})")
    return model
