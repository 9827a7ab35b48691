"""Optional GPU check of the sampling engine (needs only torch; transformers for the speed baseline).

    python benchmarks/gpu_check.py [--out gpu_check.json]

On CUDA: prompts of different lengths batched == each row alone (greedy); speculative decoding (draft
model and n-gram) == plain greedy; the sliding window == the uncached reference; int8 and bf16 logits
near fp32's; then decode speed of multiar fp32 / bf16 / int8 against transformers fp32 on the same
weights, batch 1 and 8, 85M (12 x 768), median of 3. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from multiar.generate import generate
from multiar.model import GPT, ModelConfig
from multiar.quantize import quantize
from multiar.speculative import speculative_generate


def model(seed: int, device: str, **shape) -> GPT:
    torch.manual_seed(seed)
    args = dict(vocab_size=512, block_size=256, n_layer=2, n_head=4, n_embd=128) | shape
    return GPT(ModelConfig(**args)).to(device).eval()


def checks(device: str) -> dict:
    out = {}
    target, draft = model(0, device), model(1, device, n_layer=1, n_embd=64)
    prompts = [[1, 5, 9], [1], [1, *range(20, 40)], [1, 3, 3]]
    batched = generate(target, prompts=prompts, max_new_tokens=40, temperature=0.0)
    out["ragged_batch_equals_rows"] = batched == [
        generate(target, [p], 40, temperature=0.0)[0] for p in prompts
    ]
    for name, d in (("draft_model", draft), ("ngram", "ngram")):
        spec, stats = speculative_generate(target, prompts, 40, draft=d, k=4, temperature=0.0)
        out[f"speculative_{name}_equals_greedy"] = spec == batched
        out[f"speculative_{name}_acceptance"] = stats.as_dict()["acceptance_rate"]
    sampled, _ = speculative_generate(
        target, prompts, 40, draft=draft, k=4, generator=torch.Generator(device=device).manual_seed(0)
    )
    out["speculative_sampling_runs"] = [len(r) for r in sampled] == [40] * 4
    small = model(2, device, block_size=32)
    slid = generate(small, [[1, 4, 9]], 100, temperature=0.0)[0]
    ctx, hist, ref = [1, 4, 9], [1, 4, 9], []
    with torch.no_grad():
        for _ in range(100):
            t = int(small(torch.tensor([ctx], device=device))[0, -1].argmax())
            ref.append(t)
            hist.append(t)
            ctx = [hist[0], *hist[max(len(hist) - 16, 1) :]] if len(ctx) >= 32 else [*ctx, t]
    out["sliding_window_equals_reference"] = slid == ref
    idx = torch.randint(0, 512, (2, 30), device=device)
    with torch.no_grad():
        ref_logits = target(idx).float()
        for name, m in (
            ("int8", quantize(copy.deepcopy(target), "int8")),
            ("bf16", copy.deepcopy(target).bfloat16()),
        ):
            rel = ((m(idx).float() - ref_logits).norm() / ref_logits.norm()).item()
            out[f"{name}_relative_logit_error"] = rel
    return out


def speed(device: str, new: int = 256) -> list[dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from multiar.hf_format import llama_config, to_llama_state

    rows = []
    torch.manual_seed(0)
    base = (
        GPT(ModelConfig(vocab_size=512, block_size=1024, n_layer=12, n_head=12, n_embd=768)).to(device).eval()
    )
    hf = LlamaForCausalLM(
        LlamaConfig(**{k: v for k, v in llama_config(base, {}).items() if k != "architectures"})
    )
    state = to_llama_state(base)
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    hf.load_state_dict(state)
    hf = hf.to(device).eval()
    engines = {
        "multiar fp32": base,
        "multiar bf16": copy.deepcopy(base).bfloat16(),
        "multiar int8": quantize(copy.deepcopy(base), "int8"),
    }
    for batch in (1, 8):
        prompt = torch.randint(3, 512, (batch, 16), device=device)
        runs = {
            "transformers fp32": lambda p=prompt: hf.generate(
                p, attention_mask=torch.ones_like(p), do_sample=True, max_new_tokens=new, min_new_tokens=new
            )
        }
        runs |= {name: (lambda m=m, p=prompt: generate(m, p, new)) for name, m in engines.items()}
        times = {k: [] for k in runs}
        for fn in runs.values():
            fn()
        for _ in range(3):
            for k, fn in runs.items():
                torch.cuda.synchronize()
                t = time.perf_counter()
                fn()
                torch.cuda.synchronize()
                times[k].append(time.perf_counter() - t)
        hf_tps = batch * new / statistics.median(times["transformers fp32"])
        for k, ts in times.items():
            tps = batch * new / statistics.median(ts)
            rows.append(
                {
                    "batch": batch,
                    "engine": k,
                    "tok_s": round(tps, 1),
                    "vs_transformers": round(tps / hf_tps, 2),
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = "cuda"
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "checks": checks(device)}
    print(json.dumps(report["checks"], indent=1), flush=True)
    report["speed_85M"] = speed(device)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
