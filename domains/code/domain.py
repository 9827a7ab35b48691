"""Python source: byte-level BPE trained with HF `tokenizers`; syntax validity checked with `ast`."""

from __future__ import annotations

import json
import sysconfig
from collections.abc import Callable, Iterable, Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from multiar.domain import FIM_TOKENS, Domain, DomainBase, MetricSummary
from multiar.domains.code import analysis, outputs
from multiar.domains.code.analysis import parses
from multiar.domains.code.syntax import python_constraint
from multiar.engine.sampling import LogitsProcessor
from multiar.files import safe_child, write_new_file, write_new_text

SPECIALS = ("<pad>", "<bos>", "<eos>")
# folders of the standard library that hold tests or third-party packages, not library code
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


def site_packages() -> tuple[list[Path], dict[str, str]]:
    """The Python sources of the running environment's installed packages (tests left out), and each
    package's licence from its metadata (License-Expression, else License, else License classifiers)."""
    roots = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")}
    files: set[Path] = set()
    licenses: dict[str, str] = {}
    for dist in metadata.distributions():
        sources = []
        for f in dist.files or []:
            path = Path(str(dist.locate_file(f))).resolve()
            root = next((r for r in roots if r in path.parents), None)
            inside = path.relative_to(root).parts[:-1] if root else ()
            if path.suffix == ".py" and root and not SKIP_DIRS & set(inside) and path.is_file():
                sources.append(path)
        if not sources:
            continue
        files.update(sources)
        meta = dist.metadata
        classifiers = [
            c.split(" :: ")[-1] for c in meta.get_all("Classifier") or [] if c.startswith("License ::")
        ]
        first_line = ((meta.get("License") or "").strip().splitlines() or [""])[0]
        licenses[meta["Name"]] = (
            meta.get("License-Expression") or first_line or ", ".join(classifiers) or "unknown"
        )
    return sorted(files), dict(sorted(licenses.items()))


def text_only(tokenizer: Tokenizer) -> Tokenizer:
    """tokenizer (in place) matching no special token inside text: a file holding `<eos>` or `<pad>` is
    encoded as the letters it holds (HF `tokenizers` would give the special ids, which the loss skips and
    decode deletes). The flag is not saved in tokenizer.json: set on every fit and load."""
    tokenizer.encode_special_tokens = True
    return tokenizer


