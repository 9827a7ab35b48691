"""Weight-only quantization for sampling: int8 (a quarter of fp32's bytes per token) or group-wise int4
(an eighth), since batch-1 decode on a CPU is bound by the bytes of weights it reads.

int8: every Linear's weight becomes int8 with one fp32 scale per output channel (round(w / scale),
scale = max|w| / 127 per row); on CPUs the mat-mul runs through `torch._weight_int8pack_mm` with bf16
activations: that kernel is fast with bf16 and several times slower with fp32 (benchmarks/).
int4: 4-bit codes with a scale and zero point per 32 input channels (`Int4Linear`), through
`torch._weight_int4pack_mm_for_cpu`. The quantized weights can be stored in a run folder
(`model.int8.safetensors`, `model.int4.safetensors`) with a hash of the weights they came from, so later
loads skip the conversion; a stale file is ignored with a warning.

These kernels (and oneDNN's packed Linear) are private PyTorch APIs that some versions `torch>=2.4` admits
lack: each is looked up once (`private_api`), and where one is missing the layer takes a public path
(dequantize per call through F.linear; nn.Linear for the decode layout) with one warning line.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor

from multiar.engine.precision import cpu_flags
from multiar.files import write_new_file

log = logging.getLogger("multiar")

MODES = ("int8", "int4")
INT4_GROUP = 32  # input channels sharing one int4 scale and zero point


def quantized_file(mode: str) -> str:
    """The file a run stores its `mode` weights in: model.int8.safetensors, model.int4.safetensors."""
    return f"model.{mode}.safetensors"


INT8_FILE = quantized_file("int8")


@cache
def private_api(owner: str, name: str, instead: str) -> Callable | None:
    """The private PyTorch function `owner.name` (owner: "torch" or "torch.ops.mkldnn") when this PyTorch
    has it, else None with one warning line naming it and the public path taken `instead`."""
    found = getattr(torch.ops.mkldnn if owner == "torch.ops.mkldnn" else torch, name, None)
    if found is None:
        log.warning("%s.%s is missing in torch %s: %s", owner, name, torch.__version__, instead)
    return found


def _int8_kernel() -> Callable | None:
    return private_api("torch", "_weight_int8pack_mm", "int8 layers dequantize per call (slower)")


def _int4_kernels() -> tuple[Callable, Callable] | None:
    """(convert, mat-mul) of the int4 CPU kernel, or None where either is missing."""
    instead = "int4 layers dequantize per call (slower)"
    convert = private_api("torch", "_convert_weight_to_int4pack_for_cpu", instead)
    mm = private_api("torch", "_weight_int4pack_mm_for_cpu", instead)
    return (convert, mm) if convert is not None and mm is not None else None


class Int8Linear(nn.Module):
    """y = x @ (q * scale).T with q int8 (out, in) and scale (out,): weight-only int8, no bias."""

    def __init__(self, in_features: int, out_features: int, bf16_activations: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features, dtype=torch.float32))
        self.bf16_activations = bf16_activations
        self.kernel = _int8_kernel()  # looked up here, not per call: compiled code calls it directly
        # calls of at least this many rows dequantize the weight for one dense GEMM (0: never), as
        # engine.quantized_prefill measures it: the kernel's time grows with the rows, a GEMM's hardly
        self.dense_from = 0
        # engine.cpu_matvec's operator for this layer's calls below dense_from, in place of the kernel,
        # where engine.quantized_prefill measured it faster (None: the kernel)
        self.operator: Callable | None = None

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

    def _scales_as(self, dtype: torch.dtype) -> Tensor:
        """The scales in dtype, cast once (again only after the buffer changed: a load, a .to)."""
        if torch.compiler.is_compiling():  # the graph folds the cast in
            return self.scales.to(dtype)
        stamp = (dtype, self.scales.data_ptr(), self.scales._version)
        if getattr(self, "_cast_stamp", None) != stamp:
            self._cast_scales, self._cast_stamp = self.scales.to(dtype), stamp
        return self._cast_scales

    def operator_inputs(self) -> tuple[Tensor, Tensor]:
        """What engine.cpu_matvec's int8 operator reads beside the activations: the codes, the scales."""
        return self.weight, self.scales

    def on_kernel(self) -> bool:
        """Whether calls run the int8 kernel: it is there and the weights are on a CPU."""
        return self.kernel is not None and self.weight.device.type == "cpu"

    def activation_dtype(self, x_dtype: torch.dtype = torch.float32) -> torch.dtype:
        """The dtype calls multiply in: bf16 on the kernel with bf16 activations, else the input's."""
        return torch.bfloat16 if self.on_kernel() and self.bf16_activations else x_dtype

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (N, in)
        on_kernel = self.on_kernel()
        act = torch.bfloat16 if on_kernel and self.bf16_activations else x.dtype  # activation_dtype's
        # a compiled graph keeps the kernel, and is asked first: no guard on its (symbolic) row count
        many = not torch.compiler.is_compiling() and 0 < self.dense_from <= x2.size(0)
        if on_kernel and not many and self.operator is not None and not torch.compiler.is_compiling():
            y = self.operator(x2.float(), *self.operator_inputs())  # (N, out) fp32
        elif on_kernel and not many:
            y = self.kernel(x2.to(act), self.weight, self._scales_as(act))
        elif on_kernel:  # rows enough to repay dequantizing the weight for one dense GEMM
            y = F.linear(x2.to(act), self.weight.to(act)).float().mul_(self.scales)  # scaled in fp32
        else:  # no int8 kernel: dequantize on the fly (still a quarter of the bytes to keep)
            y = F.linear(x2, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)


