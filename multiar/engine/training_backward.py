"""The eager training step's hand-written backward passes, for a CPU: RMSNorm, SwiGLU's gate, and the
rotary split of the fused q|k|v projection.

On a CPU the eager step's time outside the matmuls is passes over the activations, each one a thread-pool
round over memory the matmuls have pushed out of cache. Autograd composes these three from small ops and
gathers split gradients with a `cat` into fresh memory; each Function here writes its input's gradient
into one buffer with fewer passes. Same formulas, so the same values as the composed ops to rounding
(tests/engine/test_model.py). A compiled step does not use them: inductor fuses the composed ops itself.
Measured on a 2-vCPU Xeon with AMX, 10.8M, paired against the composed ops in one process (benchmarks/README.md,
training): SwiGLU's gate and the rotary split make the step 2.3-3.1% faster in fp32 (five runs; the
rotary split alone 1.7-2.3%), 0.4-3.5% in bf16 (four runs); RMSNorm's fp32 backward through LayerNorm's
kernel 3.3% more in fp32 and 3.5% under bf16 autocast (40 and 20 paired rounds); its correction as one
column and q, k, v handed out apart 1.0-1.4% more in fp32 (two runs of 30 paired rounds).
Where engine/cpu_kernels.py has built its fused C kernels and measured them faster here, fp32 contiguous
inputs of RMSNorm and SwiGLU's gate go to those instead (one pass each way).
No Lightning, Hydra or domain code here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from multiar.engine import cpu_kernels


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dim, its backward hand-written: fused in C for fp32 where that was measured
    faster here (engine/cpu_kernels.py), else `_RMSNorm`."""
    if cpu_kernels.fits_rms_norm(x, weight) and cpu_kernels.chosen("rms_norm"):
        return cpu_kernels.rms_norm(x, weight, eps)
    return _RMSNorm.apply(x, weight, eps)


def swiglu_gate(gate_up: Tensor) -> Tensor:
    """silu(gate) * up of the fused projection's output (..., 2 * hidden) -> (..., hidden): fused in C
    for fp32 where that was measured faster here (engine/cpu_kernels.py), else `_SwiGLUGate`."""
    if cpu_kernels.fits_swiglu(gate_up) and cpu_kernels.chosen("swiglu_gate"):
        return cpu_kernels.swiglu_gate(gate_up)
    return _SwiGLUGate.apply(gate_up)


def rotate_split(qkv: Tensor, freqs: Tensor, n_head: int) -> tuple[Tensor, Tensor, Tensor]:
    """qkv (B, T, 3 * nh, hs) -> q, k rotated by the unit complex numbers freqs (T, 1, hs/2) in qkv's dtype
    (computed in fp32, as model.apply_rope), and v, each (B, nh, T, hs) as the attention takes them.
    Views made inside a Function: autograd refuses in-place ops on them (the attention only reads them)."""
    return _RotateSplit.apply(qkv, freqs, n_head)


