"""Protein sequences: a fixed amino-acid vocabulary, FASTA in and out through Bio.SeqIO."""

from __future__ import annotations

import gzip
import json
import math
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any

from Bio import SeqIO
from Bio.Seq import Seq
from Bio.SeqRecord import SeqRecord

from multiar.domain import safe_child, write_new_file
from multiar.generate import LogitsProcessor

SPECIALS = ("<pad>", "<bos>", "<eos>")
STANDARD = "ACDEFGHIKLMNPQRSTVWY"
# X unknown, B Asx, Z Glx, U selenocysteine, O pyrrolysine: all occur in UniProt entries
EXTENDED = "XBZUO"
ALPHABET = STANDARD + EXTENDED


class ProteinDomain:
    name = "protein"
    suffixes = (".fasta", ".fa", ".faa", ".fasta.gz", ".fa.gz", ".faa.gz")
    unit = "residue"

    def __init__(self, background: dict[str, float] | None = None) -> None:
        self.itos = list(SPECIALS) + list(ALPHABET)
        self.stoi = {s: i for i, s in enumerate(self.itos)}
        self.pad_id, self.bos_id, self.eos_id = (self.stoi[s] for s in SPECIALS)
        self.vocab_size = len(self.itos)
        # amino-acid frequencies of the training data: the reference for the composition metric
        self.background = background

    def default_paths(self) -> list[Path]:
        return [Path(str(files("multiar.domains") / "assets" / "protein" / "ecoli_k12_UP000000625.fasta.gz"))]

    def read(self, path: Path) -> Iterator[SeqRecord]:
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        n = 0
        try:
            with opener(path, "rt") as handle:  # text mode: CRLF line ends read as LF
                for n, record in enumerate(SeqIO.parse(handle, "fasta"), start=1):  # noqa: B007
                    yield record
        except (zlib.error, EOFError) as err:  # a cut or corrupt gzip stream
            raise ValueError(f"corrupt or truncated gzip data ({err})") from err
        if n == 0:
            raise ValueError("no FASTA records")

    def from_value(self, value: Any, key: str) -> SeqRecord:
        if not isinstance(value, str):
            raise ValueError(f"{key}: expected an amino-acid sequence string, got {type(value).__name__}")
        return SeqRecord(Seq("".join(value.split())), id=key, description="")

    def content(self, record: SeqRecord) -> bytes:
        return bytes(self.encode(record))  # the checks of encode, before the split

    def units(self, record: SeqRecord) -> int:
        return len(self._residues(record))

    def fit(self, records: Iterable[SeqRecord]) -> None:
        counts = Counter()
        for record in records:
            counts.update(self._residues(record))
        total = sum(counts[a] for a in STANDARD) or 1
        self.background = {a: counts[a] / total for a in STANDARD}

    @staticmethod
    def _residues(record: SeqRecord) -> str:
        # UniProt files may end a sequence with '*' (stop); lower case is the same residue
        return str(record.seq).upper().rstrip("*")

    def encode(self, record: SeqRecord) -> list[int]:
        seq = self._residues(record)
        bad = sorted(set(seq) - set(ALPHABET))
        if bad:
            raise ValueError(f"record {record.id}: letters outside the amino-acid alphabet: {''.join(bad)}")
        if not seq:
            raise ValueError(f"record {record.id}: empty sequence")
        return [self.stoi[a] for a in seq]

    def prompt_ids(self, prompt: str | None) -> list[int]:
        if not prompt:
            return [self.bos_id]
        return [self.bos_id] + self.encode(SeqRecord(Seq(prompt.strip()), id="prompt"))

    def decode(self, ids: list[int]) -> tuple[str, int]:
        keep = [i for i in ids if i >= len(SPECIALS) and i < self.vocab_size]
        return "".join(self.itos[i] for i in keep), len(ids) - len(keep)

    def write(
        self,
        artifacts: Sequence[str],
        out_dir: Path,
        provenance: dict,
        overwrite: bool = False,
        start: int = 0,
    ) -> list[Path]:
        settings = " ".join(f"{k}={v}" for k, v in provenance.items())
        records = [
            SeqRecord(Seq(seq), id=f"multiar_{start + i:04d}", description=f"length={len(seq)} {settings}")
            for i, seq in enumerate(artifacts)
        ]
        path = safe_child(Path(out_dir), "samples.fasta")
        if start > 0 and path.exists():  # samples start.. extend this run's own file, rewritten whole
            records = list(SeqIO.parse(path, "fasta"))[:start] + records
        return [write_new_file(path, lambda tmp: SeqIO.write(records, tmp, "fasta"), overwrite or start > 0)]

    def metrics(self, artifacts: Sequence[str]) -> dict[str, float]:
        lengths = [len(s) for s in artifacts]
        out = {
            "protein/mean_length": sum(lengths) / max(len(lengths), 1),
            "protein/empty_rate": sum(n == 0 for n in lengths) / max(len(lengths), 1),
        }
        counts = Counter("".join(artifacts))
        total = sum(counts[a] for a in STANDARD)
        if self.background and total:
            # KL(generated || training composition) over the 20 standard residues, smoothed
            eps = 1e-6
            out["protein/aa_kl"] = sum(
                (counts[a] / total)
                * math.log((counts[a] / total + eps) / (self.background.get(a, 0.0) + eps))
                for a in STANDARD
                if counts[a]
            )
        return out

    def constraint(self) -> LogitsProcessor | None:
        return None

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        state = {"alphabet": ALPHABET, "specials": SPECIALS, "background": self.background}
        (directory / "protein.json").write_text(json.dumps(state, indent=1))

    @classmethod
    def load(cls, directory: Path) -> ProteinDomain:
        state = json.loads((directory / "protein.json").read_text())
        if state["alphabet"] != ALPHABET or tuple(state["specials"]) != SPECIALS:
            raise ValueError(f"{directory}: vocabulary differs from this version of the protein domain")
        return cls(background=state["background"])