class CodeDomain(DomainBase):
    name = "code"
    suffixes = (".py",)
    unit = "byte"
    tokenizer_files = ("tokenizer.json",)  # the trained HF tokenizer decides the ids
    # folders inside a given tree that hold no code of the project: history, environments, caches
    skip_dirs = frozenset(
        {".git", ".hg", ".venv", "venv", "site-packages", "__pycache__", "node_modules", ".tox"}
    )

    def __init__(
        self,
        vocab_size: int = 2048,
        min_frequency: int = 2,
        max_file_bytes: int = 1_000_000,
        suffixes: Sequence[str] = (".py",),
        require_parse: bool = True,
        fim_rate: float = 0.0,
        fim_spm_rate: float = 0.5,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        self.target_vocab_size = vocab_size
        self.min_frequency = min_frequency
        self.max_file_bytes = max_file_bytes  # generated or vendored blobs, not code to learn from
        self.suffixes = tuple(s.lower() if s.startswith(".") else f".{s.lower()}" for s in suffixes)
        if not self.suffixes:
            raise ValueError("suffixes: give at least one file ending, e.g. [.py]")
        # a Python file that does not parse (Python 2, templates, deliberate syntax errors in tests)
        # teaches syntax errors: dropped by default; only Python sources are checked
        self.require_parse = require_parse
        if not (0 <= fim_rate <= 1 and 0 <= fim_spm_rate <= 1):
            raise ValueError(f"fim_rate and fim_spm_rate must be in [0, 1], got {fim_rate}, {fim_spm_rate}")
        self.fim_rate, self.fim_spm_rate = fim_rate, fim_spm_rate  # fill-in-the-middle (multiar/fim.py)
        self.licenses: dict[str, str] = {}
        self.tokenizer = tokenizer
        self.lines: analysis.LineIndex | None = None  # the training files' lines: copied-lines metric
        self.lines_file: Path | None = None  # where a loaded run keeps them (read when first needed)
        self.pad_id, self.bos_id, self.eos_id = range(len(SPECIALS))  # specials come first in training

    @property
    def vocab_size(self) -> int:
        return self._trained().get_vocab_size()

    def _trained(self) -> Tokenizer:
        if self.tokenizer is None:
            raise RuntimeError("the code tokenizer is not trained yet: call fit() on training files first")
        return self.tokenizer

    def default_paths(self, corpus: str | None = None) -> list[Path]:
        """The running interpreter's standard library, without its tests and site-packages (corpus
        stdlib, the default); or the sources of the installed packages (corpus site-packages)."""
        if corpus == "site-packages":
            files, self.licenses = site_packages()
            return files
        if corpus not in (None, "stdlib"):
            raise ValueError(f"unknown corpus {corpus!r}: choose stdlib or site-packages")
        root = Path(sysconfig.get_paths()["stdlib"])
        return sorted(
            f
            for f in root.rglob("*.py")
            if not SKIP_DIRS & set(f.relative_to(root).parts[:-1]) and not f.name.startswith("test_")
        )

    def read(self, path: Path) -> Iterator[str]:
        size = path.stat().st_size
        if size > self.max_file_bytes:
            raise ValueError(f"{size:,} bytes, over max_file_bytes={self.max_file_bytes:,}")
        text = self._text(path.read_bytes())
        if text.strip():  # empty __init__.py files carry nothing to learn
            yield text

    @staticmethod
    def _text(data: bytes) -> str:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"not UTF-8 ({err.reason} at byte {err.start})") from err
        if "\x00" in text:
            raise ValueError("contains NUL bytes")
        return text

    def from_value(self, value: Any, key: str) -> str:
        if isinstance(value, (bytes, bytearray)):
            value = self._text(bytes(value))
        if not isinstance(value, str):
            raise ValueError(f"{key}: expected source text, got {type(value).__name__}")
        if "\x00" in value:
            raise ValueError(f"{key}: contains NUL bytes")
        if not value.strip():
            raise ValueError(f"{key}: empty text")
        return value

    def content(self, record: str) -> bytes:
        if self.require_parse and self.suffixes == (".py",) and not parses(record):
            raise ValueError("does not parse as Python (domain.settings.require_parse=true)")
        return record.encode()

    def units(self, record: str) -> int:
        return len(record.encode())  # bits per byte: comparable across tokenizers

    def fit(self, records: Iterable[str]) -> None:
        texts: list[str] = []

        def remembered() -> Iterator[str]:  # the tokenizer trains from an iterator: index lines on the way
            for text in records:
                texts.append(text)
                yield text

        tokenizer = Tokenizer(models.BPE())
        # byte-level: every string, any Unicode, round-trips exactly; no prefix space so text is unchanged
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=self.target_vocab_size,
            min_frequency=self.min_frequency,
            special_tokens=list(SPECIALS) + (list(FIM_TOKENS) if self.fim_rate > 0 else []),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(remembered(), trainer=trainer)
        self.lines = analysis.LineIndex.build(texts)
        if [tokenizer.token_to_id(s) for s in SPECIALS] != [self.pad_id, self.bos_id, self.eos_id]:
            raise RuntimeError("BPE training did not place the special tokens first")
        self.tokenizer = text_only(tokenizer)

    def encode(self, record: str) -> list[int]:
        return self._trained().encode(record, add_special_tokens=False).ids

    def prompt_ids(self, prompt: str | None) -> list[int]:
        return [self.bos_id] + (self.encode(prompt) if prompt else [])

    @property
    def fim_ids(self) -> tuple[int, int, int] | None:
        """The fill-in-the-middle tokens' ids, when the tokenizer has them."""
        ids = tuple(self._trained().token_to_id(t) for t in FIM_TOKENS)
        return ids if None not in ids else None  # type: ignore[return-value]

    def hf_tokenizer_json(self) -> str:
        """The trained tokenizer as tokenizer.json (export format=hf)."""
        return self._trained().to_str()

    def decode(self, ids: list[int]) -> tuple[str, int]:
        special = set(range(len(SPECIALS))) | set(self.fim_ids or ())
        keep = [i for i in ids if i not in special and 0 <= i < self.vocab_size]
        return self._trained().decode(keep, skip_special_tokens=False), len(ids) - len(keep)

    def write(
        self,
        artifacts: Sequence[str],
        out_dir: Path,
        provenance: dict,
        overwrite: bool = False,
        start: int = 0,
    ) -> list[Path]:
        # every sample is written, parsing or not: a syntax error is data for the report, not a reason to drop
        out_dir = Path(out_dir)
        header = outputs.sample_header(provenance)
        paths = [
            write_new_text(safe_child(out_dir, f"sample_{start + i:03d}.py"), header + src, overwrite)
            for i, src in enumerate(artifacts)
        ]
        report_path = out_dir / "syntax_report.tsv"
        lines = []
        if start > 0 and report_path.exists():  # samples start.. extend this run's own report
            lines = [x for x in report_path.read_text().splitlines() if not x.startswith("#")]
        lines += [outputs.report_line(p, src).rstrip("\n") for p, src in zip(paths, artifacts, strict=True)]
        ok = sum(line.endswith("\tok") for line in lines)
        lines.append(f"# {ok} of {len(lines)} samples parse")
        write_new_text(report_path, "\n".join(lines) + "\n", overwrite or start > 0)
        return paths

    def sample_files(self, out_dir: Path, provenance: dict, overwrite: bool) -> outputs.CodeFiles:
        """sample_NNN.py written once each; syntax_report.tsv appended a line per sample."""
        return outputs.CodeFiles(self, out_dir, provenance, overwrite)

    def training_lines(self) -> analysis.LineIndex | None:
        if self.lines is None and self.lines_file is not None and self.lines_file.exists():
            self.lines = analysis.LineIndex.load(self.lines_file)
        return self.lines

    def metrics(self, artifacts: Sequence[str]) -> dict[str, float]:
        n = max(len(artifacts), 1)
        out = {
            "code/parse_rate": sum(map(parses, artifacts)) / n,
            "code/compile_rate": sum(map(analysis.compiles, artifacts)) / n,
            "code/mean_lines": analysis.mean_lines(artifacts),
            "code/mean_bytes": sum(len(s.encode()) for s in artifacts) / n,
        }
        if (index := self.training_lines()) is not None:
            runs = [index.longest_run(s) for s in artifacts]
            # a sample "copies" when 4 or more of its consecutive non-blank lines stand verbatim in one
            # training file (shorter runs are mostly idioms: `else:` / `return None` / `pass`)
            out["code/copied_share"] = sum(r >= analysis.COPIED_LINES for r in runs) / n
            out["code/longest_copied_run_mean"] = sum(runs) / n
        return out

    def metric_summary(self) -> CodeSummary:
        return CodeSummary()

    def constraint(self) -> LogitsProcessor | None:
        """Python sources are sampled lexically and grammatically sound, with a per-token check the decode
        loop asks of every token it draws (domains/code/syntax.py, grammar.py); other suffixes free."""
        if self.suffixes != (".py",):
            return None
        tokenizer = self._trained()
        special = set(range(len(SPECIALS))) | set(self.fim_ids or ())
        texts = ["" if i in special else tokenizer.decode([i]) for i in range(self.vocab_size)]
        return python_constraint(
            self._text_of_row, texts, self.eos_id, special - {self.eos_id}, final_text=self._sample_of_row
        )

    def _fim_parts(self, ids: list[int]) -> tuple[list[int], list[int], list[int]] | None:
        """(prefix, suffix, middle so far) of a fill-in-the-middle row (PSM or SPM), else None."""
        fim = self.fim_ids
        if fim is None or not all(i in ids for i in fim):
            return None
        pre, mid, suf = (ids.index(i) for i in fim)
        if pre < suf < mid:  # PSM
            return ids[pre + 1 : suf], ids[suf + 1 : mid], ids[mid + 1 :]
        return ids[pre + 1 : mid], ids[suf + 1 : pre], ids[mid + 1 :]  # SPM

    def _text_of_row(self, ids: list[int]) -> str:
        """The code a row's ids stand for so far: for a fill-in-the-middle row, prefix then middle."""
        parts = self._fim_parts(ids)
        return self.decode(ids if parts is None else parts[0] + parts[2])[0]

    def _sample_of_row(self, ids: list[int]) -> str:
        """The code the row would be if it ended here: for fill-in-the-middle, prefix + middle + suffix."""
        parts = self._fim_parts(ids)
        return self.decode(ids if parts is None else parts[0] + parts[2] + parts[1])[0]

    def valid(self, artifact: str) -> bool:
        """Whether a sample is valid Python (resample_invalid re-draws the others)."""
        return parses(artifact)

    def stop_rule(self, name: str) -> Callable[[str, int, bool], int | None]:
        """stop_at=block: a sample ends with the top-level definition it is in (a dedent to column 0),
        where the text before that line parses: a complete block."""
        if name != "block":
            raise ValueError(f"unknown rule {name!r}; the code domain has block")
        return complete_block_end

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._trained().save(str(directory / "tokenizer.json"))
        # every setting that decides what is read or how it is tokenized: a resumed or fine-tuned run
        # reloads them (vocab_size and min_frequency: what the tokenizer was fitted with)
        settings = {
            "vocab_size": self.target_vocab_size,
            "min_frequency": self.min_frequency,
            "max_file_bytes": self.max_file_bytes,
            "suffixes": list(self.suffixes),
            "require_parse": self.require_parse,
            "fim_rate": self.fim_rate,
            "fim_spm_rate": self.fim_spm_rate,
        }
        write_new_text(directory / "code.json", json.dumps(settings, indent=1), overwrite=True)
        if (index := self.training_lines()) is not None:
            write_new_file(directory / "train_lines.npy", index.save, overwrite=True)

    @classmethod
    def load(cls, directory: Path) -> CodeDomain:
        tokenizer = text_only(Tokenizer.from_file(str(directory / "tokenizer.json")))
        path = directory / "code.json"
        # a folder from an older version holds fewer settings (or none): the missing ones take the defaults
        settings = json.loads(path.read_text()) if path.exists() else {}
        if not isinstance(settings, dict):
            raise ValueError(f"{path}: expected a JSON object of settings, got {type(settings).__name__}")
        settings.setdefault("vocab_size", tokenizer.get_vocab_size())
        try:
            domain = cls(tokenizer=tokenizer, **settings)
        except TypeError as err:  # a key this version does not know
            raise ValueError(f"{path}: {err}") from None
        domain.lines_file = directory / "train_lines.npy"
        return domain


