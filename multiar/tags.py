"""Control tags for any domain: a document's tags (an organism, a style, a project) become tokens after
BOS, so a model learns p(document | tags) and generation can ask for them (`tags=OX=83333`).

`Tagged` wraps a domain: the tag tokens take the ids after the domain's own vocabulary, everything
else is the domain's. Tags are read per document from one source (`data.tags`):

  header:FIELD  a field of the record's header (protein: UniProt's OS, OX, GN, PE)  -> "OX=83333"
  folder        the name of the folder holding the file                            -> "baroque"
  file          the file's name without its suffix                                 -> "bwv66_6"
  tsv:PATH      a tab-separated file: document id, then comma-separated tags       -> as written

The vocabulary is the `max_tags` most frequent tags of the training documents. During training a
document's tags are left out with probability `tag_dropout` (data time, see data.pack), so the same
model also samples without tags.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from torch import Tensor

from multiar.domain import (
    CAPABILITIES,
    Assessed,
    Augmentable,
    Domain,
    DomainBase,
    HeaderFields,
    MetricSummary,
    PromptMeta,
    Renderable,
    SampleFiles,
    StopRules,
    TokenErrors,
    Validity,
    WindowStarts,
)
from multiar.engine.checked_draw import TokenCheck
from multiar.engine.sampling import LogitsProcessor, ban_tokens
from multiar.errors import ConfigError
from multiar.files import write_new_text

SOURCES = ("header:", "folder", "file", "tsv:")


def read_tsv(path: str | Path) -> dict[str, list[str]]:
    """id -> tags from a tab-separated file (blank lines and '#' comments skipped)."""
    path = Path(path).expanduser()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"data.tags: {path}: {getattr(err, 'strerror', None) or err}") from None
    table = {}
    for n, line in enumerate(lines, start=1):
        if not line.strip() or line.startswith("#"):
            continue
        doc, sep, tags = line.partition("\t")
        if not sep:
            raise ConfigError(f"data.tags: {path}:{n}: expected 'id<TAB>tag,tag', got {line[:60]!r}")
        table[doc.strip()] = [t.strip() for t in tags.split(",") if t.strip()]
    return table


class Tagged(DomainBase):
    """A domain whose documents start with control-tag tokens (ids vocab_size .. vocab_size + n_tags - 1
    of the wrapped domain).

    Everything a domain has is forwarded explicitly, nothing by __getattr__: the members of `Domain`
    below, and each capability of the wrapped domain by a small forwarding class (`_FORWARDERS`).
    `Tagged(base, ...)` builds an instance of the subclass holding exactly base's capabilities, so
    isinstance(tagged, Renderable) is true exactly when the base renders."""

    def __new__(cls, base: Domain, *args: Any, **kwargs: Any) -> Tagged:
        return super().__new__(tagged_class(base) if cls is Tagged else cls)

    def __reduce__(self) -> tuple:  # the per-base class is built at run time: pickled as base + state
        return _restore, (self.base, self.__dict__)

    def __init__(self, base: Domain, spec: str, tags: list[str] | None = None, max_tags: int = 256) -> None:
        if not spec.startswith(SOURCES) or spec in ("header:", "tsv:"):
            raise ConfigError(f"data.tags: {spec!r}: use header:FIELD, folder, file or tsv:PATH")
        if spec.startswith("header:") and not isinstance(base, HeaderFields):
            raise ConfigError(f"data.tags: the {base.name} domain's records have no header fields")
        self.base, self.spec, self.max_tags = base, spec, max_tags
        self.tags: list[str] = list(tags or [])
        self.table = read_tsv(spec[4:]) if spec.startswith("tsv:") else None

    # the wrapped domain's members, as they are (decode, constraint, save and the document hooks differ)
    name = property(lambda self: self.base.name)
    suffixes = property(lambda self: self.base.suffixes)
    unit = property(lambda self: self.base.unit)
    bos_id = property(lambda self: self.base.bos_id)
    eos_id = property(lambda self: self.base.eos_id)
    pad_id = property(lambda self: self.base.pad_id)
    skip_dirs = property(lambda self: self.base.skip_dirs)
    one_token_per_unit = property(lambda self: self.base.one_token_per_unit)
    tokenizer_files = property(lambda self: self.base.tokenizer_files)
    generate_options = property(lambda self: self.base.generate_options)
    licenses = property(lambda self: self.base.licenses)
    fim_ids = property(lambda self: self.base.fim_ids)
    fim_rate = property(lambda self: self.base.fim_rate)
    fim_spm_rate = property(lambda self: self.base.fim_spm_rate)

    def default_paths(self, corpus: str | None = None) -> list[Path]:
        return self.base.default_paths(corpus)

    def read(self, path: Path) -> Iterator[Any]:
        return self.base.read(path)

    def from_value(self, value: Any, key: str) -> Any:
        return self.base.from_value(value, key)

    def content(self, record: Any) -> bytes:
        return self.base.content(record)

    def units(self, record: Any) -> int:
        return self.base.units(record)

    def fit(self, records: Iterable[Any]) -> None:
        self.base.fit(records)

    def encode(self, record: Any) -> list[int]:
        return self.base.encode(record)

    def prompt_ids(self, prompt: str | None, **options: Any) -> list[int]:
        return self.base.prompt_ids(prompt, **options)

    def write(
        self, artifacts: Sequence[Any], out_dir: Path, provenance: dict, *args: Any, **kwargs: Any
    ) -> list[Path]:
        return self.base.write(artifacts, out_dir, provenance, *args, **kwargs)

    def metrics(self, artifacts: Sequence[Any]) -> dict[str, float]:
        return self.base.metrics(artifacts)

    def sample_files(self, out_dir: Path, provenance: dict, overwrite: bool) -> SampleFiles:
        return self.base.sample_files(out_dir, provenance, overwrite)

    def metric_summary(self) -> MetricSummary:
        return self.base.metric_summary()

    def hf_tokenizer_json(self) -> str | None:
        """The base's tokenizer with each tag as a special token after it (ids first_tag_id, ...)."""
        base = self.base.hf_tokenizer_json()
        if base is None or not self.tags:
            return base
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_str(base)
        if tokenizer.get_vocab_size(with_added_tokens=True) != self.first_tag_id:
            return None  # the base's ids are not 0..first_tag_id-1: no place for the tags
        tokenizer.add_special_tokens([f"<{tag}>" for tag in self.tags])
        if tokenizer.get_vocab_size(with_added_tokens=True) != self.vocab_size:
            return None  # a tag's name was a token already: ids would not match
        return tokenizer.to_str()

    @property
    def first_tag_id(self) -> int:
        return self.base.vocab_size

    @property
    def vocab_size(self) -> int:
        return self.base.vocab_size + len(self.tags)

    def document_tags(self, key: str, record: Any) -> list[str]:
        """The tags the source gives one document (key: its path relative to the corpus root, '#', index)."""
        file = PurePosixPath(key.rsplit("#", 1)[0])
        if self.spec.startswith("header:"):
            value = self.base.fields(record).get(self.spec[len("header:") :])
            return [f"{self.spec[len('header:') :]}={value}"] if value else []
        if self.spec == "folder":
            return [file.parent.name] if file.parent.name else []
        if self.spec == "file":
            return [file.name.split(".")[0]]
        names = list(self.base.fields(record).values()) if isinstance(self.base, HeaderFields) else []
        for name in (*names, key, str(file), file.name, file.name.split(".")[0]):
            if name in self.table:
                return self.table[name]
        return []

    def fit_documents(self, documents: Iterable[tuple[str, Any]]) -> None:
        """Fit the wrapped domain on the records and the tag vocabulary on their tags."""
        counts: Counter = Counter()

        def records() -> Iterable[Any]:
            for key, record in documents:
                counts.update(self.document_tags(key, record))
                yield record

        stream = iter(records())
        self.base.fit(stream)
        for _ in stream:  # a domain with a fixed vocabulary may not read every record
            pass
        # the most frequent tags, ties by name: the same vocabulary from the same data
        self.tags = sorted(sorted(counts), key=lambda t: -counts[t])[: self.max_tags]
        if not self.tags:
            raise ConfigError(f"data.tags={self.spec}: no training document has a tag")

    def encode_document(self, key: str, record: Any) -> list[int]:
        """The tags' ids (known tags, in vocabulary order), then the record's ids."""
        return self.ids_of_tags(self.document_tags(key, record)) + self.base.encode(record)

    def ids_of_tags(self, names: Iterable[str]) -> list[int]:
        """Ids of the known tags among names, in vocabulary order, as training encodes them; unknown
        names are left out (a tag outside the run's vocabulary was never trained on)."""
        known = {t: i for i, t in enumerate(self.tags)}
        return sorted(self.first_tag_id + known[t] for t in set(names) if t in known)

    def tags_of_ids(self, ids: Iterable[int]) -> list[str]:
        """The names of the tag ids among ids (a document's encoded head)."""
        return [self.tags[i - self.first_tag_id] for i in ids if self.first_tag_id <= i < self.vocab_size]

    @property
    def replayable(self) -> bool:
        """Whether document_tags can read a document's tags here: a TSV source needs its table, which
        runs saved before domain/tags.json kept it lack (their validation tags are in reference/)."""
        return not self.spec.startswith("tsv:") or self.table is not None

    def tag_ids(self, text: str | None) -> list[int]:
        """Ids of comma-separated tags (`tags=OX=83333,...`); ConfigError listing the known ones."""
        wanted = [t.strip() for t in (text or "").split(",") if t.strip()]
        unknown = [t for t in wanted if t not in self.tags]
        if unknown:
            shown = ", ".join(self.tags[:20]) + (
                f" ... ({len(self.tags)} in all)" if len(self.tags) > 20 else ""
            )
            raise ConfigError(f"tags: unknown tag(s) {', '.join(unknown)}; this run knows: {shown}")
        return sorted({self.first_tag_id + self.tags.index(t) for t in wanted})

    def decode(self, ids: list[int]) -> tuple[Any, int]:
        return self.base.decode([i for i in ids if not self.first_tag_id <= i < self.vocab_size])

    def constraint(self) -> LogitsProcessor:
        """Tags are conditions, never sampled; the wrapped domain's grammar sees BOS where tags stand."""
        ban = ban_tokens(range(self.first_tag_id, self.vocab_size))
        inner, first, bos = self.base.constraint(), self.first_tag_id, self.base.bos_id

        def processor(ids: Tensor, logits: Tensor) -> Tensor:
            logits = ban(ids, logits)
            if inner is not None:
                plain = torch.where(ids >= first, torch.full_like(ids, bos), ids)
                logits[:, :first] = inner(plain, logits[:, :first])
            return logits

        # a grammar's per-token check is forwarded explicitly (tags read as BOS, never sound themselves)
        return TaggedCheck(processor, inner, first, bos) if isinstance(inner, TokenCheck) else processor

    def save(self, directory: Path) -> None:
        self.base.save(directory)
        state = {"spec": self.spec, "max_tags": self.max_tags, "tags": self.tags}
        if self.table is not None:  # a TSV source: kept, so a resumed or fine-tuned run reads the same tags
            state["table"] = self.table
        write_new_text(Path(directory) / "tags.json", json.dumps(state, indent=1), overwrite=True)

    @classmethod
    def load(cls, base: Domain, directory: Path) -> Tagged:
        state = json.loads((Path(directory) / "tags.json").read_text())
        tagged = cls.__new__(cls, base)  # no tsv file needed: the vocabulary and a TSV's table are stored
        tagged.base, tagged.spec, tagged.max_tags = base, state["spec"], state["max_tags"]
        tagged.tags, tagged.table = list(state["tags"]), state.get("table")  # None: runs saved before
        return tagged


