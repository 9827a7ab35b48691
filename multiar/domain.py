"""The Domain protocol every data type implements, DomainBase's defaults, and the capability protocols.

A domain turns files into token ids and ids back into files; everything generic (packing, training,
sampling, checkpoints) lives once in `multiar/`. Every part of a domain the core uses is documented
here, once: the required members of `Domain`, the defaults `DomainBase` gives (override where the
domain has the thing), and the capabilities only some domains have (`HeaderFields`, `Augmentable`,
`WindowStarts`, `PromptMeta`, `TokenErrors`, `Renderable`, `StopRules`, `Validity`, `Assessed`),
which the core asks for with isinstance. A new domain subclasses DomainBase and reads nothing else.

`multiar generate` streams: it hands each batch of finished samples to the domain's `SampleFiles`
(`DomainBase.sample_files`: files appended or written once, never re-read) and `MetricSummary`
(`DomainBase.metric_summary`: set-level metrics accumulated as samples come, figures drawn once at
the end), so a run's time is linear and its memory bounded in the number of samples.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, NamedTuple, Protocol, runtime_checkable

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
        """Learn tokenizer state from training records (DomainBase: a fixed vocabulary, nothing to learn)."""

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
        """Domain metrics, each key prefixed with '<name>/' (DomainBase: none)."""

    def constraint(self) -> LogitsProcessor | None:
        """A grammar mask for sampling, or None (DomainBase: None). A check too costly to run over the
        whole vocabulary each step also has `sound(ids, token)` (engine.checked_draw.TokenCheck): the
        decode loop asks it of each token it draws and draws again without a refused one (code)."""

    def save(self, directory: Path) -> None:
        """Write the tokenizer state so that load() rebuilds an identical domain."""

    @classmethod
    def load(cls, directory: Path) -> Domain:
        """The domain save() wrote into directory (the registry calls it for a run's domain/)."""

    # What DomainBase gives every domain (a domain overrides what it has; the core uses them as they are):
    skip_dirs: ClassVar[frozenset[str]]  # folder names find_files skips inside a given tree (code: .git)
    one_token_per_unit: ClassVar[bool]  # lengths/positions in units are token counts (min_len, template)
    tokenizer_files: ClassVar[tuple[str, ...]]  # saved files that decide the ids (a trained tokenizer)
    generate_options: ClassVar[dict[str, GenerateOption]]  # generate keys of this domain alone
    licenses: Mapping[str, str]  # package -> licence of a gathered corpus (code: site-packages)
    fim_ids: tuple[int, int, int] | None  # fill-in-the-middle tokens (prefix, middle, suffix), or None
    fim_rate: float  # share of training documents turned into fill-in-the-middle ones
    fim_spm_rate: float  # of those, the share in suffix-prefix-middle order

    def fit_documents(self, documents: Iterable[tuple[str, Record]]) -> None:
        """fit() from (key, record) pairs: control tags read the keys too."""

    def encode_document(self, key: str, record: Record) -> list[int]:
        """The ids training holds for one document (its key: path relative to the corpus root, '#', index)."""

    def hf_tokenizer_json(self) -> str | None:
        """The tokenizer as an HF `tokenizers` tokenizer.json (export format=hf), or None."""

    def sample_files(self, out_dir: Path, provenance: dict, overwrite: bool) -> SampleFiles:
        """Where generate puts samples batch by batch (DomainBase: `SampleFiles`, write() per batch)."""

    def metric_summary(self) -> MetricSummary:
        """Set-level metrics accumulated batch by batch (DomainBase: `MetricSummary`, batch means)."""


class GenerateOption(NamedTuple):
    """A generate key a domain declares (music: prompt_bars). Its value, when set, goes to the domain's
    prompt_ids and prompt_meta as a keyword argument of the same name, and into the files' provenance."""

    type: type
    default: Any
    help: str
    minimum: int | float | None = None  # a number below it is a ConfigError before sampling


class DomainBase:
    """The defaults of every optional part of a domain: subclass it and write the required members of
    `Domain` (read, encode, decode, write, ...); override a default only where the domain has it, and
    implement a capability protocol below for what only some domains can do."""

    skip_dirs: ClassVar[frozenset[str]] = frozenset()
    one_token_per_unit: ClassVar[bool] = False
    tokenizer_files: ClassVar[tuple[str, ...]] = ()  # none: a fixed vocabulary, compared by its size and ids
    generate_options: ClassVar[dict[str, GenerateOption]] = {}
    licenses: Mapping[str, str] = MappingProxyType({})
    fim_ids: tuple[int, int, int] | None = None
    fim_rate: float = 0.0
    fim_spm_rate: float = 0.5

    def metrics(self, artifacts: Sequence[Artifact]) -> dict[str, float]:
        return {}

    def constraint(self) -> LogitsProcessor | None:
        return None

    def fit(self, records: Iterable[Record]) -> None:
        for _ in records:  # a fixed vocabulary learns nothing; the records are still read through
            pass

    def fit_documents(self, documents: Iterable[tuple[str, Record]]) -> None:
        self.fit(record for _, record in documents)

    def encode_document(self, key: str, record: Record) -> list[int]:
        return self.encode(record)  # type: ignore[attr-defined]

    def hf_tokenizer_json(self) -> str | None:
        return None

    def sample_files(self, out_dir: Path, provenance: dict, overwrite: bool) -> SampleFiles:
        return SampleFiles(self, out_dir, provenance, overwrite)  # type: ignore[arg-type]

    def metric_summary(self) -> MetricSummary:
        return MetricSummary()


class SampleFiles:
    """The files of one generate run, filled batch by batch in sample order: `add` writes a batch's
    samples (DomainBase: the domain's write(..., start=) per batch: one file per sample, written once);
    `sync` puts what was added on disk and returns the size of every file that grows by appending (the
    point a resumed run cuts it back to); `resume` cuts them back; `close` writes what only the whole
    set decides (ranks: sample index -> rank, where generate ranked) and returns the files it wrote.
    A domain that keeps one file for all samples overrides it to append (protein: samples.fasta)."""

    def __init__(self, domain: Domain, out_dir: Path, provenance: dict, overwrite: bool) -> None:
        self.domain, self.out_dir, self.provenance, self.overwrite = (
            domain,
            Path(out_dir),
            provenance,
            overwrite,
        )

    def add(self, artifacts: Sequence[Artifact], start: int, details: Sequence[dict] | None) -> list[Path]:
        # details (each sample's end reason, perplexity, ...) reach write only in an Assessed domain
        extra = (
            {"details": list(details)} if details is not None and isinstance(self.domain, Assessed) else {}
        )
        return self.domain.write(
            artifacts, self.out_dir, self.provenance, self.overwrite, start=start, **extra
        )

    def sync(self) -> dict[str, int]:
        return {}

    def resume(self, sizes: dict[str, int]) -> None:
        """Cut every appended file back to its size at the last sync (a killed run's tail goes)."""
        self.overwrite = True  # files of samples past the resume point are this run's own: redrawn

    def close(self, ranks: Mapping[int, int]) -> list[Path]:
        return []


class MetricSummary:
    """Set-level metrics of generate's samples, accumulated batch by batch so that no sample is kept.
    DomainBase: the domain's metrics() of each batch, averaged weighted by the batch's size (exact for
    metrics that are means or shares over samples). A domain whose metrics are no plain means (a
    median, a distance between distributions) overrides add and metrics; `files` draws the figures
    about the whole set once at the end. Holds plain data only: generate pickles it to resume."""

    def __init__(self) -> None:
        self.count = 0
        self.sums: dict[str, float] = {}

    def add(self, domain: Domain, artifacts: Sequence[Artifact], details: Sequence[dict]) -> None:
        for key, value in domain.metrics(artifacts).items():
            self.sums[key] = self.sums.get(key, 0.0) + value * len(artifacts)
        self.count += len(artifacts)

    def metrics(self, domain: Domain) -> dict[str, float]:
        return {key: total / max(self.count, 1) for key, total in self.sums.items()}

    def files(self, domain: Domain, out_dir: Path, overwrite: bool, provenance: dict) -> list[Path]:
        return []


# Capabilities only some domains have. The core asks isinstance(domain, Capability) before it uses
# one, and says which domain lacks it when a key needs it; Tagged has exactly its base's.


@runtime_checkable
class HeaderFields(Protocol):
    """Records with header fields: the source of data.tags=header:FIELD (protein: UniProt's OS, OX)."""

    def fields(self, record: Record) -> dict[str, str]: ...


@runtime_checkable
class Augmentable(Protocol):
    """data.augment: shifted copies of training records (music: transpositions)."""

    def check_augment(self, spec: Any) -> None:
        """ValueError naming the data.augment key that is wrong."""

    def augment(self, record: Record, spec: dict[str, Any]) -> list[tuple[str, Record]]:
        """(key suffix, record) per copy."""


@runtime_checkable
class WindowStarts(Protocol):
    """Per id: whether a training window or a cut prompt may start there (music: a bar's first token)."""

    window_starts: list[bool]


@runtime_checkable
class PromptMeta(Protocol):
    """What a sample keeps from its prompt beyond the tokens (music: tempos, time signatures the tokens lack)."""

    def prompt_meta(self, prompt: str | None, **options: Any) -> Any:
        """The meta of one prompt (options: the domain's generate_options that are set), or None."""

    def with_prompt_meta(self, artifact: Artifact, meta: Any, whole: bool = True) -> Artifact:
        """A copy of one sample with it (whole=False: a file without the prompt); no state on the domain."""


@runtime_checkable
class TokenErrors(Protocol):
    """Errors by the tokenizer's own count: generate reports <name>/token_error_rate over the sampled tokens."""

    def token_errors(self, ids: list[int]) -> int: ...


@runtime_checkable
class Renderable(Protocol):
    """render=wav: audio beside a written file (music)."""

    def render(
        self, path: Path, out: Path, soundfont: str | None = None, overwrite: bool = False
    ) -> Path: ...


@runtime_checkable
class StopRules(Protocol):
    """stop_at=NAME: where a sample's text ends (code: block)."""

    def stop_rule(self, name: str) -> Callable[[str, int, bool], int | None]:
        """The rule (text, prompt length, final) -> end or None; ValueError naming the known ones."""


@runtime_checkable
class Validity(Protocol):
    """resample_invalid: whether a sample is valid (code: it parses)."""

    def valid(self, artifact: Artifact) -> bool: ...


@runtime_checkable
class Assessed(Protocol):
    """Per-sample judgement (protein): columns and filters, files about the whole set; such a domain
    also takes write(..., details=) per sample."""

    filter_keys: tuple[str, ...]  # the filters.* keys assess reads (checked before sampling)

    def assess(
        self, artifacts: Sequence[Artifact], details: list[dict], settings: dict, start: int = 0
    ) -> dict[str, float]:
        """Per-sample columns into details (novelty, `passes`), and their summary metrics; generate
        calls it once per batch (start: the batch's first sample index), so anything costly to set up
        (protein's novelty index) is built once and kept; its metrics are averaged over the batches,
        weighted by size, unless the domain's MetricSummary gives the key itself."""

    def report(
        self,
        artifacts: Sequence[Artifact],
        details: list[dict],
        out_dir: Path,
        overwrite: bool,
        provenance: dict,
    ) -> list[Path]:
        """Files about the whole set (CSV, plots)."""


CAPABILITIES: tuple[type, ...] = (
    HeaderFields,
    Augmentable,
    WindowStarts,
    PromptMeta,
    TokenErrors,
    Renderable,
    StopRules,
    Validity,
    Assessed,
)


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


def counted_median(counts: Mapping[float, int]) -> float:
    """statistics.median of the values counted (value -> how many; the mean of the two middle values
    for an even count), without listing them: running summaries keep counts, not samples."""
    n, seen, low = sum(counts.values()), 0, None
    for value in sorted(counts):
        seen += counts[value]
        if low is None and seen >= (n + 1) // 2:
            low = value
        if seen >= n // 2 + 1:
            return float(low if n % 2 else (low + value) / 2)
    return 0.0
