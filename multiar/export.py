"""Commands that turn a run into other forms: `multiar quantize` (int8 or int4 weights stored in the run,
with the validation perplexity of the quantized model next to fp32's, on eval's documents) and `multiar export format=hf` (a
transformers `LlamaForCausalLM` folder, for serving on existing engines)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from multiar.domain import write_new_file, write_new_text
from multiar.hf_format import llama_config, to_llama_state
from multiar.quantize import quantize, quantized_file, save_quantized
from multiar.reference import reference_documents
from multiar.run_folder import load_run
from multiar.schema import validate
from multiar.scoring import score_documents, summary

log = logging.getLogger("multiar")


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