class TaggedCheck:
    """A tagged run's constraint when the wrapped domain's has a per-token check (checked_draw.TokenCheck):
    the processor as it is, and `sound` asked of the base's check with tags read as BOS."""

    def __init__(self, processor: LogitsProcessor, inner: TokenCheck, first: int, bos: int) -> None:
        self.processor, self.inner, self.first, self.bos = processor, inner, first, bos

    def __call__(self, ids: Tensor, logits: Tensor) -> Tensor:
        return self.processor(ids, logits)

    def sound(self, ids: list[int], token: int) -> bool:
        plain = [self.bos if i >= self.first else i for i in ids]
        return token < self.first and self.inner.sound(plain, token)


class _HeaderFields:
    def fields(self: Any, record: Any) -> dict[str, str]:
        return self.base.fields(record)


class _Augmentable:
    def check_augment(self: Any, spec: Any) -> None:
        self.base.check_augment(spec)

    def augment(self: Any, record: Any, spec: dict[str, Any]) -> list[tuple[str, Any]]:
        return self.base.augment(record, spec)


class _WindowStarts:
    @property
    def window_starts(self: Any) -> list[bool]:
        return self.base.window_starts


class _PromptMeta:
    def prompt_meta(self: Any, prompt: str | None, **options: Any) -> Any:
        return self.base.prompt_meta(prompt, **options)

    def with_prompt_meta(self: Any, artifact: Any, meta: Any, whole: bool = True) -> Any:
        return self.base.with_prompt_meta(artifact, meta, whole=whole)


