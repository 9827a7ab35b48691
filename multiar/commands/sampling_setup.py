"""How generate samples: the model as sampling uses it (quantized, bf16, packed or compiled), the
speculative draft, the decoder's keyword settings (processors, stops, generator), the stop text and
rule, and the provenance every file records."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from multiar.commands.conditioning import Conditions
from multiar.domain import (
    Domain,
    StopRules,
    domain_state_digest,
)
from multiar.engine.choice_cache import cache_root
from multiar.engine.decode_choice import DecodeChoice
from multiar.engine.layout import prepare_for_decoding
from multiar.engine.model import GPT
from multiar.engine.quantize import load_quantized, quantize
from multiar.engine.sampling import ban_tokens, repetition_penalty
from multiar.errors import ConfigError
from multiar.run_folder import Run, load_run
from multiar.schema import compile_setting
from multiar.tags import Tagged

log = logging.getLogger("multiar")

_ESCAPE = re.compile(r"\\(u[0-9a-fA-F]{4}|u|[ntr\\])")


_ESCAPED = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def stop_text(text: str) -> str:
    r"""cfg.stop as the text it stands for: \n, \t, \r, \\ and \uXXXX are read as escapes (a command
    line cannot hold a newline); any other backslash, and every other character, stays as typed.
    Prompts are never unescaped."""

    def escape(match: re.Match) -> str:
        code = match.group(1)
        if code == "u":
            raise ConfigError(f"stop: {text!r}: \\u needs four hex digits (like \\u000a)")
        return chr(int(code[1:], 16)) if code.startswith("u") else _ESCAPED[code]

    return _ESCAPE.sub(escape, text)


def stop_sequences(cfg: DictConfig, domain: Domain) -> list[list[int]]:
    """Token-id stop sequences: cfg.stop_ids as given, and cfg.stop's text (escapes read) encoded by
    the domain."""
    stops = [list(s) for s in cfg.stop_ids]
    if cfg.stop is not None:
        text = stop_text(cfg.stop)
        try:
            ids = domain.prompt_ids(text)[1:]  # without BOS
        except (ValueError, OSError) as err:
            raise ConfigError(f"stop: the {domain.name} domain cannot encode {text!r} ({err})") from None
        stops.append(ids)
    return stops


def cache_dir() -> Path:
    """Where measured sampling choices are kept: $MULTIAR_CACHE, else ~/.cache/multiar."""
    return cache_root()


def sampling_model(
    run: Run,
    mode: str | None,
    dtype: str,
    compile: bool | str = False,
    *,
    layout: str = "auto",
    batch_size: int = 1,
    kernels: dict[str, str] | None = None,
    steps: int | None = None,
    decided: bool | None = None,
    gemms: str | None = None,
) -> tuple[GPT, DecodeChoice]:
    """The run's model as sampling should use it, and how it is laid out: int8/int4 weights (the run's
    stored copy when it matches, else converted now), each layer shape on its fastest kernel; or float
    weights in the dtype and layout (nn.Linear or oneDNN-packed) that decode fastest here at batch_size
    (measured once, cached in $MULTIAR_CACHE/decode_layout.json; dtype= and layout= pin them; kernels:
    a quantized model's, pinned as a resumed run's journal names them; compile: True, False or "auto",
    compiled when that pays for a job of `steps` decode steps; decided and a compiled CPU step's gemms:
    a resumed run's, pinned)."""
    model = run.model
    if mode is not None:
        source = run.path / "model.safetensors"
        model = load_quantized(model, run.path, source, mode) or quantize(model, mode)
    model, choice = prepare_for_decoding(
        model,
        batch_size=batch_size,
        dtype=dtype,
        layout=layout,
        cache_dir=cache_dir(),
        compile=compile,
        steps=steps,
        kernels=kernels,
        decided=decided,
        gemms=gemms,
    )
    log.info("%s", choice.log_line())
    return model, choice


def same_tokenizer(a: Domain, b: Domain) -> bool:
    """Whether two domains map text to the same ids: equal tokenizer files, whatever the pieces each
    was trained on, or for a fixed vocabulary (no trained tokenizer, like protein's alphabet) equal
    size and special ids."""
    tags = [d.tags if isinstance(d, Tagged) else None for d in (a, b)]
    if tags[0] != tags[1] or a.tokenizer_files != b.tokenizer_files:  # control tags are ids too
        return False
    if not a.tokenizer_files:
        return (a.vocab_size, a.pad_id, a.bos_id, a.eos_id) == (b.vocab_size, b.pad_id, b.bos_id, b.eos_id)
    # the tokenizer's files alone: the rest of the saved state is about the training data
    return domain_state_digest(a, a.tokenizer_files) == domain_state_digest(b, b.tokenizer_files)


def load_draft(cfg: DictConfig, run: Run) -> GPT | str | None:
    """The speculative draft: "ngram", or a run whose domain and tokenizer are exactly the target's."""
    if cfg.draft is None or cfg.draft == "ngram":
        return cfg.draft
    draft = load_run(cfg.draft, device=cfg.device)
    if draft.domain.name != run.domain.name:
        raise ConfigError(f"draft: {cfg.draft} is a {draft.domain.name} run; the target is {run.domain.name}")
    if not same_tokenizer(draft.domain, run.domain):
        raise ConfigError(
            f"draft: {cfg.draft} has another tokenizer than {cfg.run}: train it on the same one"
        )
    compile = compile_setting(cfg.compile) is True  # a draft's steps are too few to repay compile=auto
    model, _ = sampling_model(
        draft, cfg.quantize, cfg.dtype, compile, layout=cfg.layout, batch_size=cfg.batch_size
    )
    return model


def stop_rule(cfg: DictConfig, domain: Domain) -> Callable[[str, int, bool], int | None] | None:
    """The domain's rule for cfg.stop_at (where a sample's text ends), or None; ConfigError when the
    domain has no such rule."""
    if cfg.stop_at is None:
        return None
    if not isinstance(domain, StopRules):
        raise ConfigError(f"stop_at: the {domain.name} domain has no stopping rules")
    try:
        return domain.stop_rule(cfg.stop_at)
    except ValueError as err:  # an unknown rule's name; any other error is a bug in the domain's rule
        raise ConfigError(f"stop_at: {err}") from None


def sampling_settings(
    cfg: DictConfig, run: Run, domain: Domain, cond: Conditions
) -> tuple[dict[str, Any], GPT | str | None]:
    """The keyword settings every decoder call gets (processors, stops, generator) and the draft."""
    stops = stop_sequences(cfg, domain)
    processors = [ban_tokens([domain.pad_id, domain.bos_id])]
    if cfg.constrain and (constraint := domain.constraint()) is not None:
        processors.append(constraint)
    elif isinstance(domain, Tagged):  # unconstrained, tags are still never sampled
        processors.append(ban_tokens(range(domain.first_tag_id, domain.vocab_size)))
    processors += cond.processors  # length window, then forced positions: they have the last word
    generator = torch.Generator(device=cfg.device).manual_seed(cfg.seed)  # generate seeds one per sample
    draft = load_draft(cfg, run)
    if cfg.repetition_penalty != 1.0:
        processors.insert(0, repetition_penalty(cfg.repetition_penalty, cfg.repetition_window))
    settings = dict(
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        min_p=cfg.min_p,
        eos_id=domain.eos_id,
        stop=stops,
        min_new_tokens=cfg.min_new_tokens,
        processors=processors,
        generator=generator,
    )
    return settings, draft


def provenance_for(cfg: DictConfig, run: Run, cond: Conditions, options: dict[str, Any]) -> dict[str, Any]:
    """What every written file records about how it was sampled, in a fixed key order."""
    provenance = {
        "run": str(run.path),
        "seed": cfg.seed,
        "temperature": cfg.temperature,
        "top_k": cfg.top_k,
        "top_p": cfg.top_p,
        "max_new_tokens": cond.max_new_tokens,
    }
    for key, off in (
        ("min_p", 0.0),
        ("repetition_penalty", 1.0),
        ("quantize", None),
        ("draft", None),
        ("min_len", None),
        ("max_len", None),
        ("constrain", True),
    ):
        if cfg[key] != off:  # settings that are on go into every file's provenance
            provenance[key] = cfg[key]
    provenance.update(options)  # the domain's own options that are set (music: prompt_bars)
    return provenance
