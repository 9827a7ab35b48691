"""Optional GPU check of the sampling engine, of compile=true's CUDA graphs and of trainer=fsdp / ddp.

    python benchmarks/gpu_check.py [--out gpu_check.json] [--only training|sampling|compiled]

On CUDA: prompts of different lengths batched == each row alone (greedy); speculative decoding (draft
model and n-gram) == plain greedy; the sliding window == the uncached reference; int8 and bf16 logits
near fp32's. compile=true (`engine.decode.compile_for_sampling`: the one-token step replayed as one CUDA
graph) at 85M (12 x 768): greedy ids equal to the eager step's, one step's logits near eager's, the
seconds its first call took, and how many graphs inductor declined to capture. Then decode speed of
multiar eager fp32 / bf16 / int8 and compiled fp32 / bf16 against transformers fp32 on the same
weights, batch 1 and 8, 85M, sampling, median of 5 interleaved rounds.

Training smoke runs (Lightning refuses FSDP on a CPU, so the CPU test suite cannot run it): trainer=fsdp
with devices=1 trains a tiny protein model, resumes it from its last checkpoint, samples from the run
folder eagerly and with compile=true, and lands on the val/loss of the same run under trainer=gpu, as
trainer=ddp does (one device: nothing is sharded or reduced, the numbers are the same up to float
rounding). Prints one JSON object; `"training": {"ok": true}` when every step passed, else the first
failing step and its one-line error.
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

from multiar.engine.decode import compile_for_sampling, generate
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


def model_85m(device: str) -> GPT:
    """The 85M shape (12 x 768, vocab 512), random weights, seed 0."""
    return model(0, device, block_size=1024, n_layer=12, n_head=12, n_embd=768)


def compiled_checks(device: str, new: int = 256) -> dict:
    """compile=true on CUDA against the eager step at 85M, batch 1: the same greedy ids, one step's
    logits near eager's, the first call's seconds (compile and capture), inductor's cudagraph skips."""
    from torch._dynamo.utils import counters

    out: dict = {}
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    base = model_85m(device)
    prompt = torch.randint(3, 512, (1, 16), device=device, generator=torch.Generator(device).manual_seed(1))
    eager_ids = generate(base, prompt, new, temperature=0.0)[0]
    for name, weights in (("fp32", base), ("bf16", copy.deepcopy(base).bfloat16())):
        compiled = compile_for_sampling(copy.deepcopy(weights))
        sync()
        start = time.perf_counter()
        ids = generate(compiled, prompt, new, temperature=0.0)[0]
        sync()
        out[f"{name}_first_call_s"] = round(time.perf_counter() - start, 1)  # compile + capture + 256 steps
        reference = eager_ids if name == "fp32" else generate(weights, prompt, new, temperature=0.0)[0]
        out[f"{name}_greedy_equals_eager"] = ids == reference
        differ = [i for i, (a, b) in enumerate(zip(ids, reference, strict=False)) if a != b]
        if differ:
            out[f"{name}_first_difference_at"] = differ[0]
        with torch.inference_mode():  # one step after the same prefill: compiled against eager
            steps = []
            for m in (weights, compiled):
                m.setup_caches(1, 64)
                m(prompt, 0)
                steps.append(m(prompt[:, -1:], 16)[:, -1].float())
                m.clear_caches()
            eager_step, compiled_step = steps
            rel = ((compiled_step - eager_step).norm() / eager_step.norm()).item()
        out[f"{name}_step_relative_logit_error"] = rel
    out["cudagraph_skips"] = int(counters["inductor"]["cudagraph_skips"])
    return out


def speed(device: str, new: int = 256, rounds: int = 5) -> list[dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from multiar.engine.hf_format import llama_config, to_llama_state

    rows = []
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    base = model_85m(device)
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
        # one CUDA graph per batch size, captured at the warm-up call below
        "multiar fp32 compile=true": compile_for_sampling(copy.deepcopy(base)),
        "multiar bf16 compile=true": compile_for_sampling(copy.deepcopy(base).bfloat16()),
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
        for _ in range(rounds):
            for k, fn in runs.items():
                sync()
                t = time.perf_counter()
                fn()
                sync()
                times[k].append(time.perf_counter() - t)
        hf_tps = batch * new / statistics.median(times["transformers fp32"])
        eager_tps = batch * new / statistics.median(times["multiar fp32"])
        for k, ts in times.items():
            tps = batch * new / statistics.median(ts)
            rows.append(
                {
                    "batch": batch,
                    "engine": k,
                    "tok_s": round(tps, 1),
                    "vs_transformers": round(tps / hf_tps, 2),
                    "vs_multiar_fp32_eager": round(tps / eager_tps, 2),
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


def training_smoke(work: Path) -> dict:
    """trainer=fsdp on one GPU: train 40 steps, resume to 60, sample from the run (eagerly and with
    compile=true), compare with trainer=gpu and trainer=ddp. Each step is recorded; the first failure
    ends the check with its one-line error."""
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

    def sample(name: str, *extra: str) -> dict:
        args = [f"run={work / 'fsdp'}", f"out={work / name}", "n=2", "max_new_tokens=16", "seed=1"]
        report = sample_to_files(load_config("generate", [*args, *extra]))
        assert report["samples"] == 2, report["samples"]
        return report

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
        out["samples"] = sample("samples")["samples"]
        step = "generate compile=true"
        decode = sample("samples_compiled", "compile=true")["provenance"]["decode"]
        out["compiled_decode"] = decode.get("layout")
        assert "compiled" in str(decode.get("layout")), decode
        for trainer in ("gpu", "ddp"):
            step = f"same as trainer={trainer}"
            plain = run(trainer, trainer, "trainer.max_steps=40")
            out[f"val_loss_40_trainer_{trainer}"] = plain["val/loss"]
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
    parser.add_argument(
        "--out", type=Path, default=None, help="the JSON, rewritten after each part (--only: merged into it)"
    )
    parser.add_argument("--only", choices=PARTS, default=None, help="run one part")
    parser.add_argument(
        "--work", type=Path, default=None, help="folder for the training runs (default: temporary)"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here (this check runs only where a GPU is at hand)")
    report: dict = {}
    if args.only and args.out and args.out.exists():  # one part run again: the others' figures stay
        report = json.loads(args.out.read_text())
    report |= {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for part in PARTS:
        if args.only not in (None, part):
            continue
        if part == "training":
            with tempfile.TemporaryDirectory() as tmp:
                report[part] = training_smoke(args.work or Path(tmp))
        else:
            report[part] = compiled_checks("cuda") if part == "compiled" else checks("cuda")
            if part == "sampling":
                report["speed_85M"] = speed("cuda")
        report[f"{part}_date"] = time.strftime("%Y-%m-%d")
        print(json.dumps({part: report[part]}, indent=1), flush=True)
        if args.out:  # after each part: a run cut short keeps what it measured
            args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


# the parts, in the order they run: compile=true's checks first (the slowest to compile)
PARTS = ("compiled", "training", "sampling")


if __name__ == "__main__":
    main()
