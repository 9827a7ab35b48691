"""`multiar quantize`: a run's weights as int8, stored in the run, with the validation perplexity of the
quantized model next to fp32's on the run's own validation split."""

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
from multiar.domain import write_new_text
from multiar.model import GPT
from multiar.quantize import INT8_FILE, quantize, save_quantized
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
    """Quantize run cfg.run to cfg.mode, write model.int8.safetensors into it, report validation ppl."""
    cfg = validate("quantize", cfg)
    run = load_run(cfg.run, device=cfg.device)
    fp32_loss, tokens = validation_loss(run.model, run, cfg.eval_batches, cfg.batch_size)
    model = quantize(run.model, cfg.mode)
    path = save_quantized(model, run.path, run.path / "model.safetensors")
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
        f"{run.domain.name}: {INT8_FILE} written; validation ppl fp32 {report['val_ppl_fp32']:.4f}, "
        f"{cfg.mode} {report[f'val_ppl_{cfg.mode}']:.4f} ({100 * report['ppl_change']:+.2f}%) over {tokens} tokens"
    )
    return report
