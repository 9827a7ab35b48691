"""How `multiar generate` writes code samples as they come: sample_NNN.py written once each, and
syntax_report.tsv grown by a line per sample (appended, never re-read while sampling), its closing
count written once at the end."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from multiar.domain import Domain, SampleFiles
from multiar.domains.code.analysis import parses
from multiar.files import Appender, safe_child, write_new_text


def sample_header(provenance: dict) -> str:
    """The provenance as a comment line: the file stays the sample's code, and says where it came from."""
    settings = " ".join(f"{k}={v}" for k, v in provenance.items()).replace("\n", " ").replace("\r", " ")
    return f"# multiar sample: {settings}\n" if settings else ""


def report_line(path: Path, src: str, end: str | None = None, cut: int = 0) -> str:
    """The sample's line: its file, whether it parses, why sampling ended it (eos, block, stop, length,
    no_valid_token) when known, and `cut N` when N new tokens after its last complete statement were
    left out (unfinished=cut)."""
    line = f"{path.name}\t{'ok' if parses(src) else 'syntax error'}" + (f"\t{end}" if end else "")
    return line + (f"\tcut {cut}" if end and cut else "") + "\n"


class CodeFiles(SampleFiles):
    """sample_NNN.py per sample; syntax_report.tsv a line each, then '# K of N samples parse'."""

    def __init__(self, domain: Domain, out_dir: Path, provenance: dict, overwrite: bool) -> None:
        super().__init__(domain, out_dir, provenance, overwrite)
        self.header = sample_header(provenance)
        self.report = Appender(self.out_dir / "syntax_report.tsv", overwrite)

    def add(self, artifacts: Sequence[str], start: int, details: Sequence[dict] | None) -> list[Path]:
        paths = [
            write_new_text(
                safe_child(self.out_dir, f"sample_{start + i:03d}.py"), self.header + src, self.overwrite
            )
            for i, src in enumerate(artifacts)
        ]
        ends = [d.get("end") for d in details] if details is not None else [None] * len(paths)
        cuts = [d.get("cut_tokens", 0) for d in details] if details is not None else [0] * len(paths)
        self.report.write("".join(map(report_line, paths, artifacts, ends, cuts)))
        return paths

    def sync(self) -> dict[str, int]:
        return {"syntax_report.tsv": self.report.sync()}

    def resume(self, sizes: dict[str, int]) -> None:
        super().resume(sizes)
        self.report.overwrite = True
        if "syntax_report.tsv" in sizes:
            self.report.resume(sizes["syntax_report.tsv"])

    def close(self, ranks: Mapping[int, int]) -> list[Path]:
        self.report.sync()
        with open(self.report.path, encoding="utf-8") as lines:  # one pass at the end: the count
            states = [line.split("\t")[1:2] == ["ok"] for line in lines if not line.startswith("#")]
        self.report.write(f"# {sum(states)} of {len(states)} samples parse\n")
        self.report.close()
        return [self.report.path]
