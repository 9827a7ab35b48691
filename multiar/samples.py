"""Fresh samples of a domain from BOS through the real sampling path (its grammar constraint included), and
their domain metrics: what training logs as it goes and what `multiar eval` reports."""

from __future__ import annotations

from typing import Any

import torch

from multiar.domain import Domain
from multiar.engine.decode import generate
from multiar.engine.model import GPT
from multiar.engine.sampling import ban_tokens


def unprompted_samples(
    model: GPT, domain: Domain, n: int, max_new_tokens: int, temperature: float = 1.0, seed: int = 0
) -> tuple[list[Any], dict[str, float]]:
    """n samples from BOS through the real sampling path (the domain's constraint included), decoded;
    and their metrics: what training logs as it goes and what eval reports."""
    processors = [ban_tokens([domain.pad_id, domain.bos_id])]
    if (constraint := domain.constraint()) is not None:
        processors.append(constraint)
    prompt = domain.prompt_ids(None)
    new = generate(
        model,
        prompts=[prompt] * n,
        max_new_tokens=min(max_new_tokens, model.config.block_size - len(prompt)),
        temperature=temperature,
        eos_id=domain.eos_id,
        processors=processors,
        generator=torch.Generator(device=model.wte.weight.device).manual_seed(seed),
    )
    decoded = [domain.decode(prompt[1:] + ids) for ids in new]
    artifacts = [a for a, _ in decoded]
    metrics = {
        f"{domain.name}/dropped_tokens": float(sum(d for _, d in decoded)),
        f"{domain.name}/new_tokens_mean": sum(map(len, new)) / n,
        **domain.metrics(artifacts),
    }
    return artifacts, metrics
