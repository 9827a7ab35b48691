"""Quantized calls of many rows: the int8 or int4 kernel for every call (the baseline, as before the rules)
against the rule `prepare_for_decoding` measures (`multiar.engine.quantized_prefill`: the weight
dequantized for one dense GEMM from a row count on, and below it the kernel or, where measured faster,
the layer's mat-vec operator), side by side in one process, interleaved, median
of N.

    .venv/bin/python benchmarks/quantized_prefill.py [--modes int8 int4] [--shapes 10.8M 85M]
        [--prompts 16 64 256 512] [--repeats 5] [--new 32] [--json out.json]

Per mode and shape (random weights, vocab 512; an int4 model's 512-token head is int4 too): the rule measured afresh (an empty cache) and its timings (ms
for one call of each layer shape of that mode, on the kernel, dense and, where timed, on the operator,
per row count); for each prompt length, the prefill alone (one forward over the prompt, logits of its
last token) and `generate` of --new tokens after it (sampling, temperature 1, eager decode steps: their
one row on the kernel, or on the operator under a "matvec" rule), on the kernel and with the rule; the
largest logit difference between the two prefills.
The CPU is named in the JSON: where the kernel and the GEMM cross differs between CPUs.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from multiar.engine.choice_cache import CACHE_FILE
from multiar.engine.decode import generate
from multiar.engine.layout import prepare_for_decoding
from multiar.engine.model import GPT, ModelConfig
from multiar.engine.precision import cpu_model
from multiar.engine.quantize import quantize
from multiar.engine.quantized_prefill import prefill_key, use_prefill

SHAPES = {"10.8M": dict(n_layer=6, n_head=6, n_embd=384), "85M": dict(n_layer=12, n_head=12, n_embd=768)}


def median_ms(runs: dict[str, Callable], repeats: int) -> dict[str, float]:
    """Every run once per round, in an order shuffled per round, after one untimed round."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for fn in runs.values():
        fn()
    for r in range(repeats):
        order = list(runs)
        random.Random(r).shuffle(order)
        for name in order:
            start = time.perf_counter()
            runs[name]()
            times[name].append(1e3 * (time.perf_counter() - start))
    return {name: round(statistics.median(t), 2) for name, t in times.items()}


def prompt_row(model: GPT, mode: str, prompt: torch.Tensor, rule: str, new: int, repeats: int) -> dict:
    """One prompt: its prefill and a generate after it, on the kernel (the rule named `mode`) and with
    the rule."""
    on_kernel = mode

    def prefill(rule_now: str) -> torch.Tensor:
        use_prefill(model, mode, rule_now)
        model.setup_caches(1, model.config.block_size)
        with torch.inference_mode():
            return model(prompt, 0, logits_at=-1)[:, -1].float()

    def sample(rule_now: str) -> None:
        use_prefill(model, mode, rule_now)
        generate(model, prompt, new, temperature=1.0)

    difference = (prefill(on_kernel) - prefill(rule)).abs().max().item()
    prefill_ms = median_ms({"kernel": lambda: prefill(on_kernel), "rule": lambda: prefill(rule)}, repeats)
    generate_ms = median_ms({"kernel": lambda: sample(on_kernel), "rule": lambda: sample(rule)}, repeats)
    return {
        "prompt": prompt.size(1),
        "rule": rule,
        "prefill_ms_kernel": prefill_ms["kernel"],
        "prefill_ms_rule": prefill_ms["rule"],
        "prefill_speedup": round(prefill_ms["kernel"] / prefill_ms["rule"], 2),
        f"generate_{new}_ms_kernel": generate_ms["kernel"],
        f"generate_{new}_ms_rule": generate_ms["rule"],
        "max_logit_difference": round(difference, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", nargs="*", default=["int8", "int4"])
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES))
    parser.add_argument("--prompts", nargs="*", type=int, default=[16, 64, 256, 512])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    out = {"cpu": cpu_model(), "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": []}
    for mode in args.modes:
        for shape in args.shapes:
            torch.manual_seed(0)
            config = ModelConfig(vocab_size=512, block_size=1024, **SHAPES[shape])
            with tempfile.TemporaryDirectory() as cache:  # measured afresh; its timings read back
                model, choice = prepare_for_decoding(quantize(GPT(config).eval(), mode), cache_dir=cache)
                table = json.loads((Path(cache) / CACHE_FILE).read_text())
            key = prefill_key(mode)
            if key not in choice.kernels:  # no kernel of that mode in this torch, or not on a CPU
                print(f"{mode} {shape}: no {mode} kernel here: {choice.log_line()}", flush=True)
                continue
            rule = choice.kernels[key]
            entry = next(entry for k, entry in table.items() if f"| {key}," in k)
            # [kernel, dense] ms, and the operator's where it was timed too
            timings = entry.get("ms_kernel_dense_matvec") or entry["ms_kernel_dense"]
            print(f"{mode} {shape}: {choice.log_line()}", flush=True)
            for length in args.prompts:
                prompt = torch.randint(3, 512, (1, length))
                row = prompt_row(model, mode, prompt, rule, args.new, args.repeats)
                out["rows"].append({"mode": mode, "shape": shape, **row})
                print(json.dumps(out["rows"][-1]), flush=True)
            out.setdefault("rule_ms_kernel_dense", {})[f"{mode} {shape}"] = timings
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
