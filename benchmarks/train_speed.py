"""Training speed: multiar's LightningModule + Trainer against a plain PyTorch loop on the same model, and
transformers' LlamaForCausalLM / GPT2LMHeadModel at the same shape in that plain loop; fp32 and bf16
autocast, side by side in one process.

    .venv/bin/python benchmarks/train_speed.py [--shapes 10.8M 85M] [--steps 20] [--warmup 3]
        [--dtypes fp32 bf16] [--json benchmarks/train_speed.json] [--nanogpt DIR] [--only NAME ...]
        [--rounds N] [--compile [--run-steps N]] [--no-loader] [--malloc-default] [--attention auto [sdpa]]

Every row runs with glibc's malloc set as `multiar train` sets it (multiar/engine/host_memory.py: freed
memory kept for the next step), nanoGPT's and transformers' too, so the ratios compare the models;
`--malloc-default` leaves it as it is. The Lightning rows take `--attention` as `multiar train` does
(auto: SDPA or batched matmuls, whichever one layer measures faster here, multiar/engine/attention_choice.py;
its log line is printed, and each row's picks are in the JSON); more values (`--attention auto sdpa`) add
an eager Lightning row for each, interleaved with the others. The plain loop keeps the model's default,
SDPA.

`--compile` adds `multiar Lightning compile` (compile=true: its first step, the compile, is timed apart)
and `multiar compile=auto, N steps`: what `multiar train`'s default does with a run of `--run-steps`
steps, worked out from this run's eager and compiled rows and that compile's seconds (4 eager steps
timed, then compiled if the steps left repay it: the decision and its figures are in the JSON row).

`multiar Lightning, composed ops` is the same eager step with the fused C kernels for SwiGLU's gate and
RMSNorm switched off (MULTIAR_CPU_KERNELS=0: engine/training_backward.py's composed Functions), the
baseline of multiar/engine/cpu_kernels.py; which kernels the measured choice took is in the JSON.

`--nanogpt DIR`: a nanoGPT checkout (its model.py is imported from there, nothing is copied): adds its
GPT-2 (bias=False, as its train.py defaults) in the same plain loop with its own optimizer setup
(`configure_optimizers`), at the same shape. The row is skipped when DIR is not given or lacks model.py.
With it, each other row's JSON has its ratio to nanoGPT round by round (`vs_nanogpt_rounds`: rounds
alternate the rows' order, nanoGPT's row in the middle; with three rows each runs beside it) and their
median (`vs_nanogpt_median_round`); every row keeps its rounds' tokens/s (`round_tok_s`).

Shape: vocab 512, block 256, batch 8 (2,048 tokens a step), AdamW, gradient clipping at 1.0. Model FLOP
utilisation (MFU) = (6 N + 12 L T C) FLOPs per token x tokens/s against the matmul peak of that dtype,
measured in the same run (a 1024 x 1024 matmul, best of repeats). The loader's wait is measured on
multiar's real data path (packed blocks of the bundled protein data through BlockDataModule).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import lightning as L
import torch
import torch.nn.functional as F

from multiar.engine import cpu_kernels
from multiar.engine.attention_choice import SETTINGS, log_line
from multiar.engine.compile_choice import compile_pays
from multiar.engine.hf_format import llama_config
from multiar.engine.host_memory import keep_freed_memory
from multiar.engine.model import GPT, ModelConfig
from multiar.engine.precision import matmul_flops
from multiar.training.compile_when_it_pays import CompileWhenItPays
from multiar.training.fastest_attention import FastestAttention
from multiar.training.module import LitGPT

SHAPES = {"10.8M": dict(n_layer=6, n_head=6, n_embd=384), "85M": dict(n_layer=12, n_head=12, n_embd=768)}
VOCAB, BLOCK, BATCH = 512, 256, 8
PICKED: dict[tuple[str, str], list[str]] = {}  # (row, dtype) -> the attention each round's run picked
OPTIM = dict(lr=3e-4, weight_decay=0.1, betas=[0.9, 0.95], warmup_steps=10, min_lr_ratio=0.1)


def batches(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (BATCH, BLOCK + 1), generator=g) for _ in range(n)]


def autocast(dtype: str):
    if dtype == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def plain_loop(
    model: torch.nn.Module, data: list[torch.Tensor], dtype: str, warmup: int, logits_of, opt=None
) -> float:
    """The ~30-line loop every tutorial writes; seconds per step after warm-up. logits_of(model, idx,
    targets) returns logits, or the loss itself (a 0-d tensor: nanoGPT's forward)."""
    if opt is None:
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95))
    model.train()
    for i, batch in enumerate(data):
        if i == warmup:
            start = time.perf_counter()
        idx, targets = batch[:, :-1], batch[:, 1:]
        with autocast(dtype):
            out = logits_of(model, idx, targets)
        loss = out if out.dim() == 0 else F.cross_entropy(out.flatten(0, 1).float(), targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / (len(data) - warmup)


class StepTimer(L.Callback):
    """The timed steps' span (after warmup) and the first step's seconds (a compiled row's compile)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end, self.steps, self.first = warmup, 0.0, 0.0, 0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if batch_idx in (0, self.warmup):
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.end, self.steps = time.perf_counter(), batch_idx + 1 - self.warmup
        if batch_idx == 0:
            self.first = self.end - self.start


def lightning_loop(
    config: ModelConfig,
    data: list[torch.Tensor],
    dtype: str,
    warmup: int,
    compile: bool = False,
    attention: str = "auto",
) -> tuple[float, float]:
    """Seconds per timed step, the first step's seconds and the attention picked, of multiar's
    LightningModule + Trainer."""
    module = LitGPT(config.to_dict(), OPTIM, pad_id=-1, compile=compile)
    timer = StepTimer(warmup)
    picker = FastestAttention(attention, data[0].size(0), cache_file=None)  # before the first step
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            precision="bf16-mixed" if dtype == "bf16" else "32-true",
            max_steps=len(data),
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            gradient_clip_val=1.0,
            limit_val_batches=0,
            default_root_dir=tmp,
            callbacks=[picker, timer],
        )
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    print(f"  {log_line(picker.choice)}")
    return (timer.end - timer.start) / timer.steps, timer.first, picker.choice["attention"]


def transformers_models(model: GPT) -> dict:
    config = model.config
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    # the Llama layout multiar exports (`multiar export format=hf`): same rope base, norm eps, sizes
    llama = LlamaConfig(**{k: v for k, v in llama_config(model, {}).items() if k != "architectures"})
    gpt2 = GPT2Config(
        vocab_size=VOCAB,
        n_positions=BLOCK,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        attn_implementation="sdpa",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return {"transformers Llama": LlamaForCausalLM(llama), "transformers GPT-2": GPT2LMHeadModel(gpt2)}


def nanogpt_row(directory: Path | None, config: ModelConfig, data: list, dtype: str, warmup: int):
    """Seconds per step of nanoGPT's GPT (imported from a checkout) in the plain loop, or None."""
    if directory is None or not (directory / "model.py").exists():
        return None
    import importlib.util

    spec = importlib.util.spec_from_file_location("nanogpt_model", directory / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    cfg = module.GPTConfig(
        block_size=BLOCK,
        vocab_size=VOCAB,
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_embd=config.n_embd,
        dropout=0.0,
        bias=False,
    )
    with contextlib.redirect_stdout(None):  # its constructor and optimizer setup print
        model = module.GPT(cfg)
        opt = model.configure_optimizers(0.1, 3e-4, (0.9, 0.95), "cpu")
    return plain_loop(model, data, dtype, warmup, lambda m, x, y: m(x.contiguous(), y.contiguous())[1], opt)


def loader_wait(steps: int) -> float:
    """Seconds per batch spent fetching packed blocks from multiar's real data path."""
    from multiar.data.corpus import prepare_corpus
    from multiar.data.packing import BlockDataModule
    from multiar.domains import build_domain

    with tempfile.TemporaryDirectory() as cache:
        corpus = prepare_corpus(build_domain("protein"), {}, None, cache_dir=cache)
        dm = BlockDataModule(corpus, BLOCK, BATCH)
        dm.setup()
        it = iter(dm.train_dataloader())
        next(it)
        start = time.perf_counter()
        for _ in range(steps):
            next(it)
        return (time.perf_counter() - start) / steps


def flops_per_token(config: ModelConfig, params: int) -> float:
    """Training FLOPs per token: 6 per weight (forward + backward) plus attention's score/value matmuls."""
    non_embedding = params - VOCAB * config.n_embd  # the tied table counts once, as lm_head
    return 6 * (non_embedding + VOCAB * config.n_embd) + 12 * config.n_layer * BLOCK * config.n_embd


def composed_row(loop):  # noqa: ANN001, ANN201
    """One row with the fused CPU kernels switched off (the switch is read on each call)."""
    with mock.patch.dict(os.environ, {"MULTIAR_CPU_KERNELS": "0"}):
        return loop()


def shape_rows(config: ModelConfig, gpt: GPT, data: list, dtype: str, args) -> tuple[dict, dict, dict]:  # noqa: ANN001
    """Seconds per step of every implementation at one shape and dtype: each runs its warm-up and
    timed steps once per round, rounds interleaved (every other round in reverse order: no row always
    runs first; nanoGPT's row in the middle, so that with three rows each other one runs beside it), the
    median over rounds; the first round's first step of the
    Lightning rows (the compile, for the compiled row); and every round's seconds per step."""
    attention, *others = args.attention
    loops = {
        "multiar Lightning": lambda: lightning_loop(config, data, dtype, args.warmup, False, attention),
        "multiar GPT, plain loop": lambda: plain_loop(
            copy.deepcopy(gpt), data, dtype, args.warmup, lambda m, x, y: m(x)
        ),
    }
    loops["multiar Lightning, composed ops"] = lambda: composed_row(
        lambda: lightning_loop(config, data, dtype, args.warmup, False, attention)
    )
    for other in others:  # the same step on another attention=, interleaved with the rest
        loops[f"multiar Lightning attention={other}"] = lambda other=other: lightning_loop(
            config, data, dtype, args.warmup, False, other
        )
    for name in ("transformers Llama", "transformers GPT-2"):
        loops[name] = lambda name=name: plain_loop(
            transformers_models(gpt)[name], data, dtype, args.warmup, lambda m, x, y: m(input_ids=x).logits
        )
    if args.compile:  # the warm-up steps compile (minutes on 2 cores); timed steps after them
        loops["multiar Lightning compile"] = lambda: lightning_loop(
            config, data, dtype, args.warmup, True, attention
        )
    if args.nanogpt is not None:
        loops["nanoGPT GPT-2"] = lambda: nanogpt_row(args.nanogpt, config, data, dtype, args.warmup)
    if args.only:
        loops = {k: v for k, v in loops.items() if k in args.only}
    times: dict[str, list[float]] = {name: [] for name in loops}
    firsts: dict[str, float] = {}
    order = list(loops)
    if "nanoGPT GPT-2" in loops:  # in the middle: the rows on either side are its neighbours every round
        order.remove("nanoGPT GPT-2")
        order.insert(len(order) // 2, "nanoGPT GPT-2")
    for r in range(args.rounds):
        for name in order[:: -1 if r % 2 else 1]:
            seconds = loops[name]()
            if isinstance(seconds, tuple):
                seconds, first, picked = seconds
                firsts.setdefault(name, first)
                PICKED.setdefault((name, dtype), []).append(picked)
            if seconds is not None:
                times[name].append(seconds)
    return {name: statistics.median(t) for name, t in times.items() if t}, firsts, times


def compile_auto_row(rows: dict[str, float], firsts: dict[str, float], run_steps: int) -> dict | None:
    """What `multiar train`'s compile=auto does with a run of run_steps steps, from this run's rows (a
    second run's view: the compile measured): 4 eager steps timed, then compile_pays over the steps
    left; the run's seconds a step with the compile's in it, and the decision."""
    if "multiar Lightning" not in rows or "multiar Lightning compile" not in rows:
        return None
    eager, compiled = rows["multiar Lightning"], rows["multiar Lightning compile"]
    compile_s = firsts["multiar Lightning compile"]  # its first step, whole: as the training clock counts it
    timed = CompileWhenItPays.EAGER_WARM_UP + CompileWhenItPays.EAGER_TIMED
    left = max(0, run_steps - timed)
    measured = {"compiled_ms": compiled * 1e3, "compile_s": compile_s}
    decision = compile_pays(left, eager * 1e3, measured, what="the training step")
    total = timed * eager + (compile_s + left * compiled if decision.compile else left * eager)
    return {"seconds": total / run_steps, "compile_s": compile_s, "decision": decision}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--nanogpt", type=Path, default=None, help="a nanoGPT checkout (its model.py)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds; median step of each")
    parser.add_argument("--only", nargs="*", default=None, help="rows to run (names as printed)")
    parser.add_argument("--compile", action="store_true", help="+ multiar Lightning with compile=true")
    parser.add_argument("--no-loader", action="store_true", help="skip the loader-wait measurement")
    parser.add_argument(
        "--run-steps",
        type=int,
        default=5000,
        help="with --compile: the run length the compile=auto row (the default's decision) is worked out for",
    )
    parser.add_argument(
        "--malloc-default",
        action="store_true",
        help="leave glibc's malloc as it is (default: as `multiar train` sets it, for every row alike)",
    )
    parser.add_argument(
        "--attention",
        nargs="+",
        choices=SETTINGS,
        default=["auto"],
        help="the Lightning rows' attention= (as multiar train's); more values add a `multiar Lightning "
        "attention=X` row each",
    )
    args = parser.parse_args()
    heap = None if args.malloc_default else keep_freed_memory()
    print(f"host memory: {heap or 'malloc as it is'}")
    fused = {op: cpu_kernels.chosen(op) for op in cpu_kernels.OPS} if cpu_kernels.enabled() else {}
    print(f"fused CPU kernels taken: {fused or 'switched off'} (the choice measured once, cached)")
    fused_measured = cpu_kernels.measured() if fused else None
    torch.manual_seed(0)
    peaks = {
        d: matmul_flops(torch.bfloat16 if d == "bf16" else torch.float32, n=1024, seconds=1.0)
        for d in args.dtypes
    }
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; matmul peak: "
        + ", ".join(f"{d} {p / 1e9:.0f} GFLOP/s" for d, p in peaks.items())
    )
    data = batches(args.steps + args.warmup)
    tokens = BATCH * BLOCK
    results = []
    for shape in args.shapes:
        config = ModelConfig(vocab_size=VOCAB, block_size=BLOCK, **SHAPES[shape])
        for dtype in args.dtypes:
            torch.manual_seed(0)
            gpt = GPT(config)
            fpt = flops_per_token(config, gpt.num_parameters())
            rows, firsts, times = shape_rows(config, gpt, data, dtype, args)
            auto = compile_auto_row(rows, firsts, args.run_steps)
            if auto is not None:
                rows[f"multiar compile=auto, {args.run_steps} steps"] = auto["seconds"]
                print(f"  compile=auto for a run of {args.run_steps} steps: {auto['decision'].log_line()}")
            for name, seconds in rows.items():
                tps = tokens / seconds
                row = {
                    "shape": shape,
                    "dtype": dtype,
                    "impl": name,
                    "tok_s": tps,
                    "mfu": tps * fpt / peaks[dtype],
                }
                if name in firsts:
                    row["first_step_s"] = firsts[name]
                if name in times:
                    row["round_tok_s"] = [tokens / t for t in times[name]]
                nano = times.get("nanoGPT GPT-2", [])
                if name != "nanoGPT GPT-2" and nano and len(times.get(name, [])) == len(nano):
                    # the ratio round by round (rows beside nanoGPT's in the order: taken between neighbours)
                    row["vs_nanogpt_rounds"] = [n / t for t, n in zip(times[name], nano, strict=True)]
                    row["vs_nanogpt_median_round"] = statistics.median(row["vs_nanogpt_rounds"])
                if (name, dtype) in PICKED:
                    row["attention_picked"] = PICKED[name, dtype]
                if name.startswith("multiar compile=auto"):
                    row |= {"compile_s": auto["compile_s"], "decision": auto["decision"].as_dict()}
                results.append(row)
            base = {r["impl"]: r["tok_s"] for r in results if r["shape"] == shape and r["dtype"] == dtype}
            print(
                f"\n{shape} {dtype} ({gpt.num_parameters() / 1e6:.1f}M parameters, {fpt / 1e6:.0f} MFLOP/token)"
            )
            for name, tps in base.items():
                mfu = tps * fpt / peaks[dtype]
                print(f"  {name:32s} {tps:8.0f} tok/s  MFU {mfu:5.1%}")
            ratios = [
                (a, b)
                for a in (
                    "multiar Lightning",
                    "multiar GPT, plain loop",
                    "multiar Lightning compile",
                    f"multiar compile=auto, {args.run_steps} steps",
                )
                for b in (
                    "multiar Lightning, composed ops",
                    "multiar GPT, plain loop",
                    "transformers Llama",
                    "transformers GPT-2",
                    "nanoGPT GPT-2",
                )
                if a != b
                and a in base
                and b in base
                and not (a.startswith("multiar compile") and "multiar" in b)
                and (a == "multiar Lightning" or b != "multiar Lightning, composed ops")
            ]
            print("  " + "  ".join(f"{a} / {b} {base[a] / base[b]:.2f}" for a, b in ratios), flush=True)
            for row in results:
                if row["shape"] == shape and row["dtype"] == dtype and "vs_nanogpt_rounds" in row:
                    rounds = ", ".join(f"{x:.3f}" for x in row["vs_nanogpt_rounds"])
                    print(
                        f"  {row['impl']} / nanoGPT GPT-2 round by round: {rounds}; median {row['vs_nanogpt_median_round']:.3f}"
                    )
    wait = loader_wait(20) if not args.no_loader else float("nan")
    step = max((r["tok_s"] for r in results if r["impl"] == "multiar Lightning"), default=float("nan"))
    print(
        f"\nloader wait {wait * 1e3:.2f} ms a batch = {wait / (tokens / step):.2%} of the fastest step measured"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "peaks_gflops": {d: p / 1e9 for d, p in peaks.items()},
                    "host_memory": heap or "malloc as it is",
                    "attention": args.attention,
                    "fused_cpu_kernels": fused,
                    "fused_cpu_kernels_measured": fused_measured,
                    "loader_wait_s": wait,
                    "results": results,
                },
                indent=1,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
