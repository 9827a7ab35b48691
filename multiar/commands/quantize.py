"""`multiar quantize`: int8 or int4 weights stored in the run, with the validation perplexity of the quantized
model next to fp32's on `multiar eval`'s documents."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from multiar.commands.sampling_setup import cache_dir
from multiar.data.reference import reference_documents
from multiar.engine.choice_cache import CACHE_FILE
from multiar.engine.quantize import quantize, quantized_file, save_quantized
from multiar.engine.quantized_prefill import choose_prefill
from multiar.engine.scoring import score_documents, summary
from multiar.files import write_new_text
from multiar.run_folder import load_run
from multiar.schema import validate


def quantize_run(cfg: DictConfig) -> dict[str, Any]:
    """Quantize run cfg.run to cfg.mode, write model.<mode>.safetensors into it, and report the perplexity
    of the fp32 and the quantized model on the run's validation documents (reference/, scored as
    trained: the same documents and figures as `multiar eval`). A run trained before reference/ existed
    is quantized all the same; its report says the perplexity was not measured, and why."""
    cfg = validate("quantize", cfg)
    run = load_run(cfg.run, device=cfg.device)
    d = run.domain
    limit = None if cfg.eval_batches is None else cfg.eval_batches * cfg.batch_size
    try:
        docs = reference_documents(run.path, d).head(limit)
    except FileNotFoundError as err:
        docs, missing = None, str(err).split(": retrain")[0]
    fp32 = docs and summary(
        score_documents(run.model, docs, d.bos_id, d.eos_id, cfg.batch_size), docs, d.unit
    )
    model = quantize(run.model, cfg.mode)
    path = save_quantized(model, run.path, run.path / "model.safetensors", mode=cfg.mode)
    report: dict[str, Any] = {"mode": cfg.mode, "file": str(path)}
    if docs is None:
        report["val_ppl"] = f"not measured: {missing}"
        print(f"{d.name}: {quantized_file(cfg.mode)} written; validation ppl not measured ({missing})")
    else:
        # its layers score many rows a call: on the kernel, the operator or dense, as sampling's prefill does
        report |= choose_prefill(model, cache_dir() / CACHE_FILE)
        low = summary(score_documents(model, docs, d.bos_id, d.eos_id, cfg.batch_size), docs, d.unit)
        report |= {
            "val_documents": fp32["documents"],
            "val_tokens": fp32["tokens"],
            "val_ppl_fp32": fp32["ppl"],
            f"val_ppl_{cfg.mode}": low["ppl"],
            "ppl_change": math.exp(low["loss"] - fp32["loss"]) - 1,
        }
        print(
            f"{d.name}: {quantized_file(cfg.mode)} written; validation ppl fp32 {fp32['ppl']:.4f}, "
            f"{cfg.mode} {low['ppl']:.4f} ({100 * report['ppl_change']:+.2f}%) over "
            f"{fp32['documents']} documents, {fp32['tokens']} tokens"
        )
    write_new_text(Path(run.path) / "quantize.json", json.dumps(report, indent=1) + "\n", overwrite=True)
    return report
