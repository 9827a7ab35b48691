"""Sampling speed: multiar's `generate` (fp32, int8, speculative) against transformers' `generate` on the
same weights, exported through `multiar export`, side by side in one process, interleaved, median of N.

    .venv/bin/python benchmarks/inference_speed.py [--repeats 5] [--new 256] [--json out.json]
        [--pair runs/big runs/small]     # speculative decoding on a trained target/draft pair
        [--llama-cpp DIR]                # + llama.cpp rows where llama-cpp-python is installed
        [--llama-server BIN]             # + llama.cpp rows through its own server (no Python binding)

Rows: every candidate `multiar.engine.layout.prepare_for_decoding` measures (fp32 and bf16, nn.Linear
and oneDNN-packed), what it picked at that batch size ("multiar auto", measured afresh here, no cache),
int8 and int4 with their kernels as `quantize` makes them and as prepare_for_decoding picks them per
layer shape at that batch size, and transformers' `generate` (the baseline). `--compile` adds the torch.compile rows:
fp32 compiled, `compile=true` (the dtype it measures, and the GEMMs it measures: the other candidates'
packages as rows of their own, `MULTIAR_COMPILE_GEMMS` pinned), `compile=true` with int8 and int4 weights,
and transformers' static-cache compile recipe; each compiled row also runs with its weights left in
4 KiB pages (", 4 KiB pages", MULTIAR_HUGE_PAGES=0: engine.huge_pages' baseline), side by side with it. `--llama-cpp DIR`: the script writes each
shape's weights as DIR/<shape>-{f32,f16,bf16}.gguf (`multiar export format=gguf`'s writer, a plain
512-token vocabulary) and times them through llama-cpp-python (temperature 1, its other samplers off);
the rows are skipped when it is not installed. With llama.cpp built from source, point it at the
libraries: LLAMA_CPP_LIB_PATH=<build>/bin.

Targets (issue 19's, at batch 1, 85M: bf16 and fp32 against llama.cpp's bf16 and f32, int4 against f32,
int8 against bf16): the two rows of each run side by side in every round, either way round (two targets
sharing a row: three in a row, the shared one in the middle), and the ratio is the median of the rounds'
ratios (`target` rows in the JSON, beside the ratio of the rows' medians). This
VM's RAM pace swings 1.5x within minutes, longer than a round of every row takes at 85M: rows a minute
apart in one round may see different machines. Each row keeps its rounds' tokens/s (`round_tok_s`).
The "multiar auto" row runs beside the candidate row of the layout it picked in every round, at every
shape and batch: its `vs_fastest_candidate` is the median of those rounds' ratios times that row's
tokens/s over the fastest candidate's (`auto_vs_fastest`; 1.0 where it picked the fastest).

Settings: 16-token prompt, 256 new tokens, sampling (temperature 1), no EOS, vocab 512, random weights
for the 10.8M (6 x 384) and 85M (12 x 768) shapes. The RAM read bandwidth of this machine is measured in
the same run: at batch 1 a decode step reads every weight once, so bytes/token x tokens/s against it is
how close a run gets to the hardware's limit.
"""

from __future__ import annotations

import argparse
import atexit
import copy
import json
import os
import random
import statistics
import subprocess
import tempfile
import time
from functools import partial
from pathlib import Path
from unittest import mock

import torch

from multiar.commands.generate import sampling_model
from multiar.engine import ahead_of_time, cpu_matvec
from multiar.engine.compile_choice import compile_pays
from multiar.engine.decode import compile_for_sampling, generate
from multiar.engine.hf_format import llama_config, to_llama_state
from multiar.engine.layout import float_candidates, prepare_for_decoding
from multiar.engine.model import GPT, ModelConfig
from multiar.engine.quantize import quantize
from multiar.engine.speculative import SpeculativeStats, speculative_generate

# every float candidate this CPU has (an AVX2-only one packs no bf16: no "bf16 packed" row there)
FLOATS = tuple(float_candidates(torch.device("cpu"), "auto", "auto"))
CANDIDATE_ROWS = tuple(c.replace("/", " ").replace("linear", "nn.Linear") for c in FLOATS)
LLAMA_TYPES = ("f32", "f16", "bf16")
# a row's weights left in 4 KiB pages (MULTIAR_HUGE_PAGES=0), beside the same engine's row in huge pages
PAGES_4K = ", 4 KiB pages"
SHAPES = {"10.8M": dict(n_layer=6, n_head=6, n_embd=384), "85M": dict(n_layer=12, n_head=12, n_embd=768)}


