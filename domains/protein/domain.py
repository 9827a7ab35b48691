"""Protein sequences: a fixed amino-acid vocabulary, FASTA in and out through Bio.SeqIO.

Reading applies the data filters (letters outside the alphabet, length, share of X) as the documents'
`content` checks, so a filtered record is skipped and counted before the split, once per file. The
training sequences are kept with the run (domain/train.fasta.gz): the composition and length metrics and
the novelty search of `multiar generate` compare samples with them.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any

from Bio import SeqIO
from Bio.Seq import Seq
from Bio.SeqRecord import SeqRecord

from multiar.domain import FIM_TOKENS, DomainBase
from multiar.domains.protein import analysis, outputs
from multiar.domains.protein.novelty import Novelty
from multiar.engine.sampling import LogitsProcessor
from multiar.files import safe_child, write_new_file, write_new_text

SPECIALS = ("<pad>", "<bos>", "<eos>")
STANDARD = "ACDEFGHIKLMNPQRSTVWY"
# X unknown, B Asx, Z Glx, U selenocysteine, O pyrrolysine: all occur in UniProt entries
EXTENDED = "XBZUO"
ALPHABET = STANDARD + EXTENDED
CORPORA = {"ecoli": ["ecoli_k12_UP000000625.fasta.gz"], "yeast": ["yeast_s288c_UP000002311.fasta.gz"]}
# UniProt: ">db|ACCESSION|ENTRY protein name OS=organism OX=taxon GN=gene PE=evidence SV=version"
UNIPROT_ID = re.compile(r"^(?P<db>sp|tr)\|(?P<accession>[^|]+)\|(?P<entry>\S+)$")
UNIPROT_FIELD = re.compile(r"\s(OS|OX|GN|PE|SV)=")


def uniprot_fields(record: SeqRecord) -> dict[str, str]:
    """The fields of a UniProt FASTA header (id, db, accession, entry, name, OS, OX, GN, PE, SV); for
    other headers just the id."""
    fields = {"id": record.id}
    if m := UNIPROT_ID.match(record.id):
        fields.update(m.groupdict())
    description = record.description
    if description.startswith(record.id):
        description = description[len(record.id) :]
    parts = UNIPROT_FIELD.split(" " + description.strip())  # [name, key, value, key, value, ...]
    if parts[0].strip():
        fields["name"] = parts[0].strip()
    fields.update({k: v.strip() for k, v in zip(parts[1::2], parts[2::2], strict=True)})
    return fields


class ProteinDomain(DomainBase):
    name = "protein"
    suffixes = (".fasta", ".fa", ".faa", ".fasta.gz", ".fa.gz", ".faa.gz")
    unit = "residue"
    one_token_per_unit = True  # lengths and positions in residues are token counts (length control)
    filter_keys = analysis.FILTER_KEYS  # generate checks filters.* against these before sampling

    def __init__(
        self,
        background: dict[str, float] | None = None,
        unknown_letters: str = "reject",
        min_len: int = 1,
        max_len: int | None = None,
        max_x_fraction: float = 0.5,
        fim_rate: float = 0.0,
        fim_spm_rate: float = 0.5,
    ) -> None:
        if unknown_letters not in ("reject", "x"):
            raise ValueError(f"unknown_letters must be reject or x, got {unknown_letters!r}")
        if min_len < 1 or (max_len is not None and max_len < min_len):
            raise ValueError(f"need 1 <= min_len <= max_len, got min_len={min_len} max_len={max_len}")
        if not 0.0 <= max_x_fraction <= 1.0:
            raise ValueError(f"max_x_fraction must be in [0, 1], got {max_x_fraction}")
        self.unknown_letters, self.min_len, self.max_len = unknown_letters, min_len, max_len
        self.max_x_fraction = max_x_fraction
        if not (0 <= fim_rate <= 1 and 0 <= fim_spm_rate <= 1):
            raise ValueError(f"fim_rate and fim_spm_rate must be in [0, 1], got {fim_rate}, {fim_spm_rate}")
        self.fim_rate, self.fim_spm_rate = fim_rate, fim_spm_rate  # fill-in-the-middle (multiar/fim.py)
        # the fill-in-the-middle tokens come after the alphabet, only where enabled: ids stay stable
        self.itos = list(SPECIALS) + list(ALPHABET) + (list(FIM_TOKENS) if fim_rate > 0 else [])
        self.stoi = {s: i for i, s in enumerate(self.itos)}
        self.pad_id, self.bos_id, self.eos_id = (self.stoi[s] for s in SPECIALS)
        self.vocab_size = len(self.itos)
        self.fim_ids = tuple(self.stoi[t] for t in FIM_TOKENS) if fim_rate > 0 else None
        # amino-acid frequencies of the training data: the reference for the composition metric
        self.background = background
        self.training: list[tuple[str, str]] = []  # (id, sequence) of the training records, from fit
        self.training_file: Path | None = None  # where a loaded run keeps them (read when first needed)
        self.novelty: Novelty | None = None  # generate's search, kept across its batches
        self.lengths: tuple[list, int, Counter] | None = None  # the training list counted, its size, counts

    def default_paths(self, corpus: str | None = None) -> list[Path]:
        names = [n for part in (corpus or "ecoli").split("+") for n in CORPORA.get(part, [None])]
        if None in names:
            raise ValueError(f"unknown corpus {corpus!r}: choose ecoli, yeast or ecoli+yeast")
        return [Path(str(files("multiar.domains.protein") / "assets" / n)) for n in names]

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

    def fields(self, record: SeqRecord) -> dict[str, str]:
        return uniprot_fields(record)

    def from_value(self, value: Any, key: str) -> SeqRecord:
        if not isinstance(value, str):
            raise ValueError(f"{key}: expected an amino-acid sequence string, got {type(value).__name__}")
        return SeqRecord(Seq("".join(value.split())), id=key, description="")

    def content(self, record: SeqRecord) -> bytes:
        seq = self._residues(record)  # the data filters, before the split; messages name no record, so
        if len(seq) < self.min_len:  # the corpus counts them per file and reason
            raise ValueError(f"shorter than min_len={self.min_len}" if seq else "empty sequence")
        if self.max_len is not None and len(seq) > self.max_len:
            raise ValueError(f"longer than max_len={self.max_len}")
        if seq.count("X") > self.max_x_fraction * len(seq):
            raise ValueError(f"more than max_x_fraction={self.max_x_fraction} of X")
        return seq.encode()

    def units(self, record: SeqRecord) -> int:
        return len(self._residues(record))

    def fit(self, records: Iterable[SeqRecord]) -> None:
        counts: Counter = Counter()
        self.training = []
        for record in records:
            seq = self._residues(record)
            counts.update(seq)
            self.training.append((record.id, seq))
        total = sum(counts[a] for a in STANDARD) or 1
        self.background = {a: counts[a] / total for a in STANDARD}

    def _residues(self, record: SeqRecord) -> str:
        # UniProt files may end a sequence with '*' (stop); lower case is the same residue
        seq = str(record.seq).upper().rstrip("*")
        bad = sorted(set(seq) - set(ALPHABET))
        if bad and self.unknown_letters == "x":
            seq = seq.translate({ord(c): "X" for c in bad})
        elif bad:
            raise ValueError(f"letters outside the amino-acid alphabet: {''.join(bad)}")
        return seq

    def encode(self, record: SeqRecord) -> list[int]:
        try:
            seq = self._residues(record)
        except ValueError as err:
            raise ValueError(f"record {record.id}: {err}") from None
        if not seq:
            raise ValueError(f"record {record.id}: empty sequence")
        return [self.stoi[a] for a in seq]

    def hf_tokenizer_json(self) -> str:
        """The alphabet as a `tokenizers` byte-level BPE without merges (each letter its own token, the
        ids encode gives; ASCII letters are their own byte-level symbols), the specials and FIM markers as
        special tokens: export's tokenizer.json, and in a GGUF the gpt2-style vocabulary llama.cpp reads
        protein text with."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        tokenizer = Tokenizer(models.BPE(vocab=dict(self.stoi), merges=[]))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.add_special_tokens([t for t in self.itos if t not in ALPHABET])
        return tokenizer.to_str()

    def prompt_ids(self, prompt: str | None) -> list[int]:
        if not prompt:
            return [self.bos_id]
        return [self.bos_id] + self.encode(SeqRecord(Seq(prompt.strip()), id="prompt"))

    def decode(self, ids: list[int]) -> tuple[str, int]:
        keep = [i for i in ids if len(SPECIALS) <= i < len(SPECIALS) + len(ALPHABET)]
        return "".join(self.itos[i] for i in keep), len(ids) - len(keep)

    def write(
        self,
        artifacts: Sequence[str],
        out_dir: Path,
        provenance: dict,
        overwrite: bool = False,
        start: int = 0,
        details: Sequence[dict] | None = None,
    ) -> list[Path]:
        """samples.fasta: one record per sample, its details and the settings in the description."""
        settings = " ".join(f"{k}={v}" for k, v in provenance.items())
        details = details or [{} for _ in artifacts]
        records = [
            SeqRecord(
                Seq(seq),
                id=d.get("id", f"multiar_{start + i:04d}"),
                description=analysis.describe(seq, d, settings),
            )
            for i, (seq, d) in enumerate(zip(artifacts, details, strict=True))
        ]
        path = safe_child(Path(out_dir), "samples.fasta")
        if start > 0 and path.exists():  # samples start.. extend this run's own file, rewritten whole
            records = list(SeqIO.parse(path, "fasta"))[:start] + records
        return [write_new_file(path, lambda tmp: SeqIO.write(records, tmp, "fasta"), overwrite or start > 0)]

    def training_sequences(self) -> list[tuple[str, str]]:
        if not self.training and self.training_file is not None and self.training_file.exists():
            with gzip.open(self.training_file, "rt") as handle:
                self.training = [(r.id, str(r.seq)) for r in SeqIO.parse(handle, "fasta")]
        return self.training

    def metrics(self, artifacts: Sequence[str]) -> dict[str, float]:
        lengths = [len(s) for s in artifacts]
        out = {
            "protein/mean_length": sum(lengths) / max(len(lengths), 1),
            "protein/empty_rate": sum(n == 0 for n in lengths) / max(len(lengths), 1),
        }
        if self.background and (kl := analysis.composition_kl(artifacts, self.background)) is not None:
            out["protein/aa_kl"] = kl
        if lengths and (training := self.training_sequences()):
            out["protein/length_ks"] = analysis.ks_distance(lengths, [len(s) for _, s in training])
        return out

    def assess(
        self, artifacts: Sequence[str], details: list[dict], settings: dict, start: int = 0
    ) -> dict[str, float]:
        """Novelty and filters per sample (columns added to details); their summary metrics. The novelty
        index (and its worker processes) is built on the first call and kept until close_novelty."""
        training = self.training_sequences()
        checked = analysis.check_filters(dict(settings))
        if checked["novelty"] and training and self.novelty is None:
            self.novelty = Novelty(training, checked["candidates"], checked["workers"])
        return analysis.assess(artifacts, details, settings, training, start=start, novelty=self.novelty)

    def close_novelty(self) -> None:
        """End the novelty search of a generate run (its workers; its timing goes to the log)."""
        if self.novelty is not None:
            self.novelty.close()
            self.novelty = None

    def sample_files(self, out_dir: Path, provenance: dict, overwrite: bool) -> outputs.ProteinFiles:
        """samples.fasta and samples.csv, appended batch by batch."""
        return outputs.ProteinFiles(self, out_dir, provenance, overwrite)

    def metric_summary(self) -> outputs.ProteinSummary:
        return outputs.ProteinSummary(self.background, self.training_lengths())

    def training_lengths(self) -> Counter:
        """The training sequences' length counts (read only), counted once per training set: every
        request a server plans starts a summary (counting 4,100 sequences took 3 ms a request). A new
        training list or a new size counts again (fit and loading assign or append; none edits in place)."""
        training = self.training_sequences()
        if self.lengths is None or self.lengths[0] is not training or self.lengths[1] != len(training):
            self.lengths = (training, len(training), Counter(len(s) for _, s in training))
        return self.lengths[2]

    def report(
        self,
        artifacts: Sequence[str],
        details: Sequence[dict],
        out_dir: Path,
        overwrite: bool,
        provenance: dict | None = None,
    ) -> list[Path]:
        """samples.csv (the descriptions' columns) and PNGs: composition and lengths vs training, novelty."""
        training = self.training_sequences()
        return analysis.report(
            artifacts, details, Path(out_dir), overwrite, self.background, training, provenance
        )

    def constraint(self) -> LogitsProcessor | None:
        return None

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        state = {
            "alphabet": ALPHABET,
            "specials": SPECIALS,
            "background": self.background,
            "unknown_letters": self.unknown_letters,
            "min_len": self.min_len,
            "max_len": self.max_len,
            "max_x_fraction": self.max_x_fraction,
            "fim_rate": self.fim_rate,
            "fim_spm_rate": self.fim_spm_rate,
        }
        write_new_text(directory / "protein.json", json.dumps(state, indent=1), overwrite=True)
        if training := self.training_sequences():
            records = (SeqRecord(Seq(s), id=i, description="") for i, s in training)

            def write_gz(tmp: Path) -> None:
                # no time stamp or file name in the gzip header: equal state, equal bytes (the digest)
                with (
                    open(tmp, "wb") as raw,
                    gzip.GzipFile("", "wb", fileobj=raw, mtime=0) as gz,
                    io.TextIOWrapper(gz, encoding="ascii") as handle,
                ):
                    SeqIO.write(records, handle, "fasta")

            write_new_file(directory / "train.fasta.gz", write_gz, overwrite=True)

    @classmethod
    def load(cls, directory: Path) -> ProteinDomain:
        state = json.loads((directory / "protein.json").read_text())
        if state["alphabet"] != ALPHABET or tuple(state["specials"]) != SPECIALS:
            raise ValueError(f"{directory}: vocabulary differs from this version of the protein domain")
        keys = ("unknown_letters", "min_len", "max_len", "max_x_fraction", "fim_rate", "fim_spm_rate")
        domain = cls(background=state["background"], **{k: state[k] for k in keys if k in state})
        domain.training_file = directory / "train.fasta.gz"
        return domain
