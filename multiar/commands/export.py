"""Commands that turn a run into other forms: `multiar quantize` (int8 or int4 weights stored in the run,
with the validation perplexity of the quantized model next to fp32's, on eval's documents) and `multiar export format=hf` (a
transformers `LlamaForCausalLM` folder, for serving on existing engines)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from multiar.engine.hf_format import llama_config, to_llama_state
from multiar.files import write_new_file, write_new_text
from multiar.run_folder import load_run
from multiar.schema import validate

log = logging.getLogger("multiar")


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
    if (tokenizer := d.hf_tokenizer_json()) is not None:  # an HF `tokenizers` tokenizer (code)
        files.append(write_new_text(out / "tokenizer.json", tokenizer, True))
    print(f"{d.name}: exported {run.path} as LlamaForCausalLM to {out} ({len(files)} files)")
    return {"out": str(out), "files": [str(f) for f in files]}
