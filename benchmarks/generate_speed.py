"""Decode speed: multiar's KV-cache `generate` against the uncached baseline, side by side, same process.

Baseline: the plain loop that re-runs the whole sequence through the model for every new token
(what a model without a cache must do). Both sample greedily from the same random-weight model, so
they produce the same tokens; the check below asserts it.

    .venv/bin/python benchmarks/generate_speed.py [--new 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from multiar.engine.decode import generate
from multiar.engine.model import GPT, ModelConfig

SHAPES = {
    "tiny": dict(n_layer=4, n_head=4, n_embd=128),
    "small": dict(n_layer=6, n_head=6, n_embd=384),
}


@torch.inference_mode()
def uncached(model: GPT, prompt: torch.Tensor, n: int) -> list[list[int]]:
    seq = prompt
    for _ in range(n):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[:, prompt.size(1) :].tolist()


def best_of(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new", type=int, default=256, help="new tokens per sample")
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=512)
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, greedy, "
        f"prompt {args.prompt}, {args.new} new tokens, best of {args.repeats}"
    )
    print(
        f"{'model':6s} {'params':>7s} {'batch':>5s} {'uncached tok/s':>15s} {'kv-cache tok/s':>15s} {'speed-up':>9s}"
    )
    for name, shape in SHAPES.items():
        torch.manual_seed(0)
        model = GPT(ModelConfig(vocab_size=args.vocab, block_size=1024, **shape)).eval()
        for batch in (1, 8):
            prompt = torch.randint(0, args.vocab, (batch, args.prompt))
            t_base, ref = best_of(lambda m=model, p=prompt: uncached(m, p, args.new), args.repeats)
            t_kv, out = best_of(
                lambda m=model, p=prompt: generate(m, p, args.new, temperature=0.0), args.repeats
            )
            assert out == ref, "cached and uncached greedy decoding disagree"
            tokens = batch * args.new
            print(
                f"{name:6s} {model.num_parameters() / 1e6:6.1f}M {batch:5d} {tokens / t_base:15.0f} "
                f"{tokens / t_kv:15.0f} {t_base / t_kv:8.1f}x"
            )


if __name__ == "__main__":
    main()