def ram_read_gbps() -> float:
    """Read bandwidth from RAM: sum over a 1 GiB tensor, best of 5 (beyond every cache)."""
    x = torch.ones(256 * 1024 * 1024, dtype=torch.float32)
    best = min(_timed(lambda: x.sum()) for _ in range(5))
    return x.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def linears_alone_seconds(model: torch.nn.Module, repeats: int = 20) -> float:
    """Seconds per token of the model's weight mat-vecs alone (batch 1, each Linear once, in model
    order, best of 5): the ceiling of batch-1 decode with every other op free."""
    linears = [m for m in model.modules() if hasattr(m, "in_features")]
    dtype = model.wte.weight.dtype
    xs = [torch.randn(1, 1, m.in_features, dtype=dtype) for m in linears]

    def chain() -> None:
        for m, x in zip(linears, xs, strict=True):
            m(x)

    with torch.inference_mode():
        chain()
        return min(_timed(lambda: [chain() for _ in range(repeats)]) for _ in range(5)) / repeats


def to_transformers(model: GPT):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{k: v for k, v in llama_config(model, {}).items() if k != "architectures"})
    hf = LlamaForCausalLM(config).eval()
    state = to_llama_state(model)
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    hf.load_state_dict(state)
    return hf


def plain_vocabulary(size: int):  # noqa: ANN201
    """The GGUF vocabulary of the random-weight shapes: <pad>, <bos>, <eos> and plain tokens t3..."""
    from multiar.engine.gguf_format import Vocabulary

    names = ["<pad>", "<bos>", "<eos>", *(f"t{i}" for i in range(3, size))]
    return Vocabulary(size, 1, 2, 0, names, [3, 3, 3] + [1] * (size - 3))


def llama_cpp_entries(folder: Path | None, shape: str, model: GPT, batch: int, args) -> dict:  # noqa: ANN001
    """llama.cpp rows (batch 1 only: llama-cpp-python samples one sequence): this shape's weights as
    GGUF files in folder (written each run), sampled at temperature 1 for args.new tokens; {} where
    llama-cpp-python is absent."""
    if folder is None or batch != 1:
        return {}
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import llama_cpp
    except ImportError:
        print(f"{shape:6s} llama.cpp rows skipped: llama-cpp-python is not installed")
        return {}
    from multiar.engine.gguf_format import write_gguf

    vocab = plain_vocabulary(model.config.vocab_size)
    entries = {}
    prompt = torch.randint(3, 512, (args.prompt,)).tolist()
    for kind in LLAMA_TYPES:
        path = folder / f"{shape}-{kind}.gguf"  # written afresh: these very weights
        write_gguf(model, path, kind, vocab, {"name": shape})
        llm = llama_cpp.Llama(
            str(path), n_ctx=args.prompt + args.new + 8, n_threads=torch.get_num_threads(), verbose=False
        )

        def run(llm=llm) -> None:
            llm.reset()
            for i, _ in enumerate(llm.generate(prompt, temp=1.0, top_k=0, top_p=1.0, min_p=0.0)):
                if i + 1 == args.new:
                    break

        entries[f"llama.cpp {kind}"] = run
    return entries


def llama_server_entries(
    binary: Path | None, folder: Path, shape: str, model: GPT, batch: int, args, servers: list
):  # noqa: ANN001
    """llama.cpp rows through its own server (batch 1): this shape's weights as f32/f16/bf16 GGUF files,
    one `llama-server` each (2 threads, one slot), each row one streaming-free POST /completion of
    args.new tokens at temperature 1 (its other samplers neutral, no EOS, no prompt cache), timed from
    the request to the reply like multiar's generate (a 16-token prompt's prefill included). The
    servers wait idle between requests; they are stopped at the end (servers collects them)."""
    if binary is None or batch != 1:
        return {}
    import httpx
    from serve_load import start_llama_server

    from multiar.engine.gguf_format import write_gguf

    folder.mkdir(parents=True, exist_ok=True)
    vocab = plain_vocabulary(model.config.vocab_size)
    prompt = torch.randint(3, 512, (args.prompt,)).tolist()
    entries = {}
    for kind in LLAMA_TYPES:
        path = folder / f"{shape}-{kind}-server.gguf"
        write_gguf(model, path, kind, vocab, {"name": shape})
        server = start_llama_server(binary, path, 1, folder)
        servers.append(server)
        body = {"prompt": prompt, "n_predict": args.new, "ignore_eos": True, "temperature": 1.0, "top_k": 0,
                "top_p": 1.0, "min_p": 0.0, "typical_p": 1.0, "repeat_penalty": 1.0, "cache_prompt": False,
                "seed": 0}  # fmt: skip

        def run(url=server.url, body=body) -> None:
            r = httpx.post(f"{url}/completion", json=body, timeout=600)
            r.raise_for_status()
            if r.json()["timings"]["predicted_n"] != args.new:
                raise RuntimeError(f"llama-server gave {r.json()['timings']['predicted_n']} tokens")

        entries[f"llama-server {kind}"] = run
    return entries