class Int4Linear(nn.Module):
    """y = x @ dequant(q).T with q 4-bit (out, in), one scale and zero point per INT4_GROUP input channels
    of each output row (asymmetric, w = q * scale + min): an eighth of fp32's bytes. The buffers hold two
    values a byte (portable, what model.int4.safetensors stores); on a CPU they are repacked once for
    `torch._weight_int4pack_mm_for_cpu` (bf16 activations), elsewhere (or without that kernel)
    dequantized per call. `scales_and_mins` (out, 2, in / group) bf16, each row's scales then its mins
    (the weight at code 0), is what engine.cpu_matvec's int4 operator reads beside the codes
    (operator_inputs; built by pack(), not stored)."""

    def __init__(self, in_features: int, out_features: int, group_size: int = INT4_GROUP) -> None:
        super().__init__()
        if in_features % group_size:
            raise ValueError(
                f"int4: in_features={in_features} is not a multiple of the group size {group_size}"
            )
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales_and_zeros", torch.zeros(in_features // group_size, out_features, 2))
        groups = in_features // group_size
        self.register_buffer(
            "scales_and_mins", torch.zeros(out_features, 2, groups, dtype=torch.bfloat16), persistent=False
        )
        self.packed: Tensor | None = None  # the CPU kernel's layout, built from the buffers by pack()
        self.bf16_scales_and_zeros: Tensor | None = None
        self.kernel: Callable | None = None  # the CPU kernel's mat-mul, with packed
        self.dense_from = 0  # as Int8Linear's: calls of this many rows dequantize (0: never)
        self.operator: Callable | None = None  # as Int8Linear's

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = INT4_GROUP) -> Int4Linear:
        if linear.bias is not None:
            raise ValueError("Int4Linear holds no bias; multiar's model has none")
        w = linear.weight.detach().float()
        out, inp = w.shape
        module = cls(inp, out, group_size)
        groups = w.reshape(out, inp // group_size, group_size)
        low, high = groups.amin(-1), groups.amax(-1)  # (out, in / group)
        scale = ((high - low) / 15).clamp(min=1e-8)
        q = ((groups - low[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.uint8)
        q = q.reshape(out, inp)
        module.weight.copy_((q[:, 0::2] << 4) | q[:, 1::2])
        # the kernel's convention: w = (q - 8) * scale + zero, so zero = low + 8 * scale
        module.scales_and_zeros.copy_(torch.stack([scale, low + 8 * scale], dim=-1).transpose(0, 1))
        return module.to(linear.weight.device).pack()

    def codes(self) -> Tensor:
        """The 4-bit values, (out, in) int32 in [0, 15]."""
        return torch.stack([self.weight >> 4, self.weight & 15], dim=-1).flatten(-2).to(torch.int32)

    def dequantized(self) -> Tensor:
        """The weight these codes stand for, (out, in) fp32."""
        scale, zero = self.scales_and_zeros.float().unbind(-1)  # (in / group, out) each
        q = self.codes().float().reshape(self.out_features, -1, self.group_size) - 8
        return (q * scale.t()[..., None] + zero.t()[..., None]).reshape(self.out_features, self.in_features)

    def bf16_dequantized(self) -> Tensor:
        """The weight dequantized in bf16 (out, in) from the codes and the kernel's bf16 scales and zeros,
        in place on one buffer (a call of many rows: engine.quantized_prefill)."""
        sz = self.bf16_scales_and_zeros  # (in / group, out, 2); pack() made it, else cast here
        sz = self.scales_and_zeros.to(torch.bfloat16) if sz is None else sz
        scale, zero = sz[..., 0].t().unsqueeze(-1), sz[..., 1].t().unsqueeze(-1)  # (out, in / group, 1)
        q = torch.stack((self.weight >> 4, self.weight & 15), -1).view(self.out_features, -1, self.group_size)
        w = q.to(torch.bfloat16).sub_(8).mul_(scale).add_(zero)  # (out, in / group, group)
        return w.view(self.out_features, self.in_features)

    def operator_inputs(self) -> tuple[Tensor, Tensor]:
        """What engine.cpu_matvec's int4 operator reads beside the activations: the codes, scales_and_mins."""
        return self.weight, self.scales_and_mins

    def on_kernel(self) -> bool:
        """Whether calls run the int4 kernel (pack() found it, on a CPU)."""
        return self.kernel is not None and self.weight.device.type == "cpu"

    def activation_dtype(self, x_dtype: torch.dtype = torch.float32) -> torch.dtype:
        """The dtype calls multiply in: bf16 on the kernel, else the input's."""
        return torch.bfloat16 if self.on_kernel() else x_dtype

    def pack(self) -> Int4Linear:
        """Build the CPU kernel's layout and scales_and_mins from the buffers (after from_linear or a
        load)."""
        scale, zero = self.scales_and_zeros.float().unbind(-1)  # (in / group, out) each
        self.scales_and_mins.copy_(torch.stack([scale, zero - 8 * scale]).permute(2, 0, 1))
        if self.weight.device.type == "cpu" and (kernels := _int4_kernels()) is not None:
            self.packed = kernels[0](self.codes(), 1)
            self.bf16_scales_and_zeros = self.scales_and_zeros.to(torch.bfloat16)
            self.kernel = kernels[1]
        return self

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (N, in)
        on_kernel = self.on_kernel()  # pack() found the kernels
        many = not torch.compiler.is_compiling() and 0 < self.dense_from <= x2.size(0)  # as Int8Linear's
        if on_kernel and not many and self.operator is not None and not torch.compiler.is_compiling():
            y = self.operator(x2.float(), *self.operator_inputs())  # (N, out) fp32
        elif on_kernel and not many:
            y = self.kernel(x2.to(torch.bfloat16), self.packed, self.group_size, self.bf16_scales_and_zeros)
        elif on_kernel:  # rows enough to repay dequantizing the weight for one dense GEMM
            y = F.linear(x2.to(torch.bfloat16), self.bf16_dequantized())
        else:
            y = F.linear(x2, self.dequantized().to(x.dtype))
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)


def kernel_name(layer: nn.Module) -> str:
    """A quantized layer's mode, the name of its kernel: "int4" or "int8"."""
    return "int4" if isinstance(layer, Int4Linear) else "int8"


def quantized_mode(layers: list[nn.Module]) -> str:
    """A quantized model's mode: int4 where any layer is int4 (a shape int4 cannot take stays int8)."""
    return "int4" if any(isinstance(m, Int4Linear) for m in layers) else "int8"


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
    return _replace_linears(
        model,
        lambda lin: Int4Linear.from_linear(lin) if is_int4(mode, lin) else Int8Linear.from_linear(lin, bf16),
    )


def is_int4(mode: str, linear: nn.Module) -> bool:
    """Whether this layer is int4 in a `mode` model: int4 mode and a shape the int4 kernel takes (output
    rows in 16s, inputs in whole groups); the others (a 485-token head) are int8 in an int4 model."""
    return mode == "int4" and linear.out_features % 16 == 0 and linear.in_features % INT4_GROUP == 0


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


def save_quantized(
    model: nn.Module, run_dir: Path, source: Path, overwrite: bool = True, mode: str = "int8"
) -> Path:
    """Write the quantized buffers to run_dir/model.<mode>.safetensors with the source weights' hash."""
    keep = ("weight", "scales", "scales_and_zeros")
    # the embedding is in model.safetensors
    state = {
        k: v.contiguous()
        for k, v in model.state_dict().items()
        if k.endswith(keep) and not k.startswith("wte.")
    }
    meta = {"mode": mode, "source_sha256": weights_digest(source)}
    return write_new_file(
        run_dir / quantized_file(mode),
        lambda tmp: save_file(state, str(tmp), metadata=meta),
        overwrite=overwrite,
    )


def load_quantized(model: nn.Module, run_dir: Path, source: Path, mode: str = "int8") -> nn.Module | None:
    """model (fp32 weights loaded) quantized from run_dir/model.<mode>.safetensors when that file
    matches source; None when there is none or it is stale (warned), so the caller converts instead."""
    path = run_dir / quantized_file(mode)
    if not path.exists():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("source_sha256") != weights_digest(source):
        log.warning("%s: made from other weights than %s; ignored, converting again", path, source.name)
        return None
    if meta.get("mode") != mode:
        raise ValueError(f"{path}: holds mode {meta.get('mode')!r}, not {mode}")
    bf16 = cpu_has_bf16()
    device = next(model.parameters()).device

    # empty quantized modules (the same kind per layer as quantize makes), filled from the file
    def empty(lin: nn.Linear) -> nn.Module:
        if is_int4(mode, lin):
            return Int4Linear(lin.in_features, lin.out_features).to(device)
        return Int8Linear(lin.in_features, lin.out_features, bf16).to(device)

    _replace_linears(model, empty)
    state = load_file(str(path), device=str(device))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("wte.") for k in missing):
        raise ValueError(f"{path}: does not match this model ({json.dumps((missing, unexpected))[:200]})")
    for module in model.modules():
        if isinstance(module, Int4Linear):
            module.pack()
    return model
