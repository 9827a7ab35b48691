"""The work generate does, as a function of the sample index (nothing built per sample): the prompts as
the model continues them (fit_prompt) and as the files hold them, their conditions and caps."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from multiar.commands.conditioning import Conditions, conditions
from multiar.commands.sampling_checks import read_prompt_file
from multiar.domain import (
    Domain,
    PromptMeta,
    WindowStarts,
)
from multiar.engine.decode import window_tail
from multiar.engine.model import GPT

log = logging.getLogger("multiar")


def fit_prompt(
    prompt: list[int], block_size: int, max_new_tokens: int, starts: Sequence[bool] | None = None
) -> list[int]:
    """The prompt (BOS + ids) as given when it fits before max_new_tokens in block_size; else its end,
    cut as a training window after a document's first is: no BOS, and (starts: per id, the domain's
    window_starts) beginning at such an id (music: a bar line, never inside a note's tokens). Past
    block_size // 2 new tokens the window slides anyway, so the prompt keeps at least half the block."""
    room = block_size - min(max_new_tokens, block_size // 2)  # prompt tokens that fit
    if room < 2:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in block_size={block_size}"
        )
    if len(prompt) <= room:
        return prompt
    # the end of a long prompt: the continuation depends most on what comes just before it
    tail = window_tail(prompt, room, starts)
    if starts is not None and not (0 <= tail[0] < len(starts) and starts[tail[0]]):
        raise ValueError(
            f"prompt: no bar line in its last {room} tokens to cut it at (a bar longer than the room"
            " the model's block leaves): use fewer max_new_tokens or prompt_bars=N"
        )
    log.warning(
        "prompt of %d tokens: the model continues its last %d (block_size %d); files with the prompt"
        " (include_prompt) hold all of it",
        len(prompt) - 1,
        len(tail),
        block_size,
    )
    return tail


@dataclass
class Work:
    """The samples to draw, as a function of their index (nothing is built per sample): sample i
    continues prompt i // n."""

    rows: list[list[int]]  # per prompt: what the model continues (BOS, tags, prompt; or a long one's tail)
    heads: list[list[int]]  # per prompt: its whole prompt without BOS, as the files hold it
    prompts: list[list[int]]  # per prompt: what stop rules and token errors see before the sample
    caps: list[int | None]  # per prompt: most new tokens to keep (max_len)
    metas: list[Any] | None  # per prompt: what the domain carries from it into the file (prompt_meta)
    n: int

    @property
    def total(self) -> int:
        return len(self.rows) * self.n

    def batches(self, start: int, size: int) -> Iterator[range]:
        """The queue of work from sample start on, batch by batch: an iterator, however large n is."""
        for first in range(start, self.total, size):
            yield range(first, min(first + size, self.total))


def plan_work(
    cfg: DictConfig, domain: Domain, model: GPT, texts: list, options: dict
) -> tuple[Work, Conditions]:
    """The prompts as the model continues them and the files hold them, their conditions: the work."""
    starts = domain.window_starts if isinstance(domain, WindowStarts) else None
    whole = [domain.prompt_ids(t, **options) for t in texts]
    prompts = [fit_prompt(p, model.config.block_size, cfg.max_new_tokens, starts) for p in whole]
    # what each sample keeps from its own prompt beyond the tokens (music: tempos), per prompt
    metas = [domain.prompt_meta(t, **options) for t in texts] if isinstance(domain, PromptMeta) else None
    cond = conditions(cfg, domain, prompts)
    heads = [p[1:] for p in whole]  # each prompt whole, as the files hold it
    seen = [r[1:] for r in cond.rows] if cond.infill is not None else heads
    return Work(cond.rows, heads, seen, list(cond.caps), metas, cfg.n), cond


def texts_or(cfg: DictConfig) -> list[str | None]:
    return read_prompt_file(cfg.prompt_file) if cfg.prompt_file else [cfg.prompt]
