"""Mat-vec operators for a decode step's few rows, and a prompt's where they beat a layer's kernel
(cpu_matvec.cpp), called through torch's dispatcher, so that AOTInductor packages and torch.compile's
graphs run them as eager code does:
- `multiar::int8_matvec(x, q, scales)`: the activations times the int8 codes, scaled per output row
  after the sum (an int8 layer: engine.quantize.Int8Linear). With AVX512-VNNI each row of x is rounded
  to int16 on its own scale (max|x| -> 32767, so at most 2^-16 of max|x| off: finer than the bf16
  activations of torch's int8 kernel for values within 2^7 of the row's largest; a row with a NaN or an
  infinity takes fp32) and 32 codes a step are multiplied and summed in int32
  (`vpdpwssd`, flushed to fp32 every 4,096 codes); with AVX2 and FMA and no AVX-512 the same int16
  rounding, 32 codes a load widened in two halves of 16 (`vpmaddwd`, then an add), a call's rows in
  fours against each row of codes (the codes widened once for the four; each row's sum as it is alone);
  elsewhere fp32 activations and fp32 sums;
- `multiar::int4_matvec(x, codes, scales_and_mins)`: the activations times int4 codes (two a byte, as
  engine.quantize.Int4Linear holds them) with a bf16 scale and min per 32 inputs: with AVX2 and FMA (an
  AVX-512 CPU too) each row of x rounded to int16 as above, each group's codes widened to int16 and
  multiplied and summed in pairs (`vpmaddwd`), the group's sum scaled in fp32, and the mins times x's
  group sums added; elsewhere fp32;
- `multiar::matvec(x, w)`: fp32 or bf16 activations and weights of one dtype, summed in fp32 (bf16:
  AVX512-BF16's pairwise dot product where the CPU has it);
- `multiar::decode_attention(q, keys, values, positions, rows=None)`: a decode step's attention (one
  query a row and head) over a KV cache's view, or with rows over whole caches read in place, fp32 or
  bf16, in fp32: each head's keys read once, then its values once (engine.rows_attention.attend_rows's
  math).
The mat-vecs read every weight once for all rows. engine.ahead_of_time's streamed package calls them for
int8 and int4 layers, and for fp32 and bf16 Linears where their loops are vectors (AVX-512's or AVX2's:
`vectorized`); engine.quantized_kernels offers the int8 and int4 ones per shape (MatvecLinear), and
engine.quantized_prefill for a call's rows below its dense count where they beat the layer's kernel.
The attention runs in every CPU decode package, in serve's captured step and as serve's `operator` rows
attention (engine.rows_attention).

Why kernels of our own: at one row the step reads every weight once, so its speed is the bytes it
streams. /tmp probes on the Zen 5 EPYC without AMX (session 31; its RAM's pace swung 2x within minutes,
so only figures taken together compare):
- the 85M model's 49 int8 mat-vecs: 1.50 ms through int8_matvec (fp32 activations) against 2.72-2.76
  through `torch._weight_int8pack_mm` (bf16 activations); over 50 MB of codes the VNNI loop read 39 GB/s
  on one core where the fp32 one read 34, and 64-72 against 56-68 on two;
- inductor's own multiply-and-sum of int8 codes loads 32 codes through a masked 512-bit load beside
  bf16 (4x slower from RAM: 50 MB of codes 3.7-4.2 ms against 0.92-1.0 in C), and in the model's fused
  step (a norm recomputed in each loop, one accumulator) ran the 85M int8 step at 3.0 ms against the
  int8 kernel's 2.6;
- the 49 bf16 mat-vecs: 3.4-3.9 ms through matvec against 4.3-5.4 fused by inductor and 6.9-7.8
  through F.linear; fp32 (four rows at once) gained nothing over inductor's loop (5.5-6.1 against 5.2-5.5;
  session 34 below).
Session 32 (the same machine, /tmp probes): the loops ask for weights ahead of where they read
(`_mm_prefetch`, 16 KB ahead in int8 codes, 16 rows ahead in float weights): many weights of each of
85M's layer shapes, beyond the L3, read 53-99 GB/s of int8 codes against 40-57 without, and 54-74 of
bf16 against 40-53 (a layer's 768-wide rows are too short for the hardware's prefetchers to reach full
pace). matvec summed four weight rows at once (four chains in flight, each load of x shared): 85M's bf16
mat-vecs 4.06-4.10 ms against 4.13-4.65 one row at a time. int8 stays one row at a time, in two chains:
four rows at once read its codes 1.3-1.8x slower from RAM.
Session 34 (the same machine): in the 85M bf16 streamed package, whole 128-token jobs in turns within one
process, bf16 one row at a time in two chains and without prefetch hints took 0.85-0.94x the time a
token of four rows at once with hints 4 blocks ahead (four A/B runs; the hints alone, on or off, went
either way). A C++ probe of the 49 mat-vecs in model order agreed: one row, no hints, at the pace of a
plain read of the same bytes (78 / 51 / 50 GB/s in three runs as the RAM's pace swung), four rows
with hints 65 / 46 / 45. fp32 showed no difference in that probe, but in the 85M fp32 package (two
packages on one model's caches, steps in turns at position 150) inductor's fused loop took 6.81-7.04 ms
a step, the operator four rows at once with hints 6.65-6.90, one row in two chains 5.45-5.46 (four
chains 5.51-5.59): fp32 layers are streamed through matvec too, one row in two chains, as bf16. With
hints 16-64 KB ahead of that loop a bf16 token took 0.95-1.0x as long (three runs; 128 KB 1.06x): within
the RAM's swings, so the float loop asks for none. The int8 loop's hint went from 16 to 64 KB ahead:
0.93-0.94x the time a token in the 85M int8 package (two runs; 32 KB 0.98, 128 KB 1.0, 256 KB 1.21,
none 1.23).
Session 35 (the same machine): the bf16 loop asks for weights 8 KB ahead again. The 85M bf16 job's
tokens/s had come in two paces, round to round (benchmarks/README.md, session 35: 290-339 or 205-243).
In minutes when the loop without a hint ran at the slow one only, 128-token jobs in turns in one
process with the hint switched at run time: 3.02 ms a token 8 KB ahead against 4.72 without (0.64x;
medians of 130 rounds; 0.78x in the rounds where the hinted step too ran slow, 0.62x in the others;
2 KB 0.69x, 4 KB 0.65x, 16 KB 0.65x). Its effect when the loop runs at the fast pace unhinted was not
measured. fp32 asks for none: in its 85M package the hint took 0.965x as long a token in the slow
rounds (41) and 1.065x in the fast ones (43).
Session 33 (the same machine): inductor's fused loops for attend_rows read 85M's bf16 keys and values at
~29 GB/s in the streamed package (1.26 us a position a step), decode_attention at ~47 (0.79 us): two
packages on one model's caches, in turns, the step at position 256 4.33 against 4.46 ms, at 1,000 4.87
against 5.39 (fp32 caches: 9.09 against 9.37 at 1,000).

Session 37, a Zen 3 EPYC (AVX2 and FMA, no AVX-512; 2 vCPU): the loops had been scalar there, so the 85M int8
package ran 22 tokens/s and the float packages kept inductor's loops. With AVX2's loops (the AVX-512 ones
unchanged), 128-token jobs of the 85M compile=true packages (/tmp probes, one process per build, five jobs
each, not side by side): int8 22 -> 190 tokens/s; bf16 98 -> 101 and fp32 66 -> 74, their Linears not streamed
(the attention's AVX2 loop ran in both; its share was not measured). Then bf16 with its Linears streamed
through matvec against inductor's autotuned GEMMs (its pick before: streamed floats were inductor's loop), two
packages in one process, jobs in turns: 1.23x the tokens/s (median of 15 rounds' ratios, 1.13-1.45; the
package's own step timing 8.99 against 11.23 ms). fp32 measured its streamed GEMMs at 14.02 ms a step against
autotuned's 13.81 and kept autotuned (1.05x, 0.98-1.11, the same package on both sides).

Session 38, the same Zen 3 EPYC (/tmp probes): the 85M model's 49 int4 mat-vecs, in model order, took 2.9
ms through int4_matvec against 6.6 through torch's `_weight_int4pack_mm_for_cpu` (three runs, 60 rounds
each in turns: 18 GB/s of codes and scales against 8), and the 85M int4 compile=true package ran 223
tokens/s where it had run 109-115 on torch's kernel. At 16 rows (a prompt) the 49 int8 layers took 24 ms
through int8_matvec, 91 dequantized to fp32 for one GEMM, 789 on `_weight_int8pack_mm` with fp32
activations (this CPU has no bf16); int4 34 against its kernel's 40. Two leads measured and not taken:
- each thread reading its output rows in four runs in turns (four streams of weights, so more lines are
  on their way from RAM at once): the 49 mat-vecs of bf16 0.86x the time, int8 0.96x, int4 1.27x (two
  runs of 60 rounds in turns): it would need a count per operator, measured per machine;
- weights in 2 MB pages (the kernel's transparent huge pages, asked for with madvise): one 50 MB int8
  weight read 1.25x as fast on two cores, but the 49 mat-vecs of 85M in one huge-page arena only
  1.04-1.17x, and `THP_MEM_ALLOC_ENABLE=1` (torch's allocator, every block of 2 MB or more) gave the 85M
  compile=true jobs no gain (int8 182 and 164 tok/s against 194 and 207 without; bf16 130 and 117 against
  134 and 132).

Session 39, the same Zen 3 EPYC (/tmp probes): the AVX2 int8 loop loads 32 codes at once and widens each
half: two loops in turns in one process over 200 MB of codes read them 1.05-1.22x as fast as 16 codes a
load on two threads (13 pairs), 1.23-1.32x on one. It runs a call's rows in fours: 85M's 49 int8 layers
at 16 rows (a prompt) took 18.6-18.7 ms against 37.8-38.2, at 8 rows 10.8-12.9 against 19.4, at 4 rows
5.6-7.2 against 9.5-10.5 (processes in turns). With that, a streamed package is a candidate up to
ahead_of_time.OPERATOR_ROWS rows: the 85M int8 compile=true package at batch 8 stepped in 10.8 ms
streamed against 327 autotuned (torch's int8 kernel with fp32 activations), 24 -> 527 tokens/s; bf16
and fp32 at batch 8 kept autotuned (23.7 and 22.6 ms against streamed 31.2 and 31.0), int4 took streamed
(17.9 against 20.1). Two leads measured and not taken: the weights in one huge-page arena bound into the
streamed packages (two engines of each dtype in one process, jobs in turns: 0.84-1.06x the tokens/s,
fp32, bf16 and int8 alike), and `schedule(dynamic)` / `guided` over output rows (bf16 slower, int8 no
faster); the fp32 loop asks for no weights ahead on this CPU either (0-16 KB ahead: 22.7-24.7 GB/s, none
the best).

Session 40, the same Zen 3 EPYC (/tmp probes, processes in turns): the float operator runs a call's rows
in fours against each weight row too (each row's sum the same bits as alone), bf16 rows widened to fp32
once per call rather than per weight row, and from 4 rows the weight rows in blocks of 8, so a four of
x's rows is read from L1 or L2 across them, not from farther. 85M's 49 Linears, before -> after: fp32 at
8 rows 35 -> 22 ms, at 16 rows 55 -> 32-35; bf16 at 8 rows 32 -> 15, at 16 rows 65-70 -> 27; one row
unchanged (13-16 ms fp32, 6-9 bf16: this VM's pace varied). At batch 8 the 85M bf16 streamed package
stepped in 15.8 ms against 31.2 before, and is now the pick over autotuned's 24.4; fp32 streamed 22.1
against autotuned 25.1. A float model's eager calls of a few rows take the operator too, up to a row
count measured per machine (engine.float_rows).
Session 41, the same Zen 3 EPYC: weights in huge pages after all (engine.huge_pages), each tensor in a
region of its own rather than one arena. The 85M fp32 compile=true step, the same model's two copies in
turns in one process: 1.12-1.16x the tokens/s (three processes); a copy into fresh 4 KiB pages alone
1.06x, so the pages are the gain. It is measured per machine, not assumed.
Session 42, the same Zen 3 EPYC: the int8 operator read 85M's codes at 14-21 GB/s where a sum read
26-27, and 4096x768 codes held in cache at 16.7 GB/s (bf16 32): not the RAM's pace. A profile put ~30%
of its time outside the loop, in the per-output-row call of the lambda that handles every row count.
A decode step's one row now takes a small lambda the compiler inlines (ONE_ROW in the .cpp): 85M's
one-row mat-vecs took 0.89-0.96x as long int8, 0.92-0.97x fp32. Four output rows at once (the
activations loaded once for the four) took 1.55x as long; other prefetch distances than 64 KB lost.
Each build was also measured moved by 16, 32 and 48 bytes (a padding function ahead of it), so that
a gain is not a lucky placement: the old code moved ran 0.96-1.02x. Built -falign-loops=32, bf16's
loops took 1.05-1.19x as long (not taken).
Session 43, the AMX Xeon: 85M's one-row fp32 mat-vecs took 0.89-0.91x as long with weights asked for 16
KB ahead (in turns in one process), where the Zen 5 had measured the hint a loss; the 85M fp32 package
ran 91-97 tok/s with it, 72-76 without (alternating processes). So each process measures it on its
first one-row fp32 calls and keeps the faster (fp32_ahead; MULTIAR_FP32_AHEAD=0|1 pins it). Session 44:
one measure per weight shape, so that where two models' shapes differ, a small one's weights, held in
cache, do not decide for a bigger one's in the same process.

Built on first use with the system's C++ compiler (`$CXX`, else `c++`; ~6 s) against this torch's
headers, for this CPU (-march=native), cached under `$MULTIAR_CACHE/kernels` by a digest of the source,
the compiler and its flags, torch's version and the CPU, and loaded into the process once
(`torch.ops.load_library`). Where there is no compiler or the build fails, `library()` is None (logged
once) and every layer keeps torch's kernels. No Lightning, Hydra or domain code here.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from multiar.engine.cpu_kernels import BASE_FLAGS, build_library, compiler, kernel_dir, native_target
from multiar.engine.precision import cpu_flags

log = logging.getLogger("multiar")

SOURCE = Path(__file__).with_name("cpu_matvec.cpp")
_LOADING = threading.Lock()
_LOADED: list[Path | None] = []  # what library() found, once asked


@functools.cache
def vectorized() -> bool:
    """Whether the library's float loops are vectors (built -march=native on a CPU with AVX-512F, or with
    AVX2 and FMA): elsewhere they are scalar, a sum the compiler may not reorder into vectors (no
    fast-math), slower than the multiply-and-sum inductor vectorizes."""
    flags = cpu_flags()
    return "avx512f" in flags or {"avx2", "fma"} <= flags


def library() -> Path | None:
    """The operators' library, built on first use and loaded once per process; None where it cannot be
    (logged once): any error here costs the operators, never the run."""
    if _LOADED:
        return _LOADED[0]
    with _LOADING:  # one build and one registration, whichever thread asks first
        if not _LOADED:
            try:
                _LOADED.append(_load())
            except Exception as err:  # noqa: BLE001 (an unreadable source, a full disk: own kernels run)
                log.info("mat-vec operators: %s; layers keep torch's kernels", err)
                _LOADED.append(None)
        return _LOADED[0]


def loaded() -> bool:
    """Whether this process has loaded the operators (library() asked before, and they built)."""
    return bool(_LOADED) and _LOADED[0] is not None


def _load() -> Path | None:
    path = build()
    if path is None:
        return None
    torch.ops.load_library(str(path))
    torch.library.register_fake("multiar::int8_matvec", _int8_matvec_shape)
    torch.library.register_fake("multiar::int4_matvec", _int4_matvec_shape)
    torch.library.register_fake("multiar::matvec", _matvec_shape)
    torch.library.register_fake("multiar::decode_attention", _decode_attention_shape)
    return path


def source_digest() -> str:
    """The operators' source, hashed (12 hex digits): a choice measured against them (engine.quantized_kernels,
    engine.quantized_prefill) names it in its cache key, so that a changed operator is measured again."""
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]


def build(flags: Sequence[str] = ()) -> Path | None:
    """The operators' library for this CPU and torch, with `flags` after the others (tests build it for a
    CPU without AVX512-BF16, without AVX-512 or without AVX2: `-mno-avx512bf16`, `-mno-avx512f`,
    `-mno-avx2`), built unless cached; None without a compiler or where the build fails (logged). Not
    loaded: library() loads one."""
    cxx = compiler("CXX", "c++")
    if cxx is None:
        log.info("mat-vec operators: no C++ compiler; layers keep torch's kernels")
        return None
    version = subprocess.run([*cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    torch_dir = Path(torch.__file__).parent
    extra = [
        "-std=c++17",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        f"-I{torch_dir / 'include'}",
        f"-I{torch_dir / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
        f"-L{torch_dir / 'lib'}",
        *flags,
        "-ltorch_cpu",
        "-lc10",
    ]
    parts = [SOURCE.read_text(), *cxx, version, native_target(), torch.__version__, *BASE_FLAGS, *extra]
    key = "\0".join(parts)
    path = kernel_dir() / f"cpu_matvec-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
    if not path.exists():
        error = build_library(cxx, extra, path, SOURCE)
        if error:
            log.info("mat-vec operators: the build failed (%s); layers keep torch's kernels", error)
            return None
    return path


def _int8_matvec_shape(x: Tensor, q: Tensor, scales: Tensor) -> Tensor:
    """What the operator returns, for tracing: (rows, out) fp32; its checks, so that a trace fails where
    the package would."""
    if (x.dtype, q.dtype, scales.dtype) != (torch.float32, torch.int8, torch.float32):
        raise RuntimeError("int8_matvec: x fp32, q int8, scales fp32")
    return x.new_empty(x.size(0), q.size(0))


def _int4_matvec_shape(x: Tensor, codes: Tensor, scales_and_mins: Tensor) -> Tensor:
    if (x.dtype, codes.dtype, scales_and_mins.dtype) != (torch.float32, torch.uint8, torch.bfloat16):
        raise RuntimeError("int4_matvec: x fp32, codes uint8, scales_and_mins bf16")
    return x.new_empty(x.size(0), codes.size(0))


def _matvec_shape(x: Tensor, w: Tensor) -> Tensor:
    if x.dtype != w.dtype or w.dtype not in (torch.float32, torch.bfloat16):
        raise RuntimeError("matvec: x and w both fp32 or both bf16")
    return x.new_empty(x.size(0), w.size(0), dtype=torch.float32)


def _decode_attention_shape(
    q: Tensor, keys: Tensor, values: Tensor, positions: Tensor, rows: Tensor | None = None
) -> Tensor:
    if (
        q.dtype != torch.float32
        or keys.dtype != values.dtype
        or keys.dtype not in (torch.float32, torch.bfloat16)
    ):
        raise RuntimeError("decode_attention: q fp32, keys and values both fp32 or both bf16")
    return q.new_empty(q.shape)


def int8_matvec(x: Tensor, q: Tensor, scales: Tensor) -> Tensor:
    """(rows, in) fp32 @ int8 (out, in)^T * scales (out,) -> (rows, out) fp32; library() loaded first."""
    return torch.ops.multiar.int8_matvec(x, q, scales)


def int4_matvec(x: Tensor, codes: Tensor, scales_and_mins: Tensor) -> Tensor:
    """(rows, in) fp32 times int4 codes (out, in / 2) uint8 (input 2j's code in a byte's high four bits,
    2j + 1's in its low four) with a scale and a min per 32 inputs, scales_and_mins (out, 2, in / 32) bf16
    (each row's scales, then its mins: w = code * scale + min) -> (rows, out) fp32; library() loaded
    first."""
    return torch.ops.multiar.int4_matvec(x, codes, scales_and_mins)


def matvec(x: Tensor, w: Tensor) -> Tensor:
    """(rows, in) @ (out, in)^T -> (rows, out) fp32, x and w both fp32 or both bf16; library() loaded
    first."""
    return torch.ops.multiar.matvec(x, w)


FP32_AHEAD_STATES = {-1: "measuring", 0: "off", 1: "on"}


def fp32_ahead() -> dict:
    """Where this process's measures of the fp32 weights' prefetch hint stand, one per weight shape (the
    .cpp's fp32_ahead_mode: one-row fp32 calls on 1 MiB or more of weights draw with or without it, timed;
    the faster by the median time per byte serves that shape; MULTIAR_FP32_AHEAD=0|1 pins every shape):
    fp32_ahead_report of the operator's figures; library() loaded first."""
    return fp32_ahead_report(torch.ops.multiar.fp32_ahead())


def fp32_ahead_report(figures: Sequence[float]) -> dict:
    """The operator's flat figures (the .cpp's fp32_ahead_report) as {"hint": "not started" | "measuring" |
    "off" | "on" | "mixed" (the shapes decided differently), "pinned": bool, "ahead_bytes": 16384,
    "timed_draws": 512 (a shape's), "untracked_calls": calls of shapes past the table's 64 (run without
    the hint), "shapes": [{"shape": [out, in], "hint": "measuring" | "off" | "on", "ns_per_byte": {"off":
    median, "on": median} (0 until decided), "draws": n}, ...]}."""
    pin, ahead, timed, untracked, *rest = figures
    if len(rest) % 6:
        raise ValueError(f"fp32_ahead: {len(rest)} figures after the header, not 6 a shape")
    shapes = [
        {
            "shape": [int(out), int(inputs)],
            "hint": FP32_AHEAD_STATES[int(state)],
            "ns_per_byte": {"off": off, "on": on},
            "draws": int(draws),
        }
        for out, inputs, state, off, on, draws in zip(*[iter(rest)] * 6, strict=True)
    ]
    hints = {shape["hint"] for shape in shapes}
    if pin >= 0:
        hint = FP32_AHEAD_STATES[int(pin)]
    elif not shapes:
        hint = "not started"
    elif "measuring" in hints:
        hint = "measuring"
    else:
        hint = hints.pop() if len(hints) == 1 else "mixed"
    return {
        "hint": hint,
        "pinned": pin >= 0,
        "ahead_bytes": int(ahead),
        "timed_draws": int(timed),
        "untracked_calls": int(untracked),
        "shapes": sorted(shapes, key=lambda shape: shape["shape"]),
    }


def decode_attention(
    q: Tensor, keys: Tensor, values: Tensor, positions: Tensor, rows: Tensor | None = None
) -> Tensor:
    """engine.rows_attention.attend_rows's attention in one operator, in fp32: q (d, nh, hs) fp32, keys and
    values (d, nh, n, hs) both fp32 or both bf16 (a cache's view, each position's head contiguous),
    positions (d,) (query b sees its slots 0 .. positions[b]) -> (d, nh, hs) fp32. rows (d,): query b
    reads row rows[b] of keys and values (a slot engine's whole cache, read in place: no gather).
    library() loaded first."""
    return torch.ops.multiar.decode_attention(q, keys, values, positions, rows)
