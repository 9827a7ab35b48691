"""`multiar score` streams: documents are scored a chunk at a time and their rows appended, the same rows
as scoring them all at once; memory and time per record do not grow with the number of records."""

from __future__ import annotations

import csv
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY, proteome_subset

from multiar.commands import score
from multiar.commands.score import score_run
from multiar.config import load_config
from multiar.data.reference import encoded_chunks, read_documents
from multiar.data.source import Source
from multiar.domains import build_domain
from multiar.engine.scoring import score_documents
from multiar.run_folder import load_run
from multiar.training.run import train

AMINO = "ACDEFGHIKLMNPQRSTVWY"


@pytest.fixture(scope="module")
def protein_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("score")
    data = proteome_subset(tmp / "data", per_file=20)
    overrides = [*TINY, "domain=protein", f"data.paths=[{data}]", f"run_dir={tmp / 'run'}",
                 "trainer.max_steps=2", "trainer.val_check_interval=2"]  # fmt: skip
    train(load_config("train", overrides))
    return tmp / "run"


def fasta(path: Path, n: int, seed: int = 0) -> Path:
    """n random protein records of 5 to 150 residues (some longer than the block: several windows)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            f.write(f">r{i}\n{''.join(rng.choices(AMINO, k=rng.randint(5, 150)))}\n")
    return path


def rows_of(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_streamed_rows_equal_the_scores_of_all_documents_at_once(protein_run, tmp_path, monkeypatch, capsys):
    query = tmp_path / "q"
    query.mkdir()
    fasta(query / "many.fasta", 230)
    monkeypatch.setattr(score, "CHUNK", 50)  # 5 chunks
    out = score_run(
        load_config("score", [f"run={protein_run}", f"data.paths=[{query}]", f"out={tmp_path / 's.csv'}"])
    )
    rows = rows_of(out)
    assert [r["document"] for r in rows] == [f"many.fasta#{i}" for i in range(230)]
    assert "230 documents" in capsys.readouterr().err.splitlines()[-1]  # the running summary
    # the reference: every document read and scored together, as score did before it streamed
    run = load_run(protein_run)
    docs = read_documents(run.domain, Source(run.domain, [str(query)])).head(40)
    nats = score_documents(run.model, docs, run.domain.bos_id, run.domain.eos_id, 16)
    for r, ids, n in zip(rows, docs.ids, nats, strict=False):
        tokens = len(ids) + 1
        assert int(r["tokens"]) == tokens
        assert float(r["log_likelihood"]) == pytest.approx(-n, abs=2e-4)
        assert float(r["ppl"]) == pytest.approx(math.exp(n / tokens), abs=2e-4)
    with pytest.raises(FileExistsError):  # an existing CSV is kept unless overwrite
        score_run(load_config("score", [f"run={protein_run}", f"data.paths=[{query}]", f"out={out}"]))


def peak_rss_and_seconds(run: Path, folder: Path, out: Path) -> tuple[float, float]:
    """Peak RSS (MB) and CPU seconds of score_run over folder, in a fresh process (start-up excluded).
    CPU time, not wall time: another job on this machine (a build, a benchmark) stretches the wall clock
    of one run and not the other's (seen: 26x per record), not the work done."""
    script = (
        "import resource, sys, time\n"
        "from multiar.commands.score import score_run\n"
        "from multiar.config import load_config\n"
        "started = time.process_time()\n"
        "score_run(load_config('score', sys.argv[1:]))\n"
        "print(time.process_time() - started, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
    )
    args = [f"run={run}", f"data.paths=[{folder}]", f"out={out}", "batch_size=64"]
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, check=True)
    seconds, rss = map(float, done.stdout.split()[-2:])
    return rss, seconds


def test_memory_and_time_per_record_stay_flat_short(protein_run, tmp_path):
    sizes, measured = (1000, 8000), {}
    for n in sizes:
        folder = tmp_path / f"d{n}"
        folder.mkdir()
        fasta(folder / "many.fasta", n)
        measured[n] = peak_rss_and_seconds(protein_run, folder, tmp_path / f"s{n}.csv")
        assert len(rows_of(tmp_path / f"s{n}.csv")) == n
    (rss_small, t_small), (rss_large, t_large) = measured[sizes[0]], measured[sizes[1]]
    print(f"score: n={sizes[0]}: {rss_small:.0f} MB {1000 * t_small / sizes[0]:.3f} ms/record; "
          f"n={sizes[1]}: {rss_large:.0f} MB {1000 * t_large / sizes[1]:.3f} ms/record")  # fmt: skip
    assert rss_large - rss_small < 60  # one chunk at a time (the 8,000-record file itself is ~0.6 MB)
    assert t_large / sizes[1] <= 2.5 * t_small / sizes[0] + 0.001  # loose: a shared CPU


def test_a_failed_score_keeps_the_previous_csv_and_leaves_no_short_one(protein_run, tmp_path, monkeypatch):
    query = tmp_path / "q"
    query.mkdir()
    fasta(query / "many.fasta", 120)
    out = tmp_path / "s.csv"
    args = [f"run={protein_run}", f"data.paths=[{query}]", f"out={out}", "overwrite=true"]
    monkeypatch.setattr(score, "CHUNK", 50)
    score_run(load_config("score", args))
    before = out.read_bytes()
    real, calls = score.score_chunk, []

    def failing(*a, **k):  # the second chunk fails (a full disk, a bad record)
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(score, "score_chunk", failing)
    with pytest.raises(OSError):
        score_run(load_config("score", args))
    assert out.read_bytes() == before  # overwrite=true replaces it only once every chunk is scored
    assert len(rows_of(out.with_name("s.csv.partial"))) == 50  # the rows scored so far, whole


def test_encoded_chunks_come_size_at_a_time_and_all_at_once_as_read_documents_reads_them(tmp_path):
    domain = build_domain("protein")
    folder = tmp_path / "q"
    folder.mkdir()
    fasta(folder / "a.fasta", 100)
    source = Source(domain, [str(folder)])
    whole = read_documents(domain, source)
    for size in (7, 50, 100, 1000):  # 100 is a multiple of 50 and 100: no empty chunk after the last
        chunks = list(encoded_chunks(domain, source, size=size))
        assert [len(c) for c in chunks] == [min(size, 100 - k) for k in range(0, 100, size)]
        assert [k for c in chunks for k in c.keys] == whole.keys == [f"a.fasta#{i}" for i in range(100)]
        assert [i for c in chunks for i in c.ids] == whole.ids
    with pytest.raises(ValueError, match="give 1 or more"):
        next(encoded_chunks(domain, source, size=0))
    (folder / "a.fasta").unlink()
    assert list(encoded_chunks(domain, source, size=10)) == []
    assert [len(c) for c in encoded_chunks(domain, source)] == [0]  # all at once: one, empty
    with pytest.raises(ValueError, match="no document to evaluate"):
        read_documents(domain, source)