class _TokenErrors:
    def token_errors(self: Any, ids: list[int]) -> int:
        # tag ids are no tokens of the wrapped tokenizer: it counts errors over its own ids
        return self.base.token_errors([i for i in ids if not self.first_tag_id <= i < self.vocab_size])


class _Renderable:
    def render(
        self: Any, path: Path, out: Path, soundfont: str | None = None, overwrite: bool = False
    ) -> Path:
        return self.base.render(path, out, soundfont, overwrite)


class _StopRules:
    def stop_rule(self: Any, name: str) -> Callable[[str, int, bool], int | None]:
        return self.base.stop_rule(name)


class _Validity:
    def valid(self: Any, artifact: Any) -> bool:
        return self.base.valid(artifact)


class _Assessed:
    @property
    def filter_keys(self: Any) -> tuple[str, ...]:
        return self.base.filter_keys

    def assess(
        self: Any, artifacts: Sequence[Any], details: list[dict], settings: dict, start: int = 0
    ) -> dict[str, float]:
        return self.base.assess(artifacts, details, settings, start=start)

    def report(self: Any, *args: Any, **kwargs: Any) -> list[Path]:
        return self.base.report(*args, **kwargs)


# capability -> the class that forwards it to the wrapped domain
_FORWARDERS: dict[type, type] = {
    HeaderFields: _HeaderFields,
    Augmentable: _Augmentable,
    WindowStarts: _WindowStarts,
    PromptMeta: _PromptMeta,
    TokenErrors: _TokenErrors,
    Renderable: _Renderable,
    StopRules: _StopRules,
    Validity: _Validity,
    Assessed: _Assessed,
}
assert set(_FORWARDERS) == set(CAPABILITIES), "every capability needs its forwarder"


def tagged_class(base: Domain) -> type[Tagged]:
    """The Tagged subclass with exactly the capabilities of base (one class per combination)."""
    return _tagged_class(tuple(c for c in CAPABILITIES if isinstance(base, c)))


@cache
def _tagged_class(capabilities: tuple[type, ...]) -> type[Tagged]:
    name = "Tagged" + "".join(c.__name__ for c in capabilities)
    return type(name, (Tagged, *(_FORWARDERS[c] for c in capabilities)), {"__module__": __name__})


def _restore(base: Domain, state: dict) -> Tagged:
    tagged = Tagged.__new__(Tagged, base)
    tagged.__dict__.update(state)
    return tagged