class _RMSNorm(torch.autograd.Function):
    """F.rms_norm is ~6 ops forward and ~10 backward on a CPU; this takes 3 and, in fp32, LayerNorm's own
    backward kernel plus a correction (other dtypes 6 small ops: in bf16 the kernel's mixed-precision path
    is slower and its dw further from fp32's)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:  # noqa: ANN001
        # one reduction pass (a norm), then small ops on (..., 1)
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        rstd = norm.square_().div_(x.size(-1)).add_(eps).rsqrt_()
        if x.dtype == torch.float32:  # x kept in place of a normalized copy: the same bytes, one tensor fewer
            ctx.save_for_backward(x, weight, rstd)
            return (x * rstd).mul_(weight)
        xhat = x * rstd
        ctx.save_for_backward(xhat, weight, rstd)
        return xhat * weight.to(x.dtype)

    @staticmethod
    @once_differentiable  # first derivatives only: a clear error under create_graph
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:  # noqa: ANN001
        saved, weight, rstd = ctx.saved_tensors
        w = weight.to(grad.dtype)
        C = saved.size(-1)
        if saved.dtype == torch.float32:
            # LayerNorm's backward with a zero mean is RMSNorm's but for one term, rstd * mean(g w) per
            # row subtracted, added back here (one kernel and a mat-vec where the composed form takes six
            # passes: 10.8M fp32, (8, 256, 384), forward + backward 2.38 -> 1.40 ms, LayerNorm's 0.79)
            dx, dw, _ = torch.ops.aten.native_layer_norm_backward(
                grad, saved, [C], torch.zeros_like(rstd), rstd, w, None, [True, True, False]
            )
            # the term as one (..., 1) column first: an add of it runs at a copy's speed, where addcmul_
            # of two such columns does not ((8, 256, 384), 2 threads: 0.03-0.05 against 0.26 ms)
            term = (grad @ w).unsqueeze_(-1).mul_(rstd).div_(C)
            return dx.add_(term), dw.to(weight.dtype), None
        gx = grad * saved  # saved: xhat
        dw = gx.sum(tuple(range(grad.dim() - 1))).to(weight.dtype)
        dot = (gx @ w).unsqueeze_(-1).div_(-C)  # -mean(g w xhat) per row: a mat-vec
        dx = torch.addcmul(grad * w, saved, dot).mul_(rstd)
        return dx, dw, None


class _SwiGLUGate(torch.autograd.Function):
    """Autograd's backward of chunk, silu and the product: two products, silu's backward, then a cat of
    both halves' gradients into a fresh (..., 2 * hidden) tensor; this writes the halves in place."""

    @staticmethod
    def forward(ctx, gate_up: Tensor) -> Tensor:  # noqa: ANN001
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.silu(gate)
        ctx.save_for_backward(gate_up, act)  # what autograd keeps too: gate and up (one tensor), silu(gate)
        return act * up

    @staticmethod
    @once_differentiable  # first derivatives only: a clear error under create_graph
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: ANN001
        gate_up, act = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        d = torch.empty_like(gate_up)
        d_gate, d_up = d.chunk(2, dim=-1)
        torch.mul(grad, act, out=d_up)
        torch.mul(grad, up, out=d_gate)
        torch.ops.aten.silu_backward(d_gate, gate, grad_input=d_gate)  # in place: d_gate * silu'(gate)
        return d


class _RotateSplit(torch.autograd.Function):
    """Autograd's backward of the split, the complex rotation and the q/k split after it: a cat of q's and
    k's gradients, a rotated copy of that, then a cat of it and v's gradient; this rotates q's and k's
    gradients straight into their parts of one buffer (fp32; in bf16 a copy) and copies v's beside them
    (10.8M fp32, one layer's attention forward + backward 20.6 -> 19.9 ms; without the rotary 18.8)."""

    @staticmethod
    def forward(
        ctx,  # noqa: ANN001
        qkv: Tensor,
        freqs: Tensor,
        n_head: int,
    ) -> tuple[Tensor, Tensor, Tensor]:
        qk, v = qkv.split([2 * n_head, n_head], dim=2)
        pairs = _complex_pairs(qk)  # (B, T, 2 * nh, hs/2)
        rotated = torch.view_as_real(pairs * freqs).flatten(-2).to(qkv.dtype)
        ctx.save_for_backward(freqs)
        ctx.n_head = n_head
        q, k = rotated.transpose(1, 2).split(n_head, dim=1)  # (B, nh, T, hs) each
        return q, k, v.transpose(1, 2)

    @staticmethod
    @once_differentiable  # first derivatives only: a clear error under create_graph
    def backward(
        ctx,  # noqa: ANN001
        grad_q: Tensor,
        grad_k: Tensor,
        grad_v: Tensor,
    ) -> tuple[Tensor, None, None]:
        # (an unused output's gradient comes as zeros: Functions materialize them)
        (freqs,) = ctx.saved_tensors
        nh = ctx.n_head
        B, _, T, hs = grad_q.shape
        d = grad_q.new_empty(B, T, 3 * nh, hs)
        d_q, d_k, d_v = d.split(nh, dim=2)
        for grad, part in ((grad_q, d_q), (grad_k, d_k)):
            grads = _complex_pairs(grad.transpose(1, 2))  # (B, T, nh, hs/2)
            if d.dtype == torch.float32:  # the inverse rotation written in place
                torch.mul(grads, freqs.conj(), out=torch.view_as_complex(part.unflatten(-1, (-1, 2))))
            else:
                part.copy_(torch.view_as_real(grads * freqs.conj()).flatten(-2))
        d_v.copy_(grad_v.transpose(1, 2))
        return d, None, None


def _complex_pairs(x: Tensor) -> Tensor:
    """x (..., hs) as fp32 complex pairs (..., hs/2): a view where x's strides allow one (the step's
    transposed gradients do), else of a copy (e.g. a gradient expanded along its last dim, stride 0)."""
    x = x.float()
    if x.stride(-1) != 1 or x.storage_offset() % 2 or any(s % 2 for s in x.stride()[:-1]):
        x = x.clone(memory_format=torch.contiguous_format)  # a fresh copy even where x counts as contiguous
    return torch.view_as_complex(x.unflatten(-1, (-1, 2)))
