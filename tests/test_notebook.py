"""The quickstart notebook runs top to bottom with the Python API."""

from __future__ import annotations

from pathlib import Path

import nbformat
from Bio import SeqIO
from nbclient import NotebookClient
from symusic import Score

NOTEBOOK = Path(__file__).parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_executes_and_writes_fasta_and_midi(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    out = tmp_path / "outputs" / "notebook"
    assert len(list(SeqIO.parse(out / "protein" / "samples.fasta", "fasta"))) == 8
    assert Score(str(out / "music" / "sample_000.mid")).ticks_per_quarter > 0


def test_protein_notebook_executes_with_tags_ranking_and_novelty(tmp_path):
    nb = nbformat.read(NOTEBOOK.with_name("protein.ipynb"), as_version=4)
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    out = tmp_path / "outputs" / "protein_notebook"
    assert len(list(SeqIO.parse(out / "ranked" / "top" / "samples.fasta", "fasta"))) == 5
    assert all(
        "tags=OX=83333" in r.description for r in SeqIO.parse(out / "ecoli" / "samples.fasta", "fasta")
    )
    assert "novelty" not in nb.cells[-1].outputs[0].get("ename", "")


def test_code_notebook_executes_completion_infill_and_report(tmp_path):
    nb = nbformat.read(NOTEBOOK.with_name("code.ipynb"), as_version=4)
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    out = tmp_path / "outputs" / "code_notebook"
    text = (out / "infill" / "sample_000.py").read_text().split("\n", 1)[1]
    assert text.startswith("def area(width, height):\n    ") and text.endswith("\n\nprint(area(2, 3))\n")
    assert (out / "complete" / "syntax_report.tsv").exists()