def stop_llama(server) -> None:  # noqa: ANN001
    server.proc.terminate()
    try:
        server.proc.wait(20)
    except subprocess.TimeoutExpired:
        server.proc.kill()


# issue 19's targets at batch 1, 85M: (what, numerator row, denominator rows (the first present), the
# line); each is timed as a pair in every round (`bench`'s groups) and its ratio taken round by round.
# (At 10.8M its target is the default's, a row derived from others: "the default >= 0.6x ..." below.)
TARGETS = (
    (
        "bf16 >= 1.0x llama.cpp bf16",
        "multiar compile=true (bf16)",
        ("llama-server bf16", "llama.cpp bf16"),
        1.0,
    ),
    ("fp32 >= 1.0x llama.cpp f32", "multiar fp32 compile", ("llama-server f32", "llama.cpp f32"), 1.0),
    ("int4 >= 2x llama.cpp f32", "multiar int4 compile=true", ("llama-server f32", "llama.cpp f32"), 2.0),
    ("int8 >= 1.6x bf16", "multiar int8 compile=true", ("multiar compile=true (bf16)",), 1.6),
)
TARGET_SHAPE = "85M"
LATER_JOBS = 3  # models whose first job loads the package built before: the median load
DEFAULT_TARGET_SHAPE = "10.8M"  # where the default (compile=auto) is held to >= 0.6x llama.cpp's best


def target_pairs(names: list[str]) -> list[tuple[str, str, str, float]]:
    """TARGETS whose rows are among names: (what, numerator, denominator, line)."""
    pairs = []
    for what, numerator, denominators, line in TARGETS:
        present = [d for d in denominators if d in names]
        if numerator in names and present:
            pairs.append((what, numerator, present[0], line))
    return pairs


def round_units(names: list[str], pairs: list[tuple[str, str]]) -> list[list[str]]:
    """names cut into the units a round runs in a row: chains of the pairs, each pair's two names side by
    side (a pair sharing a name with a chain's end joins the chain there: two pairs sharing a row make a
    chain of three, the shared row in the middle), and every other name alone. A pair whose shared name
    is inside a chain already joins it at its end, not beside its partner (TARGETS make no such pair)."""
    chains: list[list[str]] = []
    for x, y in pairs:
        if x not in names or y not in names:
            continue
        cx = next((c for c in chains if x in c), None)
        cy = next((c for c in chains if y in c), None)
        if cx is None and cy is None:
            chains.append([x, y])
        elif cx is not None and cy is not None:
            if cx is not cy:  # two chains joined end to end, x's end to y's
                if cx[0] == x:
                    cx.reverse()
                if cy[-1] == y:
                    cy.reverse()
                cx.extend(cy)
                chains.remove(cy)
        else:
            chain, old, new = (cx, x, y) if cx is not None else (cy, y, x)
            if chain[0] == old:
                chain.insert(0, new)
            else:
                chain.append(new)
    chained = {n for c in chains for n in c}
    return chains + [[n] for n in names if n not in chained]


def bench(entries: dict, repeats: int, pairs: list[tuple[str, str]] = ()) -> dict[str, list[float]]:
    """Interleaved: every entry once per round (in an order shuffled per round), its seconds in each
    round. The two entries of each of pairs run side by side (round_units' chains, either way round,
    shuffled among the rest): this VM's RAM pace swings 1.5x within minutes, longer than a round at 85M
    takes, so a ratio between two rows is taken between neighbours. Round r seeds torch's global
    generator with r before each entry: sampled lengths and acceptance are reproducible."""
    times: dict[str, list[float]] = {name: [] for name in entries}
    for fn in entries.values():  # warm-up round, not timed
        torch.manual_seed(repeats)
        fn()
    units = round_units(list(entries), list(pairs))
    for r in range(repeats):
        rng = random.Random(r)
        order = [list(u) for u in units]
        rng.shuffle(order)  # no engine always runs first, or right after another
        for unit in order:
            if rng.random() < 0.5:  # a chain either way round: its pairs stay side by side
                unit.reverse()
            for name in unit:
                torch.manual_seed(r)
                times[name].append(_timed(entries[name]))
    return times


