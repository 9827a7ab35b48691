"""The notebooks run top to bottom with the Python API, in a temporary folder."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from Bio import SeqIO
from nbclient import NotebookClient
from symusic import Score

NOTEBOOKS = Path(__file__).parents[1] / "notebooks"


def execute(name: str, folder: Path) -> nbformat.NotebookNode:
    """Run notebooks/<name> with folder as its working directory; a failing cell raises."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(folder)}}
    ).execute()
    return nb


def test_quickstart_notebook_executes_and_writes_fasta_and_midi(tmp_path):
    execute("quickstart.ipynb", tmp_path)
    out = tmp_path / "outputs" / "notebook"
    assert len(list(SeqIO.parse(out / "protein" / "samples.fasta", "fasta"))) == 8
    assert Score(str(out / "music" / "sample_000.mid")).ticks_per_quarter > 0


# slow tier (27-40 s each on 2 cores); the quickstart notebook stays in the default run
@pytest.mark.slow
def test_protein_notebook_executes_with_tags_ranking_and_novelty(tmp_path):
    execute("protein.ipynb", tmp_path)
    out = tmp_path / "outputs" / "protein_notebook"
    assert len(list(SeqIO.parse(out / "ranked" / "top" / "samples.fasta", "fasta"))) == 5
    assert all(
        "tags=OX=83333" in r.description for r in SeqIO.parse(out / "ecoli" / "samples.fasta", "fasta")
    )
    assert (out / "ranked" / "novelty.png").exists()


# slow tier (27-40 s each on 2 cores); the quickstart notebook stays in the default run
@pytest.mark.slow
def test_code_notebook_executes_completion_infill_and_report(tmp_path):
    execute("code.ipynb", tmp_path)
    out = tmp_path / "outputs" / "code_notebook"
    text = (out / "infill" / "sample_000.py").read_text().split("\n", 1)[1]
    assert text.startswith("def area(width, height):\n    ") and text.endswith("\n\nprint(area(2, 3))\n")
    assert (out / "complete" / "syntax_report.tsv").exists()


# slow tier (27-40 s each on 2 cores); the quickstart notebook stays in the default run
@pytest.mark.slow
def test_music_notebook_executes_continuation_piano_rolls_and_statistics(tmp_path):
    nb = execute("music.ipynb", tmp_path)
    out = tmp_path / "outputs" / "music_notebook"
    assert Score(str(out / "continued" / "sample_000.mid")).note_num() > 0
    assert (out / "prompt.png").exists() and (out / "continued" / "sample_001.png").exists()
    printed = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "groove_consistency" in printed and "token error rate 0.0" in printed
