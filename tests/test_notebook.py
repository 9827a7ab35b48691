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
