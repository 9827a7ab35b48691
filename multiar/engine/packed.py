"""Float weights packed once in oneDNN's blocked layout for sampling on a CPU (`PackedLinear`), and
`decode_layout`, which swaps a model's big Linears for them: the batch-1 mat-vec streams a packed weight at
about twice nn.Linear's speed (benchmarks/README.md)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import cache

import torch
import torch.nn as nn
from torch import Tensor

from multiar.engine.quantize import _replace_linears, private_api
from multiar.errors import first_line

log = logging.getLogger("multiar")


def _onednn_ops() -> tuple[Callable, Callable] | None:
    """(reorder, linear) of oneDNN's packed Linear, or None where either is missing."""
    instead = "sampling keeps nn.Linear (slower on CPU)"
    reorder = private_api("torch.ops.mkldnn", "_reorder_linear_weight", instead)
    linear = private_api("torch.ops.mkldnn", "_linear_pointwise", instead)
    return (reorder, linear) if reorder is not None and linear is not None else None


@cache
def packs(dtype: torch.dtype) -> bool:
    """Whether oneDNN packs weights of this dtype on this CPU: its ops are there, and (bf16) the CPU has
    the instructions its bf16 path needs: oneDNN refuses bf16 without AVX512-BW/VL/DQ or AVX-NE-CONVERT
    (an AVX2-only CPU). Asked of the op that raises, with a tiny pack, rather than of a private flag that
    could disagree with it (`torch.ops.mkldnn._is_mkldnn_bf16_supported`: the tests compare the two)."""
    ops = _onednn_ops() if torch.backends.mkldnn.is_available() else None
    if ops is None:
        return False
    try:
        ops[0](torch.zeros(PACK_ROWS, 16, dtype=dtype), PACK_ROWS)
    except RuntimeError as err:
        log.warning(
            "oneDNN cannot pack %s weights on this CPU (%s): they stay nn.Linear", dtype, first_line(err)
        )
        return False
    return True


PACK_ROWS = 8  # the row count oneDNN packs for; measured as fast as a 1-row packing for one row


# oneDNN costs ~20-30 us a call whatever the size: an fp32 weight under 512 KiB is faster through
# nn.Linear (benchmarks/README.md); bf16 through oneDNN is faster at every size measured
PACK_MIN_FP32_ELEMENTS = 1 << 17


class PackedLinear(nn.Module):
    """y = x @ w.T with w held in oneDNN's blocked layout (packed once, for up to 8 rows): the mat-vec of
    batch-1 decode streams it at ~2x nn.Linear's speed on CPU, and a few rows at once (batch 8, a
    speculative verify pass of k + 1 tokens) cost little more than one (benchmarks/README.md). fp32 or
    bf16, as the Linear was. For sampling only: the packed weight is no buffer and not in state_dict.
    Made only where oneDNN packs the weight's dtype (`packs`: decode_layout and the layout chooser ask)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if linear.bias is not None:
            raise ValueError("PackedLinear holds no bias; multiar's model has none")
        ops = _onednn_ops()
        if ops is None:
            raise RuntimeError("PackedLinear: this PyTorch lacks oneDNN's packed Linear ops")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = ops[0](linear.weight.detach(), PACK_ROWS)
        self.kernel = ops[1]

    def forward(self, x: Tensor) -> Tensor:
        return self.kernel(x, self.packed, None, "none", [], "")


def decode_layout(model: nn.Module) -> nn.Module:
    """model (in place) with its Linears as PackedLinears where that is faster (bf16, and fp32 weights
    of 512 KiB or more): sampling at full speed on CPU. GPUs gain nothing from it, and a CPU without
    oneDNN (or a PyTorch without its packed-Linear ops) keeps nn.Linear."""
    weight = next(model.parameters())
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return model
    if weight.dtype not in (torch.float32, torch.bfloat16) or not packs(weight.dtype):
        return model

    def pack(linear: nn.Linear) -> nn.Module:
        big = linear.weight.numel() >= PACK_MIN_FP32_ELEMENTS
        return PackedLinear(linear) if big or linear.weight.dtype == torch.bfloat16 else linear

    return _replace_linears(model, pack)
