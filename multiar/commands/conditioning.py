"""What a user conditions samples on beyond the prompt: control tags, a length window in the domain's
units, and a template whose chosen positions are kept. Turns `multiar generate` keys into prompt rows,
logits processors and per-row length caps; knows no domain beyond the protocol."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from multiar.data.fim import infill_prompt
from multiar.domain import Domain
from multiar.engine.sampling import LogitsProcessor, force_tokens, min_new_tokens
from multiar.errors import ConfigError
from multiar.tags import Tagged


def parse_positions(text: str, length: int) -> list[int]:
    """1-based positions from '1-20,45,60-70', each within 1..length; ConfigError naming a bad part."""
    positions: set[int] = set()
    for part in (p.strip() for p in str(text).split(",")):
        lo, sep, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ConfigError(f"fixed: {part!r} is not a position or a range like 60-70") from None
        if not 1 <= a <= b <= length:
            raise ConfigError(f"fixed: {part!r} is outside the template's positions 1-{length}")
        positions.update(range(a, b + 1))
    return sorted(positions)


def ranges_text(positions: list[int]) -> str:
    """[1, 2, 3, 45] -> '1-3,45'."""
    out, start = [], None
    for i, p in enumerate(positions):
        start = p if start is None else start
        if i + 1 == len(positions) or positions[i + 1] != p + 1:
            out.append(f"{start}-{p}" if p > start else f"{p}")
            start = None
    return ",".join(out)


@dataclass
class Conditions:
    """Prompt rows and what shapes their continuation."""

    rows: list[list[int]]  # BOS, tag ids, prompt ids
    processors: list[LogitsProcessor] = field(default_factory=list)
    max_new_tokens: int = 256
    caps: list[int | None] = field(default_factory=list)  # per row: most new tokens to keep (max_len)
    tags: str = ""
    kept: str = ""  # fixed template positions, as ranges
    infill: tuple[list[int], list[int]] | None = None  # prefix and suffix ids around the gap


FILL = "<FILL>"


def infill_sides(cfg: DictConfig) -> tuple[str, str] | None:
    """(prefix, suffix) text of a fill-in-the-middle request: prompt_prefix/prompt_suffix, or the text
    around the one <FILL> in cfg.infill's file; None when none was asked for."""
    if cfg.infill is not None:
        path = Path(cfg.infill).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"infill: {path}: {getattr(err, 'strerror', None) or err}") from None
        if text.count(FILL) != 1:
            raise ConfigError(
                f"infill: {path}: needs exactly one {FILL} marking the gap, found {text.count(FILL)}"
            )
        before, after = text.split(FILL)
        return before, after
    if cfg.prompt_prefix is None and cfg.prompt_suffix is None:
        return None
    return cfg.prompt_prefix or "", cfg.prompt_suffix or ""


def conditions(cfg: DictConfig, domain: Domain, prompts: list[list[int]]) -> Conditions:
    """Rows (prompts with the tags after BOS), the length window and fixed positions of cfg."""
    tag_ids = _check_conditions(cfg, domain, prompts)
    out = Conditions(
        [p[:1] + tag_ids + p[1:] if p[:1] == [domain.bos_id] else p for p in prompts],
        max_new_tokens=cfg.max_new_tokens,
    )
    if (sides := infill_sides(cfg)) is not None:
        if domain.fim_ids is None:
            raise ConfigError(
                f"infill: {cfg.run} was trained without fill-in-the-middle (train with domain.settings.fim_rate=0.5)"
            )
        prefix, suffix = (domain.prompt_ids(t)[1:] if t else [] for t in sides)
        out.rows = [[domain.bos_id, *tag_ids, *infill_prompt(prefix, suffix, domain.fim_ids)]]
        out.infill = (prefix, suffix)
        if cfg.stop_at is not None:
            raise ConfigError("stop_at: not with fill-in-the-middle (the middle ends at EOS)")
    out.tags = ",".join(domain.tags_of_ids(tag_ids)) if isinstance(domain, Tagged) else ""
    _length_window(cfg, domain, out, head=1 + len(tag_ids))  # BOS and tags: a row's units come after them
    return out


def _check_conditions(cfg: DictConfig, domain: Domain, prompts: list[list[int]]) -> list[int]:
    """The ids of cfg's tags, after checking that the run and the prompts can take cfg's conditions."""
    if cfg.tags is not None and not isinstance(domain, Tagged):
        raise ConfigError(f"tags: {cfg.run} was trained without control tags (train with data.tags=...)")
    tag_ids = domain.tag_ids(cfg.tags) if cfg.tags is not None else []
    positional = cfg.min_len is not None or cfg.max_len is not None or cfg.template is not None
    if positional and not domain.one_token_per_unit:
        raise ConfigError(
            f"min_len/max_len/template count {domain.unit}s, which the {domain.name} domain does not "
            "map one to one to tokens: use min_new_tokens/max_new_tokens"
        )
    if cfg.fixed is not None and cfg.template is None:
        raise ConfigError("fixed: give the template whose positions to keep (template=SEQ)")
    if cfg.template is not None and (cfg.prompt is not None or cfg.prompt_file is not None):
        raise ConfigError("template: a redesign starts from BOS; give template or a prompt, not both")
    # a prompt longer than the model's window comes as its tail alone (generate.fit_prompt), like
    # a training window after a document's first: such windows never hold BOS, tags, or the start
    # that min_len/max_len count from
    cut = any(p[:1] != [domain.bos_id] for p in prompts)
    if cut and (tag_ids or positional):
        key = "tags" if tag_ids else "min_len/max_len"
        raise ConfigError(
            f"{key}: the prompt is longer than the model's window and is continued from its tail, which"
            " training never saw after BOS and tags: give a shorter prompt or fewer max_new_tokens"
        )
    return tag_ids


def _length_window(cfg: DictConfig, domain: Domain, out: Conditions, head: int) -> None:
    """min_len/max_len (a template's length where it gives none) and the template's fixed positions, as
    processors and per-row caps on out; units count a row's ids after its first `head`."""
    min_len, max_len = cfg.min_len, cfg.max_len
    if cfg.template is not None:
        template = domain.prompt_ids(cfg.template)[1:]
        min_len = len(template) if min_len is None else min_len  # a redesign keeps the template's length
        max_len = len(template) if max_len is None else max_len
        if cfg.fixed is not None:
            kept = parse_positions(cfg.fixed, len(template))
            out.processors.append(force_tokens({head + p - 1: template[p - 1] for p in kept}))
            out.kept = ranges_text(kept)
    if min_len is not None and max_len is not None and min_len > max_len:
        raise ConfigError(f"min_len: {min_len} exceeds max_len={max_len}")
    if out.infill is not None and (min_len is not None or max_len is not None):
        raise ConfigError("min_len/max_len: not with fill-in-the-middle (the middle's length is the model's)")
    units = [len(r) - head for r in out.rows]  # prompt units, per row
    if min_len is not None:  # EOS is masked until the row holds min_len units, prompt included
        out.processors.insert(0, min_new_tokens(min_len, head, domain.eos_id))
    if max_len is not None:
        if max_len <= max(units):
            raise ConfigError(
                f"max_len: {max_len} leaves no room after a prompt of {max(units)} {domain.unit}s"
            )
        out.max_new_tokens = max_len - min(units)
        out.caps = [max_len - u for u in units]
    else:
        out.caps = [None] * len(out.rows)
