"""Commands that turn a run into other forms: `multiar quantize` (int8 or int4 weights stored in the run,
with the validation perplexity of the quantized model next to fp32's, on eval's documents), `multiar export format=hf` (a
transformers `LlamaForCausalLM` folder, for serving on existing engines) and `multiar export format=gguf`
(one llama-architecture GGUF file for llama.cpp and what builds on it; gguf_type f32, f16, bf16, q8_0)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from multiar.engine.gguf_format import Vocabulary, bpe_vocabulary, write_gguf
from multiar.engine.hf_format import llama_config, to_llama_state
from multiar.files import write_new_file, write_new_text
from multiar.run_folder import Run, load_run
from multiar.schema import validate

log = logging.getLogger("multiar")


def export_run(cfg: DictConfig) -> dict[str, Any]:
    """Write run cfg.run as a transformers LlamaForCausalLM folder (format=hf) or one GGUF file
    (format=gguf) at cfg.out."""
    from safetensors.torch import save_file

    cfg = validate("export", cfg)
    run = load_run(cfg.run)
    if cfg.format == "gguf":
        return export_gguf(run, Path(cfg.out).expanduser(), cfg.gguf_type, cfg.overwrite)
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
    if (tokenizer := d.hf_tokenizer_json()) is not None:  # an HF `tokenizers` tokenizer (code)
        files.append(write_new_text(out / "tokenizer.json", tokenizer, True))
    print(f"{d.name}: exported {run.path} as LlamaForCausalLM to {out} ({len(files)} files)")
    return {"out": str(out), "files": [str(f) for f in files]}


def export_gguf(run: Run, out: Path, kind: str, overwrite: bool) -> dict[str, Any]:
    """Write run as one llama-architecture GGUF file at out (weights of type kind), with the domain's
    tokenizer where GGUF holds it (a byte-level BPE: code), else ids only (tokenizer model "none")."""
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists (pass overwrite=true to replace it)")
    d = run.domain
    size = run.model.config.vocab_size
    ids = {"bos": d.bos_id, "eos": d.eos_id, "pad": d.pad_id}
    tokenizer = d.hf_tokenizer_json()
    vocab = (bpe_vocabulary(tokenizer, size, ids) if tokenizer is not None else None) or Vocabulary(
        size, d.bos_id, d.eos_id, d.pad_id
    )
    meta = {"name": run.path.name, "domain": d.name, "source": "multiar"}
    meta |= {f"{k}_token_id": str(v) for k, v in ids.items() if v is not None}
    write_new_file(out, lambda tmp: write_gguf(run.model, tmp, kind, vocab, meta), overwrite)
    what = "gpt2-style BPE tokenizer" if vocab.tokens is not None else "no tokenizer: feed token ids"
    print(f"{d.name}: exported {run.path} as a llama GGUF ({kind}, {what}) to {out}")
    return {"out": str(out), "files": [str(out)], "gguf_type": kind}
