"""`multiar eval` and `multiar score`: the figures are checked against hand computations and orderings."""

from __future__ import annotations

import csv
import json
import math
import random
import shutil

import pytest
from conftest import TINY, bundled_files

from multiar.cli import main
from multiar.commands.evaluate import eval_run
from multiar.commands.score import score_run
from multiar.config import load_config
from multiar.training.run import train

SEQS = [
    "MKTAYIAKQR",
    "MKKLLPTAAAGLLLLAAQPAMA",
    "MSTNPKPQRKTKRNTNRRPQDVKFPGG",
    "MAAAAG",
    "MGGKWSKSSVVGWPAVRERM",
]


def fasta_folder(tmp_path, seqs=SEQS, name="data"):
    folder = tmp_path / name
    folder.mkdir()
    for i, s in enumerate(seqs):
        (folder / f"p{i}.fasta").write_text(f">p{i}\n{s}\n")
    return folder


def train_on(tmp_path, domain, paths, steps=2, *extra):
    cfg = load_config(
        "train",
        [
            *TINY,
            f"domain={domain}",
            f"data.paths=[{paths}]",
            f"run_dir={tmp_path / 'run'}",
            f"trainer.max_steps={steps}",
            f"trainer.val_check_interval={steps}",
            "data.val_fraction=0.3",
            *extra,
        ],
    )
    train(cfg)
    return tmp_path / "run"


def test_unigram_baseline_equals_a_hand_computation(tmp_path):
    run = train_on(tmp_path, "protein", fasta_folder(tmp_path))
    reference = json.loads((run / "reference" / "validation.json").read_text())
    val_names = {k.split(".")[0] for k in reference["keys"]}
    train_seqs = [s for i, s in enumerate(SEQS) if f"p{i}" not in val_names]
    val_seqs = [s for i, s in enumerate(SEQS) if f"p{i}" in val_names]
    assert train_seqs and val_seqs
    from multiar.domains import load_domain

    domain = load_domain("protein", run / "domain")
    counts = [0] * domain.vocab_size
    for s in train_seqs:
        for a in s:
            counts[domain.stoi[a]] += 1
        counts[domain.eos_id] += 1
    total = sum(counts) + domain.vocab_size  # add-one
    nats = -sum(math.log((counts[domain.stoi[a]] + 1) / total) for s in val_seqs for a in s)
    nats -= len(val_seqs) * math.log((counts[domain.eos_id] + 1) / total)
    tokens = sum(len(s) + 1 for s in val_seqs)
    result = eval_run(load_config("eval", [f"run={run}", "n=1", "max_new_tokens=4"]))
    assert result["unigram"]["ppl"] == pytest.approx(math.exp(nats / tokens), rel=1e-9)
    assert result["tokens"] == tokens and result["units"] == sum(map(len, val_seqs))
    assert result["unigram"]["bits_per_unit"] == pytest.approx(nats / sum(map(len, val_seqs)) / math.log(2))
    saved = json.loads((run / "eval" / "eval.json").read_text())
    for key in ("loss", "ppl", "bits_per_unit", "unit", "tokens", "metrics"):
        assert key in saved
    assert (
        saved["unit"] == "residue"
        and saved["unigram"]["ppl"]
        and saved["init"]["ppl"]
        and saved["val"]["ppl"]
    )
    assert "protein/mean_length" in saved["metrics"]
    assert (run / "eval" / "eval.md").read_text().startswith("# multiar eval")
    assert (run / "eval" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(FileExistsError, match="overwrite=true"):
        eval_run(load_config("eval", [f"run={run}", "n=0"]))


def test_a_trained_model_prefers_its_training_text_to_shuffled_tokens(tmp_path):
    files = bundled_files("code", 6)
    data = tmp_path / "code"
    data.mkdir()
    for f in files:
        shutil.copy(f, data / f.name)
    run = train_on(tmp_path, "code", data, 40, "optim.lr=3e-3", "data.val_fraction=0.2")
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    rng = random.Random(0)
    for f in files:
        words = f.read_text().split(" ")
        rng.shuffle(words)
        (shuffled / f.name).write_text(" ".join(words))
    own = eval_run(
        load_config("eval", [f"run={run}", f"data.paths=[{data}]", "n=0", f"out={tmp_path / 'a'}"])
    )
    other = eval_run(
        load_config("eval", [f"run={run}", f"data.paths=[{shuffled}]", "n=0", f"out={tmp_path / 'b'}"])
    )
    assert own["unit"] == "byte" and own["units"] == sum(len(f.read_bytes()) for f in files)
    assert own["bits_per_unit"] < other["bits_per_unit"]
    assert own["ppl"] < own["init"]["ppl"]  # it learned something in 40 steps


def test_score_writes_one_row_per_record_and_skips_bad_files(tmp_path, capsys):
    run = train_on(tmp_path, "protein", fasta_folder(tmp_path))
    query = tmp_path / "query"
    query.mkdir()
    (query / "two.fasta").write_text(">a desc\nMKTAYIAKQR\n>b\nMAAAAG\n")
    (query / "broken.fasta.gz").write_bytes(b"\x1f\x8b\x08not gzip")
    out = score_run(load_config("score", [f"run={run}", f"data.paths=[{query}]"]))
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [r["document"] for r in rows] == ["two.fasta#0", "two.fasta#1"]
    assert [int(r["residues"]) for r in rows] == [10, 6] and [int(r["tokens"]) for r in rows] == [11, 7]
    for r in rows:
        assert float(r["ppl"]) == pytest.approx(
            math.exp(-float(r["log_likelihood"]) / int(r["tokens"])), rel=1e-3
        )
    assert main(["score", f"run={run}"]) == 2  # data.paths is required
    assert "data.paths" in capsys.readouterr().err


def test_eval_of_a_run_without_reference_names_the_folder(tmp_path, capsys):
    run = train_on(tmp_path, "protein", fasta_folder(tmp_path))
    shutil.rmtree(run / "reference")
    assert main(["eval", f"run={run}"]) == 1
    assert "reference" in capsys.readouterr().err
