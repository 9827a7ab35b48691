"""What a generate run holds once every check has passed (Prepared): the model, the work, the settings,
the files it fills and its tally."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from multiar.commands.conditioning import Conditions
from multiar.commands.progress import Progress
from multiar.commands.sampling_plan import Work
from multiar.commands.tally import Tally
from multiar.domain import (
    Domain,
    SampleFiles,
)
from multiar.engine.decode_choice import DecodeChoice
from multiar.engine.model import GPT
from multiar.files import Appender


@dataclass
class Prepared:
    """What sampling needs once every check has passed: the model, the work, the settings, the files
    to fill and the tally (a resumed run's, where it goes on)."""

    cfg: DictConfig
    domain: Domain
    model: GPT
    out_dir: Path
    prompts: list[list[int]]  # per prompt, as the model continues it (fit_prompt)
    work: Work
    cond: Conditions
    settings: dict[str, Any]
    streaming: dict[str, Any]  # settings plus window_starts, for stream
    draft: GPT | str | None
    rule: Callable[[str, int, bool], int | None] | None
    stop: str | None
    provenance: dict[str, Any]
    device: torch.device
    files: SampleFiles
    listing: Appender  # every file written, a line each (the report's list, read once at the end)
    tally: Tally
    digest: str
    progress: Progress
    ranks: Appender | None = None  # rank_by=ppl without top: (ppl, index) of each passing sample, spilled
    decode: DecodeChoice | None = None  # how the model is laid out (engine.layout)
