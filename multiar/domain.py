"""The Domain protocol every data type implements, and the few helpers all domains share.

A domain turns files into token ids and ids back into files; everything generic (packing, training,
sampling, checkpoints) lives once in `multiar/`. Helpers here: walking input paths, skipping and
counting bad input, and writing outputs atomically without clobbering.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from multiar.engine.sampling import LogitsProcessor

log = logging.getLogger("multiar")

Record = Any  # what a domain reads: a symusic Score, a Bio SeqRecord, a source string
Artifact = Any  # what a domain decodes to and writes


FIM_TOKENS = ("<fim_prefix>", "<fim_middle>", "<fim_suffix>")


@runtime_checkable
class Domain(Protocol):
    name: ClassVar[str]  # one string: registry key, conf/domain/<name>.yaml, metric prefix, output folder
    suffixes: ClassVar[tuple[str, ...]]  # file endings it reads, lower case
    unit: ClassVar[str]  # the domain's natural unit for bits/perplexity: byte, residue, note
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def default_paths(self, corpus: str | None = None) -> list[Path]:
        """The bundled data used when the user gives no data.paths: corpus names one (data.corpus;
        None is the default one); ValueError naming the known ones for another name."""

    def read(self, path: Path) -> Iterator[Record]:
        """Records in one file; raises ValueError or OSError with a clear reason on a bad file, and
        nothing else: library errors (zlib, MIDI parsers) are turned into ValueError."""

    def from_value(self, value: Any, key: str) -> Record:
        """A record from one value of an HF dataset column (text, a sequence, MIDI bytes or a path);
        ValueError when the value is no record of this domain."""

    def content(self, record: Record) -> bytes:
        """The document's content as bytes: two records with equal content are duplicates, dropped before
        the split. Raises ValueError for a record that is no usable document (empty, letters outside
        the alphabet): it is skipped and counted before the split, so it cannot empty a split."""

    def units(self, record: Record) -> int:
        """How many natural units (see `unit`) the record holds: eval reports bits per unit with it."""

    def fit(self, records: Iterable[Record]) -> None:
        """Learn tokenizer state from training records (no-op for fixed vocabularies)."""

    def encode(self, record: Record) -> list[int]:
        """Token ids of one record, without BOS/EOS; raises ValueError on a record it cannot encode."""

    def prompt_ids(self, prompt: str | None) -> list[int]:
        """BOS followed by the encoded prompt (a file path or a literal, per domain)."""

    def decode(self, ids: list[int]) -> tuple[Artifact, int]:
        """Artifact from model output, and how many tokens were dropped or repaired; never raises."""

    def write(
        self,
        artifacts: Sequence[Artifact],
        out_dir: Path,
        provenance: dict,
        overwrite: bool = False,
        start: int = 0,
    ) -> list[Path]:
        """Write artifacts as samples start, start+1, ... under out_dir; refuses to replace existing files
        unless overwrite. With start > 0 a domain that keeps one file for all samples extends the one
        this run wrote for samples 0..start-1 (so finished samples are on disk as they come)."""

    def metrics(self, artifacts: Sequence[Artifact]) -> dict[str, float]:
        """Domain metrics, each key prefixed with '<name>/'."""

    def constraint(self) -> LogitsProcessor | None:
        """A grammar mask for sampling, or None."""

    def save(self, directory: Path) -> None:
        """Write the tokenizer state so that load() rebuilds an identical domain."""

    # Optional, where a domain has them (looked up with hasattr):
    #   fields(record) -> dict[str, str]          header fields: the source of data.tags=header:FIELD
    #   one_token_per_unit: bool                  lengths/positions in units are token counts (min_len,
    #                                             max_len, template/fixed)
    #   assess(artifacts, details, settings)      per-sample columns into details (novelty, filters:
    #       -> dict[str, float]                   `passes`), and their summary metrics
    #   report(artifacts, details, out_dir, overwrite, provenance) -> list[Path]
    #                                             files about the whole set (CSV, plots); a domain with
    #                                             it also takes write(..., details=) per sample
    #   window_starts: list[bool]                 per id: a training window or a cut prompt may start
    #                                             there (music: a bar's first token)
    #   check_augment(spec), augment(record, spec) -> [(suffix, record)]
    #                                             data.augment: shifted copies of training records
    #   token_errors(ids) -> int                  errors by the tokenizer's own count (generate reports
    #                                             <name>/token_error_rate over the sampled tokens)
    #   prompt_ids(prompt, bars=N)                prompt_bars: only the prompt's first N bars
    #   render(path, out, soundfont, overwrite)   render=wav: audio beside a written file
    #   prompt_meta(prompt, bars=None) -> Any     what a sample keeps from its prompt beyond the tokens
    #                                             (music: tempos, time signatures the tokens lack)
    #   with_prompt_meta(artifact, meta, whole)   applies it to one sample (no state on the domain)
    #   filter_keys: tuple[str, ...]              the filters.* keys assess reads (checked before sampling)


def domain_state_digest(domain: Domain, only: Sequence[str] = ()) -> str:
    """A hash of the domain's saved state: two domains with the same digest encode alike. only: hash just
    these files of it (the tokenizer's, leaving out training statistics), where the domain saves any."""
    with tempfile.TemporaryDirectory() as tmp:
        domain.save(Path(tmp) / "domain")
        files = sorted(f for f in (Path(tmp) / "domain").rglob("*") if f.is_file())
        chosen = [f for f in files if f.name in only]
        h = hashlib.sha256()
        for f in chosen or files:
            h.update(f.relative_to(tmp).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()
