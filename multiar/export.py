"""Commands that turn a run into other forms: `multiar quantize` (int8 weights stored in the run, with the
validation perplexity of the quantized model next to fp32's) and `multiar export format=hf` (a
transformers `LlamaForCausalLM` folder, for serving on existing engines)."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from multiar.data import pack_dataset, prepare_corpus, stack_blocks
from multiar.domain import write_new_file, write_new_text
from multiar.hf_format import llama_config, to_llama_state
from multiar.model import GPT
from multiar.quantize import quantize, quantized_file, save_quantized
from multiar.run_folder import Run, load_run
from multiar.schema import validate

log = logging.getLogger("multiar")


@torch.inference_mode()
def validation_loss(model: GPT, run: Run, max_batches: int, batch_size: int) -> tuple[float, int]:
    """Token-weighted mean next-token loss over the run's validation split (its own tokenizer, the data
    settings it was trained with), and how many tokens it covers."""
    data = run.config.get("data", {})
    corpus = prepare_corpus(
        run.domain,
        run.config["domain"].get("settings", {}),
        data.get("paths"),
        cache_dir=os.environ.get("MULTIAR_CACHE", data.get("cache_dir") or "~/.cache/multiar"),
        max_documents=data.get("max_documents"),
        val_fraction=data.get("val_fraction", 0.05),
        fit=False,
    )
    blocks = pack_dataset(corpus.val, model.config.block_size, run.domain)
    total, tokens = 0.0, 0
    for i, batch in enumerate(DataLoader(blocks, batch_size=batch_size, collate_fn=stack_blocks)):
        if i >= max_batches:
            break
        batch = batch.to(model.wte.weight.device)
        idx, targets = batch[:, :-1], batch[:, 1:]
        targets = targets.masked_fill(targets == run.domain.pad_id, -100)
        logits = model(idx).float()
        total += F.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum"
        ).item()
        tokens += int((targets != -100).sum())
    return total / max(tokens, 1), tokens


def quantize_run(cfg: DictConfig) -> dict[str, Any]:
    """Quantize run cfg.run to cfg.mode, write model.<mode>.safetensors into it, report validation ppl."""
    cfg = validate("quantize", cfg)
    run = load_run(cfg.run, device=cfg.device)
    fp32_loss, tokens = validation_loss(run.model, run, cfg.eval_batches, cfg.batch_size)
    model = quantize(run.model, cfg.mode)
    path = save_quantized(model, run.path, run.path / "model.safetensors", mode=cfg.mode)
    q_loss, _ = validation_loss(model, run, cfg.eval_batches, cfg.batch_size)
    report = {
        "mode": cfg.mode,
        "file": str(path),
        "val_tokens": tokens,
        "val_ppl_fp32": math.exp(fp32_loss),
        f"val_ppl_{cfg.mode}": math.exp(q_loss),
        "ppl_change": math.exp(q_loss - fp32_loss) - 1,
    }
    write_new_text(Path(run.path) / "quantize.json", json.dumps(report, indent=1) + "\n", overwrite=True)
    print(
        f"{run.domain.name}: {quantized_file(cfg.mode)} written; validation ppl fp32 {report['val_ppl_fp32']:.4f}, "
        f"{cfg.mode} {report[f'val_ppl_{cfg.mode}']:.4f} ({100 * report['ppl_change']:+.2f}%) over {tokens} tokens"
    )
    return report


def export_run(cfg: DictConfig) -> dict[str, Any]:
    """Write run cfg.run as a transformers LlamaForCausalLM folder at cfg.out."""
    from safetensors.torch import save_file

    cfg = validate("export", cfg)
    run = load_run(cfg.run)
    out = Path(cfg.out).expanduser()
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise FileExistsError(f"{out}: already exists and is not empty (pass overwrite=true to replace it)")
    d = run.domain
    ids = {"bos_token_id": d.bos_id, "eos_token_id": d.eos_id, "pad_token_id": d.pad_id}
    state = to_llama_state(run.model)
    state.pop("lm_head.weight", None)  # tied: transformers rebuilds it from the embedding
    meta = {"format": "pt", "source": "multiar"}
    files = [
        write_new_file(
            out / "model.safetensors", lambda tmp: save_file(state, str(tmp), metadata=meta), True
        ),
        write_new_text(out / "config.json", json.dumps(llama_config(run.model, ids), indent=1) + "\n", True),
        write_new_text(
            out / "generation_config.json", json.dumps(ids | {"do_sample": True}, indent=1) + "\n", True
        ),
    ]
    tokenizer = getattr(d, "tokenizer", None)
    if tokenizer is not None and hasattr(tokenizer, "to_str"):  # an HF `tokenizers` tokenizer (code)
        files.append(write_new_text(out / "tokenizer.json", tokenizer.to_str(), True))
    print(f"{d.name}: exported {run.path} as LlamaForCausalLM to {out} ({len(files)} files)")
    return {"out": str(out), "files": [str(f) for f in files]}
