"""`multiar generate`: load a run, sample with the KV-cache decoder, decode and write the domain's files."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from multiar.domain import write_new_text
from multiar.generate import ban_tokens, generate, min_new_tokens
from multiar.run_folder import load_run
from multiar.schema import validate

log = logging.getLogger("multiar")


def fit_prompt(prompt: list[int], block_size: int, max_new_tokens: int) -> list[int]:
    """BOS + as much of the prompt's end as fits before max_new_tokens in block_size."""
    room = block_size - max_new_tokens  # prompt tokens that fit, BOS included
    if room < 2:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in block_size={block_size}"
        )
    if len(prompt) <= room:
        return prompt
    # keep BOS and the end of a long prompt: the continuation depends most on what comes just before it
    log.warning("prompt of %d tokens cut to its last %d to fit block_size", len(prompt) - 1, room - 1)
    return prompt[:1] + prompt[-(room - 1) :]


def sample_to_files(cfg: DictConfig) -> dict[str, Any]:
    """Sample cfg.n continuations of cfg.prompt from run cfg.run; write files; return a report."""
    cfg = validate("generate", cfg)
    run = load_run(cfg.run, device=cfg.device)
    model, domain = run.model, run.domain
    out_dir = Path(cfg.out if cfg.out else Path("outputs") / domain.name).expanduser()
    prompt = domain.prompt_ids(cfg.prompt)
    prompt = fit_prompt(prompt, model.config.block_size, cfg.max_new_tokens)
    processors = [
        ban_tokens([domain.pad_id, domain.bos_id]),
        min_new_tokens(cfg.min_new_tokens, len(prompt), domain.eos_id),
    ]
    if (constraint := domain.constraint()) is not None:
        processors.append(constraint)
    generator = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
    new_ids: list[list[int]] = []
    for start in range(0, cfg.n, cfg.batch_size):
        rows = min(cfg.batch_size, cfg.n - start)
        idx = torch.tensor([prompt] * rows, dtype=torch.long, device=cfg.device)  # (B, T)
        new_ids += generate(
            model,
            idx,
            cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            eos_id=domain.eos_id,
            processors=processors,
            generator=generator,
        )
    head = prompt[1:] if cfg.include_prompt else []  # prompt without BOS
    decoded = [domain.decode(head + ids) for ids in new_ids]
    artifacts = [artifact for artifact, _ in decoded]
    provenance = {
        "run": str(run.path),
        "seed": cfg.seed,
        "temperature": cfg.temperature,
        "top_k": cfg.top_k,
        "top_p": cfg.top_p,
        "max_new_tokens": cfg.max_new_tokens,
    }
    paths = domain.write(artifacts, out_dir, provenance, overwrite=cfg.overwrite)
    report = {
        "domain": domain.name,
        "files": [str(p) for p in paths],
        "samples": len(artifacts),
        "prompt": cfg.prompt,
        "provenance": provenance,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),  # the only time stamp written
        "metrics": {
            f"{domain.name}/new_tokens_mean": sum(map(len, new_ids)) / max(len(new_ids), 1),
            f"{domain.name}/dropped_tokens": sum(d for _, d in decoded),
            **domain.metrics(artifacts),
        },
    }
    write_new_text(out_dir / "generate.json", json.dumps(report, indent=1) + "\n", overwrite=cfg.overwrite)
    print(f"{domain.name}: wrote {len(paths)} file(s) for {len(artifacts)} samples to {out_dir}")
    for key, value in report["metrics"].items():
        print(f"  {key} = {value:.4g}")
    return report
