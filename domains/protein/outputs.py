"""How `multiar generate` writes protein samples as they come: samples.fasta and samples.csv grow by
appending each batch (one write, fsynced per batch), never re-read; the set-level metrics and figures
come from counts accumulated as samples finish (`ProteinSummary`), so a run of any size keeps no
sample in memory."""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from Bio import SeqIO
from Bio.Seq import Seq
from Bio.SeqRecord import SeqRecord

from multiar.domain import Domain, MetricSummary, SampleFiles, counted_median
from multiar.domains.protein import analysis
from multiar.files import Appender, safe_child, write_new_file


class ProteinFiles(SampleFiles):
    """samples.fasta (a record per sample, its details and the settings in the description) and
    samples.csv (the same columns, a row per sample), appended batch by batch. Ranks, known only at
    the end, are written into both by one streaming pass in `close`."""

    NAMES = ("samples.fasta", "samples.csv")

    def __init__(self, domain: Domain, out_dir: Path, provenance: dict, overwrite: bool) -> None:
        super().__init__(domain, out_dir, provenance, overwrite)
        self.settings = " ".join(f"{k}={v}" for k, v in provenance.items())
        self.columns = [*analysis.CSV_COLUMNS[:-1], *provenance, analysis.CSV_COLUMNS[-1]]
        self.files = {name: Appender(safe_child(self.out_dir, name), overwrite) for name in self.NAMES}
        self.started = False

    def add(self, artifacts: Sequence[str], start: int, details: Sequence[dict] | None) -> list[Path]:
        if not self.started:  # a new file: the CSV's header first
            buf = io.StringIO()
            csv.DictWriter(buf, fieldnames=self.columns, lineterminator="\n").writeheader()
            self.files["samples.csv"].write(buf.getvalue())
            self.started = True
        details = details or [{} for _ in artifacts]
        records = [
            SeqRecord(
                Seq(seq),
                id=d.get("id", f"multiar_{start + i:04d}"),
                description=analysis.describe(seq, d, self.settings),
            )
            for i, (seq, d) in enumerate(zip(artifacts, details, strict=True))
        ]
        fasta, table = io.StringIO(), io.StringIO()
        SeqIO.write(records, fasta, "fasta")
        writer = csv.DictWriter(table, fieldnames=self.columns, extrasaction="ignore", lineterminator="\n")
        for i, (seq, d) in enumerate(zip(artifacts, details, strict=True), start=start):
            row = {"id": f"multiar_{i:04d}", "length": len(seq), "sequence": seq, **self.provenance, **d}
            writer.writerow(row)
        # one write per file and batch: a kill leaves whole records (and resume cuts any tail)
        self.files["samples.fasta"].write(fasta.getvalue())
        self.files["samples.csv"].write(table.getvalue())
        return [f.path for f in self.files.values()]

    def sync(self) -> dict[str, int]:
        return {name: f.sync() for name, f in self.files.items()} if self.started else {}

    def resume(self, sizes: dict[str, int]) -> None:
        super().resume(sizes)
        for name, f in self.files.items():
            f.overwrite = True
            if name in sizes:
                f.resume(sizes[name])
        self.started = bool(sizes)

    def close(self, ranks: Mapping[int, int]) -> list[Path]:
        if not self.started:
            self.add([], 0, [])
        for f in self.files.values():
            f.close()
        self.domain.close_novelty()  # type: ignore[attr-defined]
        if ranks:
            self._rank_fasta(ranks)
            self._rank_csv(ranks)
        return [f.path for f in self.files.values()]

    def _rank_fasta(self, ranks: Mapping[int, int]) -> None:
        """rank=N into the ranked records' descriptions, where describe() puts it: one streaming pass."""
        path, settings = self.out_dir / "samples.fasta", self.settings

        def write(tmp: Path) -> None:
            index = -1
            with open(path, encoding="utf-8") as src, open(tmp, "w", encoding="utf-8") as out:
                for line in src:
                    if line.startswith(">"):
                        index += 1
                        if index in ranks:
                            line = ranked_header(line.rstrip("\n"), ranks[index], settings) + "\n"
                    out.write(line)

        write_new_file(path, write, overwrite=True)

    def _rank_csv(self, ranks: Mapping[int, int]) -> None:
        path, column = self.out_dir / "samples.csv", self.columns.index("rank")

        def write(tmp: Path) -> None:
            with open(path, encoding="utf-8", newline="") as src, open(tmp, "w", encoding="utf-8") as out:
                rows, writer = csv.reader(src), csv.writer(out, lineterminator="\n")
                writer.writerow(next(rows))
                for index, row in enumerate(rows):
                    if index in ranks:
                        row[column] = str(ranks[index])
                    writer.writerow(row)

        write_new_file(path, write, overwrite=True)


def ranked_header(header: str, rank: int, settings: str) -> str:
    """A FASTA header line with rank=N where describe() places it: after passes, before 'truncated' and
    the settings."""
    tail = (" truncated " + settings if settings else " truncated").rstrip()
    if not header.endswith(tail):
        tail = " " + settings if settings else ""
    head = header[: len(header) - len(tail)] if tail else header
    return f"{head} rank={rank}{tail}"


class ProteinSummary(MetricSummary):
    """Counts that give the protein metrics and figures of any number of samples: residues, lengths,
    identities (4 decimals, as the files hold them), passing and empty samples."""

    def __init__(self, background: dict[str, float] | None, train_lengths: Counter) -> None:
        super().__init__()
        self.background, self.train_lengths = background, train_lengths
        self.residues: Counter = Counter()
        self.lengths: Counter = Counter()
        self.identities: Counter = Counter()
        self.passes = self.judged = 0

    def add(self, domain: Domain, artifacts: Sequence[str], details: Sequence[dict]) -> None:
        self.count += len(artifacts)
        for seq in artifacts:
            self.residues.update(seq)
            self.lengths[len(seq)] += 1
        for d in details:
            if "identity" in d:
                self.identities[d["identity"]] += 1
            if "passes" in d:
                self.judged += 1
                self.passes += bool(d["passes"])

    def metrics(self, domain: Domain) -> dict[str, float]:
        n = max(self.count, 1)
        out = {
            "protein/mean_length": sum(k * v for k, v in self.lengths.items()) / n,
            "protein/empty_rate": self.lengths[0] / n,
        }
        if self.background and (kl := analysis.counts_kl(self.residues, self.background)) is not None:
            out["protein/aa_kl"] = kl
        if self.count and self.train_lengths:
            out["protein/length_ks"] = analysis.counts_ks(self.lengths, self.train_lengths)
        if self.identities:
            out["protein/median_identity"] = counted_median(self.identities)
        if self.judged:
            out["protein/pass_rate"] = self.passes / self.judged
        return out

    def files(self, domain: Domain, out_dir: Path, overwrite: bool, provenance: dict) -> list[Path]:
        counts: tuple[Any, ...] = (self.residues, self.count, self.lengths, self.identities)
        return analysis.figures(*counts, self.background, self.train_lengths, Path(out_dir), overwrite)