def paired_ratios(times: dict[str, list[float]], numerator: str, denominator: str) -> list[float]:
    """numerator's tokens/s over denominator's, round by round (the same tokens: the seconds' inverse ratio)."""
    return [d / n for n, d in zip(times[numerator], times[denominator], strict=True)]


def paired_row(times: dict[str, list[float]], numerator: str, denominator: str) -> dict:
    """A pair's round ratios (paired_ratios) and their median, as a JSON row holds them."""
    ratios = paired_ratios(times, numerator, denominator)
    return {"round_ratios": ratios, "median_round_ratio": statistics.median(ratios)}


def picked_row(auto_name: str) -> str:
    """The candidate row of the layout an auto row picked: "multiar auto (bf16 packed)" -> "multiar bf16
    packed"."""
    return "multiar " + auto_name.removeprefix("multiar auto (").removesuffix(")")


def auto_vs_fastest(times: dict[str, list[float]], auto_name: str, tokens: int) -> dict:
    """The auto row against the fastest of its candidates: its round-by-round ratio to the candidate row of
    the layout it picked (the two side by side in every round: the same layout, so the ratio is the
    choice's own cost, not the RAM's pace between two minutes), times that row's tokens/s over the fastest
    candidate's (1.0 where it picked the fastest; where it did not, that factor is a ratio of medians of
    rows not side by side, and carries the RAM's pace between them). Also the plain ratio of medians,
    noisier: the two rows run at different points of the rounds, and this VM's RAM pace moved an auto row
    to 0.81x a row of the same layout (session 36, run 2)."""
    tok_s = {f"multiar {c}": tokens / statistics.median(times[f"multiar {c}"]) for c in CANDIDATE_ROWS}
    fastest = max(tok_s.values())
    rounds = paired_ratios(times, auto_name, picked_row(auto_name))
    picked_vs_fastest = tok_s[picked_row(auto_name)] / fastest
    return {
        "vs_picked_rounds": rounds,
        "picked_vs_fastest": picked_vs_fastest,
        "vs_fastest_candidate": statistics.median(rounds) * picked_vs_fastest,
        "vs_fastest_candidate_of_medians": tokens / statistics.median(times[auto_name]) / fastest,
    }


