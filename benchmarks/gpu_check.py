"""Optional GPU check of the sampling engine and of trainer=fsdp (transformers for the speed baseline).

    python benchmarks/gpu_check.py [--out gpu_check.json] [--only fsdp|sampling]

On CUDA: prompts of different lengths batched == each row alone (greedy); speculative decoding (draft
model and n-gram) == plain greedy; the sliding window == the uncached reference; int8 and bf16 logits
near fp32's; then decode speed of multiar fp32 / bf16 / int8 against transformers fp32 on the same
weights, batch 1 and 8, 85M (12 x 768), median of 3.

FSDP smoke run (Lightning refuses FSDP on a CPU, so the CPU test suite cannot run it): trainer=fsdp
with devices=1 trains a tiny protein model, resumes it from its last checkpoint, samples from the run
folder, and lands on the val/loss of the same run under trainer=gpu (one device: nothing is sharded,
the numbers are the same up to float rounding). Prints one JSON object; `"fsdp": {"ok": true}` when
every step passed, else the first failing step and its one-line error.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

from multiar.engine.decode import generate
from multiar.engine.model import GPT, ModelConfig
from multiar.engine.quantize import quantize
from multiar.engine.speculative import speculative_generate


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
            ctx = hist[-16:] if len(ctx) >= 32 else [*ctx, t]  # a training-like window: no BOS
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

    from multiar.engine.hf_format import llama_config, to_llama_state

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


# the smallest run that exercises FSDP: seconds on one GPU; fp32 and no clipping, so that trainer=gpu
# runs the same numbers (Lightning clips FSDP gradients only by value, gpu.yaml clips by norm)
FSDP_RUN = [
    "model.n_layer=2",
    "model.n_embd=64",
    "model.n_head=2",
    "model.block_size=64",
    "data.batch_size=8",
    "data.max_documents=300",
    "trainer.devices=1",
    "trainer.val_check_interval=20",
    "trainer.limit_val_batches=4",
    "trainer.log_every_n_steps=5",
    "trainer.enable_progress_bar=false",
    "trainer.precision=32-true",
    "trainer.gradient_clip_val=null",
    "samples.every_n_steps=0",
]


def fsdp_smoke(work: Path) -> dict:
    """trainer=fsdp on one GPU: train 40 steps, resume to 60, sample from the run, compare with trainer=gpu.
    Each step is recorded; the first failure ends the check with its one-line error."""
    from multiar.commands.generate import sample_to_files
    from multiar.config import load_config
    from multiar.training.run import train

    out: dict = {"ok": False}
    step = "train"

    def run(trainer: str, name: str, *extra: str) -> dict:
        overrides = [
            f"trainer={trainer}",
            *FSDP_RUN,
            f"run_dir={work / name}",
            f"data.cache_dir={work / 'cache'}",
        ]
        return train(load_config("train", [*overrides, *extra]))

    try:
        first = run("fsdp", "fsdp", "trainer.max_steps=40")
        out["val_loss_40"] = first["val/loss"]
        # under a uniform guess over the 28 tokens (3.33 nats): it learned something
        assert math.isfinite(first["val/loss"]) and first["val/loss"] < math.log(28), first["val/loss"]
        step = "resume"
        last = work / "fsdp" / "checkpoints" / "last.ckpt"
        out["checkpoint"] = "directory (sharded)" if last.is_dir() else f"file, {last.stat().st_size:,} bytes"
        resumed = run("fsdp", "fsdp", "trainer.max_steps=60", "ckpt_path=last")
        out["val_loss_60"] = resumed["val/loss"]
        if last.is_file():
            out["resumed_to_step"] = int(
                torch.load(last, map_location="cpu", weights_only=True)["global_step"]
            )
            assert out["resumed_to_step"] == 60, out["resumed_to_step"]
        step = "generate"
        report = sample_to_files(
            load_config(
                "generate",
                [f"run={work / 'fsdp'}", f"out={work / 'samples'}", "n=2", "max_new_tokens=16", "seed=1"],
            )
        )
        assert report["samples"] == 2, report["samples"]
        out["samples"] = report["samples"]
        step = "same as trainer=gpu"
        plain = run("gpu", "gpu", "trainer.max_steps=40")
        out["val_loss_40_trainer_gpu"] = plain["val/loss"]
        assert abs(plain["val/loss"] - first["val/loss"]) < 1e-2 * plain["val/loss"], (plain, first)
    except Exception as err:  # noqa: BLE001 - a failing step is the check's result, recorded
        lines = str(err).strip().splitlines() or [type(err).__name__]
        out["failed_step"] = step
        out["error"] = f"{type(err).__name__}: {lines[0]}"[:300]
        return out
    out["ok"] = True
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--only", choices=("fsdp", "sampling"), default=None, help="run one part")
    parser.add_argument(
        "--work", type=Path, default=None, help="folder for the FSDP runs (default: temporary)"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here (this check runs only where a GPU is at hand)")
    device = "cuda"
    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    if args.only != "sampling":
        with tempfile.TemporaryDirectory() as tmp:
            report["fsdp"] = fsdp_smoke(args.work or Path(tmp))
        print(json.dumps(report["fsdp"], indent=1), flush=True)
    if args.only != "fsdp":
        report["checks"] = checks(device)
        print(json.dumps(report["checks"], indent=1), flush=True)
        report["speed_85M"] = speed(device)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
