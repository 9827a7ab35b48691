"""Python source: byte-level BPE trained with HF `tokenizers`; syntax validity checked with `ast`."""

from __future__ import annotations

import ast
import sysconfig
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from multiar.domain import safe_child, write_new_text
from multiar.generate import LogitsProcessor

SPECIALS = ("<pad>", "<bos>", "<eos>")
# folders of the standard library that hold tests or third-party packages, not library code
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


def parses(source: str) -> bool:
    """Whether source is syntactically valid Python."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SyntaxWarning)  # e.g. invalid escapes in sampled code
            ast.parse(source)
    except (SyntaxError, ValueError):  # ValueError: null bytes
        return False
    return True


class CodeDomain:
    name = "code"
    suffixes = (".py",)
    unit = "byte"

    def __init__(
        self,
        vocab_size: int = 2048,
        min_frequency: int = 2,
        max_file_bytes: int = 1_000_000,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        self.target_vocab_size = vocab_size
        self.min_frequency = min_frequency
        self.max_file_bytes = max_file_bytes  # generated or vendored blobs, not code to learn from
        self.tokenizer = tokenizer
        self.pad_id, self.bos_id, self.eos_id = range(len(SPECIALS))  # specials come first in training

    @property
    def vocab_size(self) -> int:
        return self._trained().get_vocab_size()

    def _trained(self) -> Tokenizer:
        if self.tokenizer is None:
            raise RuntimeError("the code tokenizer is not trained yet: call fit() on training files first")
        return self.tokenizer

    def default_paths(self, corpus: str | None = None) -> list[Path]:
        """The running interpreter's standard library, without its tests and site-packages."""
        if corpus not in (None, "stdlib"):
            raise ValueError(f"unknown corpus {corpus!r}: the {self.name} domain bundles stdlib")
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
        return record.encode()

    def units(self, record: str) -> int:
        return len(record.encode())  # bits per byte: comparable across tokenizers

    def fit(self, records: Iterable[str]) -> None:
        tokenizer = Tokenizer(models.BPE())
        # byte-level: every string, any Unicode, round-trips exactly; no prefix space so text is unchanged
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=self.target_vocab_size,
            min_frequency=self.min_frequency,
            special_tokens=list(SPECIALS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(records, trainer=trainer)
        if [tokenizer.token_to_id(s) for s in SPECIALS] != [self.pad_id, self.bos_id, self.eos_id]:
            raise RuntimeError("BPE training did not place the special tokens first")
        self.tokenizer = tokenizer

    def encode(self, record: str) -> list[int]:
        return self._trained().encode(record, add_special_tokens=False).ids

    def prompt_ids(self, prompt: str | None) -> list[int]:
        return [self.bos_id] + (self.encode(prompt) if prompt else [])

    def decode(self, ids: list[int]) -> tuple[str, int]:
        keep = [i for i in ids if i >= len(SPECIALS) and i < self.vocab_size]
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
        paths = [
            write_new_text(safe_child(out_dir, f"sample_{start + i:03d}.py"), src, overwrite)
            for i, src in enumerate(artifacts)
        ]
        report_path = out_dir / "syntax_report.tsv"
        lines = []
        if start > 0 and report_path.exists():  # samples start.. extend this run's own report
            lines = [x for x in report_path.read_text().splitlines() if not x.startswith("#")]
        lines += [
            f"{p.name}\t{'ok' if parses(src) else 'syntax error'}"
            for p, src in zip(paths, artifacts, strict=True)
        ]
        ok = sum(line.endswith("\tok") for line in lines)
        lines.append(f"# {ok} of {len(lines)} samples parse")
        write_new_text(report_path, "\n".join(lines) + "\n", overwrite or start > 0)
        return paths

    def metrics(self, artifacts: Sequence[str]) -> dict[str, float]:
        n = max(len(artifacts), 1)
        return {
            "code/parse_rate": sum(map(parses, artifacts)) / n,
            "code/mean_lines": sum(s.count("\n") + 1 for s in artifacts) / n,
        }

    def constraint(self) -> LogitsProcessor | None:
        return None

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._trained().save(str(directory / "tokenizer.json"))

    @classmethod
    def load(cls, directory: Path) -> CodeDomain:
        tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        return cls(vocab_size=tokenizer.get_vocab_size(), tokenizer=tokenizer)