def complete_block_end(text: str, start: int = 0, final: bool = False) -> int | None:
    """analysis.block_end where the text before the cut parses: a column-0 line inside an open string
    or bracket is no end, the search goes on after it; None while the block is not complete."""
    cut = analysis.block_end(text, start, final)
    while cut is not None and not parses(text[:cut]):
        line_end = text.find("\n", cut)
        if line_end < 0:
            return None
        cut = analysis.block_end(text, line_end + 1, final)
    return cut


class CodeSummary(MetricSummary):
    """The plain means, and per end reason (eos, block, stop, length, no_valid_token, max_len) the share
    of samples that ended so and how many of them parse (ast.parse of the running Python: a sample the
    grammar let through but Python rejects counts as a failure); `ended`: eos or block, by themselves."""

    def __init__(self) -> None:
        super().__init__()
        self.ends: dict[str, list[int]] = {}  # end reason -> [samples, samples that parse]

    def add(self, domain: Domain, artifacts: Sequence[str], details: Sequence[dict]) -> None:
        super().add(domain, artifacts, details)
        for artifact, d in zip(artifacts, details, strict=True):
            tally = self.ends.setdefault(str(d.get("end")), [0, 0])
            tally[0] += 1
            tally[1] += parses(artifact)

    def metrics(self, domain: Domain) -> dict[str, float]:
        out, n = super().metrics(domain), max(self.count, 1)
        for end, (k, ok) in sorted(self.ends.items()):
            out[f"code/end_{end}_share"] = k / n
            out[f"code/end_{end}_parse_rate"] = ok / max(k, 1)
        ended = [self.ends[e] for e in ("eos", "block") if e in self.ends]
        out["code/ended_share"] = sum(k for k, _ in ended) / n
        out["code/ended_parse_rate"] = sum(ok for _, ok in ended) / max(sum(k for k, _ in ended), 1)
        return out
