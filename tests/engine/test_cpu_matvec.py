"""The decode step's mat-vec operators (engine/cpu_matvec.py): built with the system's C++ compiler against
torch's headers, equal to the dense product at one to three rows and at widths with a tail, usable in
torch.compile's graphs, and absent (not fatal) without a compiler."""

from __future__ import annotations

import ast
import functools
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from multiar.engine import cpu_kernels, cpu_matvec
from multiar.engine.precision import cpu_flags


def built() -> None:
    """Skip where there is no C++ compiler (or off Linux, where OpenMP may be missing); on Linux with one
    the operators must build."""
    if cpu_kernels.compiler("CXX", "c++") is None:
        pytest.skip("no C++ compiler here: quantized layers keep their own kernels")
    if cpu_matvec.library() is None and platform.system() != "Linux":
        pytest.skip(f"the operators do not build on {platform.system()} (logged)")
    assert cpu_matvec.library() is not None, "a C++ compiler is installed, yet the operators did not build"


@functools.cache
def built_with(macro: str, flags: tuple[str, ...] = ()) -> bool:
    """Whether the library's build (-march=native with this compiler, then flags) defines macro, such as
    __AVX512VNNI__: what the C++ took, not what the CPU lists."""
    cxx = cpu_kernels.compiler("CXX", "c++")
    done = subprocess.run(
        [*cxx, "-march=native", *flags, "-dM", "-E", "-x", "c++", os.devnull],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.returncode == 0 and f"#define {macro} " in done.stdout


def int16_activations(flags: tuple[str, ...] = ()) -> bool:
    """Whether that build's int8 loop rounds the activations to int16: with AVX512-VNNI, or with AVX2 and
    FMA and no AVX-512 (vpmaddwd)."""
    if built_with("__AVX512VNNI__", flags):
        return True
    avx2 = built_with("__AVX2__", flags) and built_with("__FMA__", flags)
    return avx2 and not built_with("__AVX512F__", flags)


def int8_close(y: torch.Tensor, x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, int16: bool) -> None:
    """int8_matvec's y against the dequantized weight's product within the rounding of the activations
    (int16 on each row's scale: each term off by at most half a step) and fp32's rounding of the sums
    (scaled by the terms' sizes: an output that cancels to near 0 keeps the rounding of its terms); with
    int16 activations also against the same rounding's exact product (a loop that truncated rather than
    rounded fails this)."""
    weight = q.double() * scales.double()[:, None]
    expected = F.linear(x.double(), weight)
    sizes = F.linear(x.double().abs(), weight.abs())  # (rows, out)
    half_step = x.abs().amax(-1, keepdim=True).double() / 32767 / 2  # (rows, 1)
    bound = (half_step if int16 else 0) * weight.abs().sum(-1) + 1e-5 * sizes + 1e-6  # (rows, out)
    assert ((y.double() - expected).abs() <= bound).all()
    if int16:
        x16, step = int16_rounded(x)
        exact = F.linear(x16.double(), q.double()) * step.double() * scales.double()
        magnitude = F.linear(x16.double().abs(), q.double().abs()) * step.double() * scales.double()
        assert ((y.double() - exact).abs() <= 2e-6 * magnitude + 1e-30).all()


def int8_odd_rows(int8_matvec, q: torch.Tensor, scales: torch.Tensor, gen: torch.Generator) -> None:
    """A row of zeros gives zeros; a NaN or an infinity reaches the output as F.linear's does, among
    other values, so that a row's largest |x| is finite (the last one in the loops' tail past whole
    vectors where the width leaves one: 70, 4166); an infinity reaches the output with its sign; a row
    whose largest |x| is under 1e-30 (the fp32 loop, as a NaN's row) gives its product."""
    odd = torch.cat([torch.zeros(1, q.size(1)), torch.randn(4, q.size(1), generator=gen)])
    odd[1, 5], odd[2, 7], odd[3, -1] = float("nan"), float("inf"), float("-inf")
    odd[4] *= 1e-32
    y = int8_matvec(odd, q, scales)
    assert (y[0] == 0).all() and y[1].isnan().all()
    weight = q.double() * scales.double()[:, None]
    tiny, sizes = F.linear(odd[4:].double(), weight), F.linear(odd[4:].double().abs(), weight.abs())
    assert ((y[4:].double() - tiny).abs() <= 1e-5 * sizes).all() and (y[4] != 0).any()
    dense = F.linear(odd[2:4], q.float() * scales[:, None])
    assert torch.equal(y[2:4].isinf(), dense.isinf()) and torch.equal(y[2:4].isnan(), dense.isnan())
    assert torch.equal(y[2:4][dense.isinf()], dense[dense.isinf()])


def int16_rounded(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x's rows rounded to int16 as the VNNI loop rounds them (fp32: max|x| -> 32767, to nearest even),
    and each row's step (rows, 1)."""
    top = x.abs().amax(-1, keepdim=True)
    x16 = torch.round(x * (torch.tensor(32767.0) / top))
    return x16, top / 32767.0


@pytest.mark.parametrize("rows", [1, 2, 3])
@pytest.mark.parametrize(
    "width", [64, 96, 70, 80, 4166]
)  # whole 32-/64-wide steps, tails (16 + 0, 6), 2 int32 chunks
@pytest.mark.parametrize("out", [37, 39])  # output rows split over the threads unevenly
def test_the_operators_equal_the_dense_product(rows, width, out):
    """int8: the activations (fp32, or int16 on a per-row scale with AVX512-VNNI or AVX2) times the codes,
    scaled per output row, as int8_close checks; fp32 and bf16 weights against F.linear in fp32 of the
    same values (bf16: products summed in fp32, so within fp32 rounding of the exact sum, not bf16's)."""
    built()
    gen = torch.Generator().manual_seed(rows * 1000 + width + out)
    x = torch.randn(rows, width, generator=gen)
    q = torch.randint(-127, 128, (out, width), generator=gen, dtype=torch.int8)
    scales = torch.rand(out, generator=gen) + 0.5
    int8_close(cpu_matvec.int8_matvec(x, q, scales), x, q, scales, int16_activations())
    int8_odd_rows(cpu_matvec.int8_matvec, q, scales, gen)
    w = torch.randn(out, width, generator=gen)
    for dtype in (torch.float32, torch.bfloat16):
        xs, ws = x.to(dtype), w.to(dtype)
        y = cpu_matvec.matvec(xs, ws)
        assert y.dtype == torch.float32 and y.shape == (rows, out)
        torch.testing.assert_close(y, F.linear(xs.double(), ws.double()).float(), rtol=1e-5, atol=1e-4)


def int8_rows_together(int8_matvec, width: int, int16: bool) -> None:
    """A prompt's or a batch's rows (AVX2: in fours, then a pair, then one, the codes widened once for
    them) give each row the bits it gets alone, rows for the fp32 loop (NaN, infinity, all but zero)
    among them; and the scaled rows the product int8_close checks."""
    gen = torch.Generator().manual_seed(width)
    out = 37
    x = torch.randn(10, width, generator=gen)  # 7 on the int16 scale: a four, a pair and one
    x[2, 3], x[5, -1], x[8] = float("nan"), float("inf"), x[8] * 1e-32
    q = torch.randint(-127, 128, (out, width), generator=gen, dtype=torch.int8)
    scales = torch.rand(out, generator=gen) + 0.5
    together = int8_matvec(x, q, scales)
    alone = torch.cat([int8_matvec(x[n : n + 1], q, scales) for n in range(10)])
    assert torch.equal(together.isnan(), alone.isnan())
    assert torch.equal(together.nan_to_num(), alone.nan_to_num())
    scaled = [n for n in range(10) if n not in (2, 5, 8)]
    int8_close(together[scaled], x[scaled], q, scales, int16)


# 5: no whole 16-code step, the row all tail; 70, 80: tails past the 64-code steps; 4166: 2 int32 chunks
@pytest.mark.parametrize("width", [5, 70, 80, 4166])
def test_an_int8_row_is_the_same_beside_any_other_rows(width):
    """int8_rows_together on this CPU's build (the AVX2 loop's fours run in the older-CPU builds below
    on an AVX-512 CPU)."""
    built()
    int8_rows_together(cpu_matvec.int8_matvec, width, int16_activations())


def float_rows_together(matvec, width: int) -> None:
    """fp32 and bf16 rows against each weight row in fours, then a pair, then one (the weight loaded once
    for them): each row gets the bits it gets alone, a NaN row and an infinity among them, and the
    product is within fp32 rounding of the exact one."""
    gen = torch.Generator().manual_seed(width)
    x, w = torch.randn(7, width, generator=gen), torch.randn(37, width, generator=gen)
    x[2, 3], x[5, -1] = float("nan"), float("inf")
    for dtype in (torch.float32, torch.bfloat16):
        xs, ws = x.to(dtype), w.to(dtype)
        together = matvec(xs, ws)
        alone = torch.cat([matvec(xs[n : n + 1], ws) for n in range(7)])
        assert torch.equal(together.isnan(), alone.isnan())
        assert torch.equal(together.nan_to_num(), alone.nan_to_num())
        finite = [0, 1, 3, 4, 6]
        exact = F.linear(xs[finite].double(), ws.double())
        size = F.linear(xs[finite].double().abs(), ws.double().abs())
        assert ((together[finite].double() - exact).abs() <= 1e-6 * size + 1e-6).all()


# tails past the 32-value steps (8-wide, scalar); 100: AVX512-BF16's 32-value step after its 64s
@pytest.mark.parametrize("width", [5, 70, 80, 100, 4166])  # 5: the row all scalar tail (fused by hand)
def test_a_float_row_is_the_same_beside_any_other_rows(width):
    """float_rows_together on this CPU's build (the other loops' fours in the older-CPU builds below)."""
    built()
    float_rows_together(cpu_matvec.matvec, width)


def int4_vectors(flags: tuple[str, ...] = ()) -> bool:
    """Whether that build's int4 loop rounds the activations to int16: with AVX2 and FMA (AVX-512 CPUs
    take AVX2's int4 loop too)."""
    return built_with("__AVX2__", flags) and built_with("__FMA__", flags)


def int4_case(rows: int, groups: int, out: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """x (rows, 32 groups), codes (out, 16 groups) uint8 (every byte), scales_and_mins (out, 2, groups)
    bf16: scales positive, mins either sign."""
    x = torch.randn(rows, 32 * groups, generator=gen)
    codes = torch.randint(0, 256, (out, 16 * groups), generator=gen, dtype=torch.uint8)
    scales = torch.rand(out, groups, generator=gen) * 0.1 + 0.01
    mins = torch.randn(out, groups, generator=gen) * 0.5
    return x, codes, torch.stack([scales, mins], 1).bfloat16()


def int4_weight(codes: torch.Tensor, scales_and_mins: torch.Tensor) -> torch.Tensor:
    """The (out, in) fp64 weight the operator's inputs stand for: code * scale + min per group of 32, a
    byte's high four bits input 2j's code, its low four 2j + 1's."""
    out = codes.size(0)
    code = torch.stack([codes >> 4, codes & 15], -1).reshape(out, -1, 32).double()  # (out, groups, 32)
    scale, low = scales_and_mins.double().unbind(1)  # (out, groups) each
    return (code * scale[..., None] + low[..., None]).reshape(out, -1)


def int4_close(
    y: torch.Tensor, x: torch.Tensor, codes: torch.Tensor, scales_and_mins: torch.Tensor, int16: bool
):
    """int4_matvec's y against the product with int4_weight, within the rounding of the activations (int16
    on each row's scale: the codes' terms each off by at most half a step; the mins' term sums x as it is)
    and fp32's rounding of the sums; with int16 activations also against that rounding's exact product."""
    weight = int4_weight(codes, scales_and_mins)
    expected, sizes = F.linear(x.double(), weight), F.linear(x.double().abs(), weight.abs())
    scale, low = scales_and_mins.double().unbind(1)
    code = torch.stack([codes >> 4, codes & 15], -1).reshape(codes.size(0), -1, 32).double()
    coded = (code * scale[..., None]).reshape(codes.size(0), -1)  # (out, in): the codes' terms' weights
    half_step = x.abs().amax(-1, keepdim=True).double() / 32767 / 2
    bound = (half_step if int16 else 0) * coded.abs().sum(-1) + 1e-5 * sizes + 1e-6
    assert ((y.double() - expected).abs() <= bound).all(), (y.double() - expected).abs().max()
    if int16:
        x16, step = int16_rounded(x)
        sums = x.double().reshape(x.size(0), -1, 32).sum(-1)  # (rows, groups)
        exact = F.linear(x16.double(), coded) * step.double() + F.linear(sums, low)
        assert ((y.double() - exact).abs() <= 2e-6 * sizes + 1e-30).all(), (y.double() - exact).abs().max()


def int4_odd_rows(
    int4_matvec, codes: torch.Tensor, scales_and_mins: torch.Tensor, gen: torch.Generator
) -> None:
    """As int8_odd_rows, with the mins zeroed (else the mins' term alone would carry a NaN to every
    output): zeros give zeros, a NaN's row NaNs, infinities F.linear's infinities and NaNs (the fp32
    loop: each weight whole, so inf - inf comes only where F.linear has it), a row under 1e-30 (the fp32
    loop) its product."""
    scales_and_mins = scales_and_mins.clone()
    scales_and_mins[:, 1] = 0
    odd = torch.cat([torch.zeros(1, codes.size(1) * 2), torch.randn(4, codes.size(1) * 2, generator=gen)])
    odd[1, 5], odd[2, 7], odd[3, -1] = float("nan"), float("inf"), float("-inf")
    odd[4] *= 1e-32
    y = int4_matvec(odd, codes, scales_and_mins)
    assert (y[0] == 0).all() and y[1].isnan().all()
    weight = int4_weight(codes, scales_and_mins)
    tiny, sizes = F.linear(odd[4:].double(), weight), F.linear(odd[4:].double().abs(), weight.abs())
    assert ((y[4:].double() - tiny).abs() <= 1e-5 * sizes).all() and (y[4] != 0).any()
    dense = F.linear(odd[2:4], weight.float())
    assert torch.equal(y[2:4].isinf(), dense.isinf()) and torch.equal(y[2:4].isnan(), dense.isnan())
    assert torch.equal(y[2:4][dense.isinf()], dense[dense.isinf()]) and dense.isinf().any()


@pytest.mark.parametrize("rows", [1, 2, 5])  # 5: a prompt's few rows (engine.quantized_prefill)
@pytest.mark.parametrize("groups", [1, 8, 9, 130])  # the tail alone, one 8-group step, a step and a tail
@pytest.mark.parametrize("out", [37, 39])
def test_the_int4_operator_equals_the_product_of_its_weight(rows, groups, out):
    """int4: the activations (int16 on a per-row scale with AVX2, else fp32) times each group's codes,
    scaled, plus the mins times x's group sums, as int4_close checks; odd rows as int4_odd_rows."""
    built()
    gen = torch.Generator().manual_seed(rows * 1000 + groups + out)
    x, codes, scales_and_mins = int4_case(rows, groups, out, gen)
    y = cpu_matvec.int4_matvec(x, codes, scales_and_mins)
    assert y.dtype == torch.float32 and y.shape == (rows, out)
    int4_close(y, x, codes, scales_and_mins, int4_vectors())
    int4_odd_rows(cpu_matvec.int4_matvec, codes, scales_and_mins, gen)


def attention_case(head_size: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    """q (3, 2, hs) and keys and values as views of a cache (4, 2, 50, hs) of its first 3 rows and 40
    slots, positions (3,) of a row at the end, one at slot 0 and one between; scores spread over ~100
    below each row's largest (the exponential's range, past its floor at the larger head sizes: -100
    with AVX-512, -87 with AVX2), and NaN in every slot no row sees."""
    gen = torch.Generator().manual_seed(seed)
    cache_k, cache_v = (torch.randn(4, 2, 50, head_size, generator=gen) for _ in range(2))
    positions = torch.tensor([39, 0, 17])
    for cache in (cache_k, cache_v):
        for b, p in enumerate(positions.tolist()):
            cache[b, :, p + 1 :] = float("nan")
    q = 20 * torch.randn(3, 2, head_size, generator=gen)
    return q, cache_k.to(dtype)[:3, :, :40], cache_v.to(dtype)[:3, :, :40], positions


def attention_close(got: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions) -> None:
    """got is attend_rows's attention (computed here in float64) of the same inputs, the slots no row sees
    left out, within fp32 rounding."""
    k, v = k.double().nan_to_num(), v.double().nan_to_num()
    scores = torch.einsum("bhd,bhnd->bhn", q.double(), k) * q.size(-1) ** -0.5
    seen = torch.arange(k.size(2)) <= positions[:, None, None]
    want = torch.einsum("bhn,bhnd->bhd", scores.masked_fill(~seen, float("-inf")).softmax(-1), v)
    assert got.dtype == torch.float32 and got.shape == q.shape
    assert ((got.double() - want).abs() <= 1e-5 * want.abs() + 1e-6).all()


@pytest.mark.parametrize("head_size", [64, 48, 24, 7])  # four 16-wide sums, one, one and a tail, a tail
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_attention_operator_equals_attend_rows(head_size, dtype):
    """decode_attention is attend_rows (fp32 sums, softmax over each row's slots 0 .. its position) on a
    cache's strided views, fp32 or bf16: within fp32 rounding; the slots past a row's position are never
    read (NaN there changes nothing), and a row at slot 0 gets that slot's values."""
    built()
    q, k, v, positions = attention_case(head_size, dtype, seed=head_size)
    got = cpu_matvec.decode_attention(q, k, v, positions)
    attention_close(got, q, k, v, positions)
    assert torch.equal(got[1], v[1, :, 0].float())  # one slot: its weight is exactly 1
    # rows: query b reads row rows[b] of whole caches in place (a slot engine's); other rows never read
    rows = torch.tensor([4, 0, 2])
    whole_k, whole_v = (torch.full((5, 2, 50, head_size), float("nan"), dtype=dtype) for _ in range(2))
    whole_k[rows, :, :40], whole_v[rows, :, :40] = k, v
    assert torch.equal(cpu_matvec.decode_attention(q, whole_k, whole_v, positions, rows), got)
    with pytest.raises(RuntimeError, match="decode_attention: row 5 out of range"):
        cpu_matvec.decode_attention(q, whole_k, whole_v, positions, torch.tensor([4, 0, 5]))
    with pytest.raises(RuntimeError, match="decode_attention: position -1 is negative"):
        cpu_matvec.decode_attention(q, k, v, torch.tensor([39, -1, 17]))
    # a position past the view: the row attends to all of it, as attend_rows's mask does
    assert torch.equal(cpu_matvec.decode_attention(q, k, v, torch.tensor([99, 0, 17])), got)


OLDER_CPU = """
import sys, torch, torch.nn.functional as F
from multiar.engine import cpu_matvec
from test_cpu_matvec import attention_case, attention_close, int8_close, int8_odd_rows, int8_rows_together
from test_cpu_matvec import float_rows_together
from test_cpu_matvec import int4_case, int4_close, int4_odd_rows

def close(y, x, w):  # fp32 sums: within fp32 rounding of the sum of the terms' sizes
    exact, size = F.linear(x.double(), w.double()), F.linear(x.double().abs(), w.double().abs())
    assert ((y.double() - exact).abs() <= 1e-6 * size + 1e-6).all(), (y.double() - exact).abs().max()

int16, int4_16, flags = sys.argv[1] == "int16", sys.argv[2] == "int16", sys.argv[3:]
path = cpu_matvec.build(flags)
assert path is not None, "the build failed"
torch.ops.load_library(str(path))
gen = torch.Generator().manual_seed(0)
for rows, width, out in ((1, 70, 37), (1, 80, 37), (2, 4166, 39)):
    x = torch.randn(rows, width, generator=gen)
    q = torch.randint(-127, 128, (out, width), generator=gen, dtype=torch.int8)
    scales = torch.rand(out, generator=gen) + 0.5
    int8_close(torch.ops.multiar.int8_matvec(x, q, scales), x, q, scales, int16)
    int8_odd_rows(torch.ops.multiar.int8_matvec, q, scales, gen)
    int8_rows_together(torch.ops.multiar.int8_matvec, width, int16)
    float_rows_together(torch.ops.multiar.matvec, width)
    w = torch.randn(out, width, generator=gen)
    for dtype in (torch.float32, torch.bfloat16):
        close(torch.ops.multiar.matvec(x.to(dtype), w.to(dtype)), x.to(dtype), w.to(dtype))
for rows, groups, out in ((1, 1, 37), (2, 9, 39)):
    x, codes, scales_and_mins = int4_case(rows, groups, out, gen)
    int4_close(torch.ops.multiar.int4_matvec(x, codes, scales_and_mins), x, codes, scales_and_mins, int4_16)
    int4_odd_rows(torch.ops.multiar.int4_matvec, codes, scales_and_mins, gen)
for head_size in (64, 24, 7):  # 24: AVX2's 8-wide loops, AVX-512's 16 and a tail
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v, positions = attention_case(head_size, dtype, seed=head_size)
        attention_close(torch.ops.multiar.decode_attention(q, k, v, positions), q, k, v, positions)
print("equal")
"""


# each flag's instruction set as /proc/cpuinfo names it
CPUINFO_NAMES = {
    "-mno-avx512bf16": "avx512_bf16",
    "-mno-avx512vnni": "avx512_vnni",
    "-mno-avx512f": "avx512f",
    "-mno-avx2": "avx2",
}


@pytest.mark.parametrize(
    "flags",
    [
        [
            "-mno-avx512bf16",
            "-mno-avx512vnni",
        ],  # AVX-512 without its bf16 dot product or VNNI: bf16 by shifts
        ["-mno-avx512f"],  # no AVX-512: AVX2's loops
        ["-mno-avx512f", "-mno-avx2"],  # neither: the scalar loops
    ],
)
def test_the_operators_built_for_an_older_cpu_compute_the_same(flags, tmp_path):
    """The paths this CPU's -march=native build skips: the library built as for a CPU without AVX512-BF16
    and VNNI, without AVX-512, or without AVX2 either, loaded in a process of its own (one library per
    process registers the operators), computes the dense product."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip(f"the flags name x86's instruction sets; this CPU is {platform.machine()}")
    removed = {CPUINFO_NAMES[f] for f in flags}
    if cpu_flags() and not removed & cpu_flags():  # (a build takes ~20 s on 2 cores)
        pytest.skip(f"this CPU has none of {sorted(removed)}: its own build, tested above, is that build")
    built()
    here = os.pathsep.join(p for p in (str(Path(__file__).parent), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "MULTIAR_CACHE": str(tmp_path), "PYTHONPATH": here}
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            OLDER_CPU,
            "int16" if int16_activations(tuple(flags)) else "fp32",
            "int16" if int4_vectors(tuple(flags)) else "fp32",
            *flags,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0 and done.stdout.strip() == "equal", done.stderr[-2000:]


FP32_AHEAD = """
import torch
from multiar.engine import cpu_matvec
assert cpu_matvec.library() is not None
before = cpu_matvec.fp32_ahead()
gen = torch.Generator().manual_seed(0)
w, x = torch.randn(256, 1024, generator=gen), torch.randn(5, 1024, generator=gen)  # 1 MiB: drawn
square, x2 = torch.randn(512, 512, generator=gen), torch.randn(1, 512, generator=gen)  # another shape
small = torch.randn(255, 1024, generator=gen)  # under 1 MiB: never drawn
cpu_matvec.matvec(x[:1], small)
rows = [cpu_matvec.matvec(x[:n], w).tolist() for n in (2, 5)]  # the general loop: never drawn
after_others = cpu_matvec.fp32_ahead()
ys = [cpu_matvec.matvec(x[:1], w) for _ in range(600)]
y2 = [cpu_matvec.matvec(x2, square) for _ in range(100)]
partway = cpu_matvec.fp32_ahead()
y2 += [cpu_matvec.matvec(x2, square) for _ in range(500)]
assert all(torch.equal(y, ys[0]) for y in ys) and all(torch.equal(y, y2[0]) for y in y2), "a sum changed"
decided = cpu_matvec.fp32_ahead()
for extra in range(64):  # 62 more shapes fill the table's 64 slots; the last two find it full
    cpu_matvec.matvec(x[:1], torch.zeros(257 + extra, 1024))
full = cpu_matvec.fp32_ahead()
print(repr((before, after_others, partway, decided, ys[0].tolist(), y2[0].tolist(), rows, full)))
"""


def fp32_ahead_run(pinned: str | None) -> tuple:
    """FP32_AHEAD in a process of its own (the measures are the process's), MULTIAR_FP32_AHEAD as pinned."""
    env = {k: v for k, v in os.environ.items() if k != "MULTIAR_FP32_AHEAD"}
    if pinned is not None:
        env["MULTIAR_FP32_AHEAD"] = pinned
    done = subprocess.run(
        [sys.executable, "-c", FP32_AHEAD], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return ast.literal_eval(done.stdout.strip().splitlines()[-1])


def test_the_fp32_prefetch_hint_is_measured_per_weight_shape_and_changes_no_sum():
    """A one-row fp32 call on 1 MiB or more of weights draws with the hint or without it (other calls are
    not drawn), each weight shape in a measure of its own: after 16 untimed draws, 512 timed ones decide
    by each way's median time per byte, one shape's draws never counted for another's; every sum is the
    same either way, one row or many; MULTIAR_FP32_AHEAD=0|1 pins every shape from the first call,
    nothing drawn, and another value is ignored (measured)."""
    built()
    before, after_others, partway, decided, y, y2, rows, full = fp32_ahead_run(None)
    for early in (before, after_others):
        assert (early["hint"], early["pinned"], early["shapes"]) == ("not started", False, [])
    assert decided["timed_draws"] == 512 and decided["ahead_bytes"] == 16384
    wide, square = partway["shapes"]
    assert partway["hint"] == "measuring" and (square["shape"], square["hint"], square["draws"]) == (
        [512, 512],
        "measuring",
        100,
    )
    assert (wide["shape"], wide["draws"]) == ([256, 1024], 16 + 512) and wide["hint"] in ("on", "off")
    assert wide == decided["shapes"][0]  # decided once, kept
    for shape in decided["shapes"]:
        off, on = shape["ns_per_byte"]["off"], shape["ns_per_byte"]["on"]
        assert 0 < off < float("inf") and 0 < on < float("inf")  # both ways drawn
        assert shape["draws"] == 16 + 512 and shape["hint"] == ("on" if on < off else "off")
    hints = {shape["hint"] for shape in decided["shapes"]}
    assert decided["hint"] == (hints.pop() if len(hints) == 1 else "mixed") and not decided["pinned"]
    assert decided["untracked_calls"] == 0
    # 64 shapes at most: the further ones' calls run without the hint, counted
    assert len(full["shapes"]) == 64 and full["untracked_calls"] == 2 and full["hint"] == "measuring"
    measured = [shape for shape in full["shapes"] if shape["shape"] in ([256, 1024], [512, 512])]
    assert measured == decided["shapes"]  # kept as decided
    extra = {tuple(shape["shape"]) for shape in full["shapes"] if shape not in measured}
    assert len(extra) == 62 and extra < {(257 + i, 1024) for i in range(64)}
    for pinned, hint in (("1", "on"), ("0", "off")):
        _, others, _, final, pinned_y, pinned_y2, pinned_rows, pinned_full = fp32_ahead_run(pinned)
        assert (others["hint"], final["hint"], final["pinned"], final["shapes"]) == (
            "not started",
            hint,
            True,
            [],
        )
        assert (pinned_full["shapes"], pinned_full["untracked_calls"]) == ([], 0)
        assert (pinned_y, pinned_y2, pinned_rows) == (y, y2, rows)
    assert fp32_ahead_run("2")[3]["hint"] in ("on", "off", "mixed")  # not a pin: measured


def test_the_fp32_prefetch_report_reads_the_operators_figures():
    """cpu_matvec.fp32_ahead_report: the operator's header (pin, bytes ahead, timed draws, untracked calls)
    and six figures a shape, summed up as one hint: mixed where decided shapes differ, measuring while
    one is, the pin's where pinned; figures that are not whole shapes are an error."""
    header = [-1.0, 16384.0, 512.0, 0.0]
    on = [256.0, 1024.0, 1.0, 0.04, 0.03, 528.0]
    off = [512.0, 512.0, 0.0, 0.03, 0.04, 528.0]
    measuring = [768.0, 768.0, -1.0, 0.0, 0.0, 40.0]
    report = cpu_matvec.fp32_ahead_report
    assert report(header)["hint"] == "not started"
    assert report(header + on)["hint"] == "on" and report(header + off)["hint"] == "off"
    mixed = report(header + off + on)
    assert mixed["hint"] == "mixed" and [shape["shape"] for shape in mixed["shapes"]] == [
        [256, 1024],
        [512, 512],
    ]
    first = {"shape": [256, 1024], "hint": "on", "ns_per_byte": {"off": 0.04, "on": 0.03}, "draws": 528}
    assert mixed["shapes"][0] == first
    assert report(header + on + measuring)["hint"] == "measuring"
    pinned = report([1.0, 16384.0, 512.0, 0.0])
    assert (pinned["hint"], pinned["pinned"], pinned["shapes"]) == ("on", True, [])
    assert report([-1.0, 16384.0, 512.0, 3.0])["untracked_calls"] == 3
    with pytest.raises(ValueError, match="not 6 a shape"):
        report(header + on[:5])


def test_the_operators_check_their_inputs_and_run_in_a_compiled_graph():
    """A wrong dtype or shape is an error naming the operator (not a read past a buffer); the operators
    trace (their output's shape registered) into a torch.compile graph that computes what eager does."""
    built()
    x, q, scales = torch.randn(1, 32), torch.zeros(8, 32, dtype=torch.int8), torch.ones(8)
    with pytest.raises(RuntimeError, match="int8_matvec: x fp32"):
        cpu_matvec.int8_matvec(x.double(), q, scales)
    with pytest.raises(RuntimeError, match="int8_matvec: shapes"):
        cpu_matvec.int8_matvec(x, q, torch.ones(9))
    codes, scales_and_mins = torch.zeros(8, 16, dtype=torch.uint8), torch.ones(8, 2, 1, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="int4_matvec: x fp32, codes uint8"):
        cpu_matvec.int4_matvec(x, codes, scales_and_mins.float())
    with pytest.raises(RuntimeError, match="int4_matvec: shapes"):
        cpu_matvec.int4_matvec(x, codes, torch.ones(8, 2, 2, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="int4_matvec: shapes"):
        cpu_matvec.int4_matvec(torch.randn(1, 30), codes[:, :15], scales_and_mins)
    with pytest.raises(RuntimeError, match="matvec: x and w both"):
        cpu_matvec.matvec(x, torch.zeros(8, 32, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="matvec: x \\(rows, in\\)"):
        cpu_matvec.matvec(x, torch.zeros(8, 31))
    q, k, v, positions = attention_case(8, torch.float32, seed=0)
    with pytest.raises(RuntimeError, match="decode_attention: q fp32, keys and values both"):
        cpu_matvec.decode_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), positions)
    with pytest.raises(RuntimeError, match="decode_attention: q fp32, keys and values both"):
        cpu_matvec.decode_attention(q, k, v.bfloat16(), positions)
    with pytest.raises(RuntimeError, match="decode_attention: shapes"):
        cpu_matvec.decode_attention(q[:2], k, v, positions)
    with pytest.raises(RuntimeError, match="decode_attention: keys and values of one layout"):
        cpu_matvec.decode_attention(q, k, v.transpose(2, 3).contiguous().transpose(2, 3), positions)
    w = torch.randn(8, 32)
    q = torch.randint(-127, 128, (8, 32), dtype=torch.int8)

    def step(x: torch.Tensor) -> torch.Tensor:
        int4 = cpu_matvec.int4_matvec(x, codes, scales_and_mins)
        return torch.relu(cpu_matvec.matvec(x, w)) + cpu_matvec.int8_matvec(x, q, scales) + int4

    compiled = torch.compile(step, dynamic=False)
    torch.testing.assert_close(compiled(x), step(x))
    q, k, v, positions = attention_case(8, torch.float32, seed=1)

    def attend(q: torch.Tensor) -> torch.Tensor:
        return cpu_matvec.decode_attention(torch.tanh(q), k, v, positions) * 2

    torch.testing.assert_close(torch.compile(attend, dynamic=False)(q), attend(q))


def test_without_a_compiler_there_is_no_operator_and_no_error(monkeypatch, tmp_path, caplog):
    """No C++ compiler: library() is None, logged once; the process's loaded library is left alone."""
    monkeypatch.setenv("MULTIAR_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    with caplog.at_level(logging.INFO, logger="multiar"):
        assert cpu_matvec._load() is None
    assert "mat-vec operators: no C++ compiler" in caplog.text
    assert not (tmp_path / "kernels").exists()