def auto_compile_row(
    shape: str,
    batch: int,
    args,  # noqa: ANN001
    first_s: float,
    eager_s: float,
    compiled_s: float,
    steps: int,
    how: str = "",
) -> dict:
    """What `multiar generate`'s default (compile=auto) decides for a job of `steps` decode steps at
    this batch, from this run's own figures, and that job's tokens/s with the compile's seconds in it:
    a step's time from the "multiar auto" row (eager) and the compile=true row, the compile's seconds
    from that model's first call here (less one call's steady time): a package built, or (how says so)
    loaded by a later job (first_s then the steady time plus the load's own cost: a later model's first
    job less its second, back to back). Derived from those measurements; `break_even_steps`: the job length above
    which compiling is the faster."""
    eager_ms, compiled_ms = 1e3 * eager_s / args.new, 1e3 * compiled_s / args.new
    compile_s = max(0.0, first_s - compiled_s)
    decision = compile_pays(steps, eager_ms, {"compiled_ms": compiled_ms, "compile_s": compile_s})
    job_s = (compile_s + steps * compiled_ms / 1e3) if decision.compile else steps * eager_ms / 1e3
    saved_ms = eager_ms - compiled_ms
    return {
        "model": shape,
        "batch": batch,
        "engine": f"multiar default (compile=auto), a job of {steps} steps{how}",
        "tok_s": steps * batch / job_s,
        "compiles": decision.compile,
        "compile_s": compile_s,
        "eager_step_ms": eager_ms,
        "compiled_step_ms": compiled_ms,
        "break_even_steps": compile_s * 1e3 / saved_ms if saved_ms > 0 else None,
        "derived": "from this run's auto and compile=true rows and the compile's seconds",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--pair", nargs=2, type=Path, default=None, help="target and draft run folders")
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES))
    parser.add_argument("--compile", action="store_true", help="add torch.compile rows (minutes to compile)")
    parser.add_argument(
        "--job-steps",
        type=int,
        default=100_000,
        help="with --compile: the job length (decode steps) the default's compile=auto row is worked out for",
    )
    parser.add_argument(
        "--short-job", type=int, default=256,
        help="with --compile: the length of a later job, its package built before, worked out the same way",
    )  # fmt: skip
    parser.add_argument("--llama-cpp", type=Path, default=None, help="folder of GGUF files (see above)")
    parser.add_argument(
        "--llama-server", type=Path, default=None, help="llama.cpp's llama-server binary: its rows at batch 1"
    )
    parser.add_argument("--batches", nargs="*", type=int, default=[1, 8])
    args = parser.parse_args()
    import transformers

    bw = ram_read_gbps()
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads; "
        f"RAM read {bw:.1f} GB/s; prompt {args.prompt}, {args.new} new tokens, sampling, median of {args.repeats}"
    )
    rows, ceilings = [], {}
    servers: list = []  # llama-server processes (--llama-server), stopped when this script ends
    gguf_dir = Path(tempfile.mkdtemp(prefix="inference_speed_gguf_"))
    atexit.register(lambda: [stop_llama(s) for s in servers])
    for shape_name in args.shapes:
        torch.manual_seed(0)
        model = GPT(ModelConfig(vocab_size=512, block_size=1024, **SHAPES[shape_name])).eval()
        # every candidate prepare_for_decoding measures, and the quantized modes' kernels
        engines = {
            f"multiar {c.replace('/', ' ').replace('linear', 'nn.Linear')}": prepare_for_decoding(
                copy.deepcopy(model), dtype=c.split("/")[0], layout=c.split("/")[1]
            )[0]
            for c in FLOATS
        }
        for mode in ("int8", "int4"):
            engines[f"multiar {mode}"] = quantize(copy.deepcopy(model), mode)
        hf = to_transformers(model)
        if args.compile:
            engines["multiar fp32 compile"] = compile_for_sampling(copy.deepcopy(model))
            with mock.patch.dict(os.environ, {"MULTIAR_HUGE_PAGES": "0"}):  # the weights in 4 KiB pages
                engines[f"multiar fp32 compile{PAGES_4K}"] = compile_for_sampling(copy.deepcopy(model))
            for mode in ("int8", "int4"):  # `compile=true quantize=...`: inductor's int8/int4 GEMMs timed too
                engines[f"multiar {mode} compile=true"] = prepare_for_decoding(
                    quantize(copy.deepcopy(model), mode), compile=True
                )[0]
            # transformers' documented recipe: a static cache and a compiled forward
            hf_compiled = to_transformers(model)
            hf_compiled.generation_config.cache_implementation = "static"
            hf_compiled.forward = torch.compile(hf_compiled.forward)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        for name in (f"multiar {c}" for c in CANDIDATE_ROWS if c.endswith("packed")):
            seconds = linears_alone_seconds(engines[name])
            ceilings[f"{shape_name} {name}"] = 1 / seconds
            print(
                f"{shape_name:6s} {name}: weight mat-vecs alone {1e3 * seconds:.2f} ms/token = {1 / seconds:.0f} tok/s ceiling"
            )
        for batch in args.batches:
            prompt = torch.randint(3, 512, (batch, args.prompt))
            gen = dict(
                do_sample=True, temperature=1.0, top_k=0, max_new_tokens=args.new, min_new_tokens=args.new
            )
            mask = torch.ones_like(prompt)
            entries = {"transformers fp32": partial(hf.generate, prompt, attention_mask=mask, **gen)}
            if args.compile:
                entries["transformers fp32 compile"] = partial(
                    hf_compiled.generate, prompt, attention_mask=mask, **gen
                )
            entries |= {name: partial(generate, m, prompt, args.new) for name, m in engines.items()}
            auto, choice = prepare_for_decoding(copy.deepcopy(model), batch_size=batch)
            print(f"{shape_name:6s} batch {batch}  auto: {choice.log_line()}", flush=True)
            picked = f"multiar auto ({choice.dtype} {choice.layout.replace('linear', 'nn.Linear')})"
            entries[picked] = partial(generate, auto, prompt, args.new)
            choices = {picked: choice}
            for mode in ("int8", "int4"):  # what `generate quantize=<mode>` picks at this batch size
                kernels, kernel_choice = prepare_for_decoding(
                    quantize(copy.deepcopy(model), mode), batch_size=batch
                )
                choices[f"multiar {mode} auto kernels"] = kernel_choice
                entries[f"multiar {mode} auto kernels"] = partial(generate, kernels, prompt, args.new)
                print(f"{shape_name:6s} batch {batch}  {mode}: {kernel_choice.log_line()}", flush=True)
            entries |= llama_cpp_entries(args.llama_cpp, shape_name, model, batch, args)
            entries |= llama_server_entries(
                args.llama_server, gguf_dir, shape_name, model, batch, args, servers
            )
            compiled_name = None
            if args.compile:  # what `generate compile=true batch_size=<batch>` runs: dtype measured at it
                compiled, compiled_choice = prepare_for_decoding(
                    copy.deepcopy(model), batch_size=batch, compile=True
                )
                compiled_name = f"multiar compile=true ({compiled_choice.dtype})"
                entries[compiled_name] = partial(generate, compiled, prompt, args.new)
                print(f"{shape_name:6s} batch {batch}  compile=true: {compiled_choice.log_line()}")
                # the baseline: the same step through torch.compile (dynamo's guards, a graph per process)
                with mock.patch.dict(os.environ, {"MULTIAR_AHEAD_OF_TIME": "0"}):
                    baseline, _ = prepare_for_decoding(copy.deepcopy(model), batch_size=batch, compile=True)
                baseline_name = f"{compiled_name}, torch.compile"
                entries[baseline_name] = partial(generate, baseline, prompt, args.new)
                with mock.patch.dict(os.environ, {"MULTIAR_HUGE_PAGES": "0"}):  # engine.huge_pages' baseline
                    small_pages, _ = prepare_for_decoding(
                        copy.deepcopy(model), batch_size=batch, compile=True, dtype=compiled_choice.dtype
                    )
                entries[f"{compiled_name}{PAGES_4K}"] = partial(generate, small_pages, prompt, args.new)
            first: dict[str, float | list[float] | None] = {}
            with torch.inference_mode():
                if compiled_name:  # first calls, timed alone: a package built, torch.compile's compile,
                    # and a later job's (a new model, as a new process would make) load of that package
                    first["built"] = _timed(entries[compiled_name])  # each GEMM candidate built and timed
                    gemms = getattr(compiled.compiled_step, "gemms", None)  # None: torch.compile ran
                    print(f"{shape_name:6s} batch {batch}  compile=true's GEMMs: {json.dumps(gemms)}")
                    others = [
                        g
                        for g in ahead_of_time.candidates(compiled, batch)
                        if g != (gemms or {}).get("gemms")
                    ]
                    for other in others if gemms else ():  # built again
                        with mock.patch.dict(os.environ, {"MULTIAR_COMPILE_GEMMS": other}):
                            pinned, _ = prepare_for_decoding(
                                copy.deepcopy(model),
                                batch_size=batch,
                                compile=True,
                                dtype=compiled_choice.dtype,
                            )
                        entries[f"{compiled_name}, {other} GEMMs"] = partial(
                            generate, pinned, prompt, args.new
                        )
                    first["torch.compile"] = _timed(entries[baseline_name])
                    # later jobs, a new model each: its first job (the load) against its second, back to
                    # back; the load's cost is the median difference over LATER_JOBS models. (One first
                    # call less the rounds' median took 0.09 s at 10.8M in one run, 0.37 s at 85M in
                    # another, where a first and a second job in turns differ by 0.00-0.02 s: the RAM's
                    # pace had changed between them.)
                    loads, overs = [], []
                    for _ in range(LATER_JOBS):
                        again, _ = prepare_for_decoding(  # the dtype pinned: measured again, it may differ
                            copy.deepcopy(model), batch_size=batch, compile=True, dtype=compiled_choice.dtype
                        )
                        loads.append(_timed(partial(generate, again, prompt, args.new)))
                        overs.append(loads[-1] - _timed(partial(generate, again, prompt, args.new)))
                        step = again.compiled_step
                        if getattr(step, "loaded", 0) != 1 or getattr(step, "fallback", None) is not None:
                            print(
                                f"{shape_name:6s} batch {batch}  the second compile=true did not load the package"
                            )
                            loads, overs = [], []
                            break
                    first["loaded"] = statistics.median(loads) if loads else None
                    first["loaded_each"] = loads
                    first["load_over_steady"] = max(0.0, statistics.median(overs)) if overs else None
                    first["load_over_steady_each"] = overs  # a negative one: the second job was the slower
                    print(f"{shape_name:6s} batch {batch}  first calls (s): {json.dumps(first)}", flush=True)
                pairs = []
                if (shape_name, batch) == (TARGET_SHAPE, 1):
                    pairs = target_pairs(list(entries))
                    for what in sorted({t[0] for t in TARGETS} - {p[0] for p in pairs}):
                        print(f"{shape_name:6s} batch {batch}  {what}: not measured, a row is missing")
                # the auto row beside the candidate row of the layout it picked (always a row), every round
                paired = [(picked, picked_row(picked))]
                # each compiled row beside its weights in 4 KiB pages (engine.huge_pages' gain, round by round)
                pages = [(n, n + PAGES_4K) for n in entries if n + PAGES_4K in entries]
                times = bench(entries, args.repeats, [(n, d) for _, n, d, _ in pairs] + paired + pages)
            seconds = {name: statistics.median(t) for name, t in times.items()}
            tokens = batch * args.new
            base = tokens / seconds["transformers fp32"]
            versus = auto_vs_fastest(times, picked, tokens)
            for name, s in seconds.items():
                tps = tokens / s
                row = {
                    "model": shape_name,
                    "batch": batch,
                    "engine": name,
                    "tok_s": tps,
                    "vs_transformers": tps / base,
                    "round_tok_s": [tokens / t for t in times[name]],
                }
                if name == picked:
                    row |= versus
                if name in choices:
                    row["choice"] = choices[name].as_dict()
                if batch == 1 and "fp32" in name and "llama" not in name:  # bytes of weights a token reads
                    row["ram_bandwidth_share"] = weight_bytes * tps / 1e9 / bw
                elif batch == 1 and "bf16" in name and "llama" not in name:
                    row["ram_bandwidth_share"] = weight_bytes / 2 * tps / 1e9 / bw
                rows.append(row)
                share = (
                    f"  {100 * row['ram_bandwidth_share']:.0f}% of RAM bandwidth"
                    if "ram_bandwidth_share" in row
                    else ""
                )
                print(
                    f"{shape_name:6s} batch {batch}  {name:26s} {tps:8.0f} tok/s  {tps / base:5.2f}x{share}",
                    flush=True,
                )
            ratio = versus["vs_fastest_candidate"]
            print(
                f"{shape_name:6s} batch {batch}  auto / its fastest candidate >= 0.9x: {ratio:.2f}x "
                f"({'met' if ratio >= 0.9 else 'NOT met'}; beside {picked_row(picked)}, round ratios "
                f"{', '.join(f'{r:.2f}' for r in versus['vs_picked_rounds'])}; that row / the fastest "
                f"{versus['picked_vs_fastest']:.2f}x; medians' ratio "
                f"{versus['vs_fastest_candidate_of_medians']:.2f}x)",
                flush=True,
            )
            for what, numerator, denominator, line in pairs:
                row = {"model": shape_name, "batch": batch, "target": what, "numerator": numerator}
                row |= {"denominator": denominator, "line": line} | paired_row(times, numerator, denominator)
                row["ratio_of_medians"] = seconds[denominator] / seconds[numerator]
                ratios = row["round_ratios"]
                rows.append(row)
                met = "met" if row["median_round_ratio"] >= line else "NOT met"
                print(
                    f"{shape_name:6s} batch {batch}  {what}: {row['median_round_ratio']:.2f}x, the median of "
                    f"round ratios {', '.join(f'{r:.2f}' for r in ratios)} ({met}; medians' ratio "
                    f"{row['ratio_of_medians']:.2f}x)",
                    flush=True,
                )
            for numerator, denominator in pages:
                row = {"model": shape_name, "batch": batch, "huge_pages": numerator, "versus": denominator}
                row |= paired_row(times, numerator, denominator)
                ratios = row["round_ratios"]
                rows.append(row)
                print(
                    f"{shape_name:6s} batch {batch}  {numerator}, weights in huge pages / in 4 KiB pages: "
                    f"{row['median_round_ratio']:.2f}x (rounds {', '.join(f'{r:.2f}' for r in ratios)})",
                    flush=True,
                )
            if compiled_name:
                jobs = [(args.job_steps, first["built"], "")]
                if first["loaded"] is not None:
                    # compile=auto also takes the digest of the weights it weighs (engine.layout._weigh),
                    # but for a package that holds none (streamed: noted under the config's key)
                    weightless = getattr(again.compiled_step, "any_weights", False)
                    digest_s = 0.0 if weightless else _timed(partial(ahead_of_time.weights_digest, model))
                    loaded_s = seconds[compiled_name] + first["load_over_steady"] + digest_s
                    jobs.append((args.short_job, loaded_s, ", its package built before"))
                for steps, first_s, how in jobs:
                    row = auto_compile_row(
                        shape_name, batch, args, first_s, seconds[picked], seconds[compiled_name], steps, how
                    )
                    rows.append(row)
                    print(f"{shape_name:6s} batch {batch}  {json.dumps(row)}", flush=True)
                    llamas = [n for n in seconds if n.startswith(("llama-server", "llama.cpp"))]
                    if how and llamas and shape_name == DEFAULT_TARGET_SHAPE:  # derived from rows: no pair
                        best_llama = min(llamas, key=seconds.get)
                        ratio = row["tok_s"] / (tokens / seconds[best_llama])
                        rows.append(
                            {
                                "model": shape_name,
                                "batch": batch,
                                "target": "the default >= 0.6x llama.cpp's best",
                                "numerator": row["engine"],
                                "denominator": best_llama,
                                "line": 0.6,
                                "ratio_of_medians": ratio,
                            }
                        )
                        print(
                            f"{shape_name:6s} batch {batch}  the default / {best_llama}: {ratio:.2f}x",
                            flush=True,
                        )
                rows.append(
                    {
                        "model": shape_name,
                        "batch": batch,
                        "engine": compiled_name,
                        "first_calls_s": first,
                        "gemms": gemms,
                    }
                )
    if args.pair:
        from multiar.run_folder import load_run

        target, draft = load_run(args.pair[0]), load_run(args.pair[1])
        prompt = [target.domain.prompt_ids(None)] * 1
        # fp32, as `multiar generate dtype=fp32` samples: packed weights for both models
        target_model = sampling_model(target, None, "fp32")
        draft_model = sampling_model(draft, None, "fp32")
        stats = {"draft model": SpeculativeStats(), "ngram": SpeculativeStats()}  # over every run

        def spec(d):
            def run():
                out, st = speculative_generate(target_model, prompt, args.new, draft=d, k=4)
                stats["ngram" if d == "ngram" else "draft model"].merge(st)

            return run

        entries = {
            "target alone": lambda: generate(target_model, prompts=prompt, max_new_tokens=args.new),
            "speculative draft model": spec(draft_model),
            "speculative ngram": spec("ngram"),
        }
        with torch.inference_mode():
            seconds = {name: statistics.median(t) for name, t in bench(entries, args.repeats).items()}
        for name, s in seconds.items():
            row = {"model": f"pair {args.pair[0].name}", "batch": 1, "engine": name, "tok_s": args.new / s}
            row["vs_target_alone"] = seconds["target alone"] / s
            key = "draft model" if "model" in name else "ngram" if "ngram" in name else None
            if key:
                row |= stats[key].as_dict()
            rows.append(row)
            print(
                f"pair   batch 1  {name:24s} {args.new / s:8.0f} tok/s  {row['vs_target_alone']:5.2f}x  "
                f"{json.dumps({k: round(v, 3) for k, v in row.items() if k in ('acceptance_rate', 'tokens_per_target_step')})}"
            )
    # the fp32 operator's prefetch hint, as this process measured it per weight shape on its first one-row
    # calls of each (it changes no sum, only the time: engine/cpu_matvec.cpp's fp32_ahead_mode)
    fp32_prefetch = cpu_matvec.fp32_ahead() if cpu_matvec.loaded() else None
    print(f"fp32 operator's prefetch hint: {json.dumps(fp32_prefetch)}")
    if args.json:
        summary = {
            "ram_read_gbps": bw,
            "rows": rows,
            "linears_alone_tok_s": ceilings,
            "fp32_prefetch": fp32_prefetch,
        }
        args.json.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    # a cache of this run's own: compile=true's first call builds its package here, measured
    with tempfile.TemporaryDirectory() as cache, mock.patch.dict(os.environ, {"MULTIAR_CACHE": cache}):
        main()
