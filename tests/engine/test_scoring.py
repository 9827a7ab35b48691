"""One scoring path: `multiar eval`, `multiar score`, `multiar quantize`'s report and a run's final metrics
score the run's reference documents as they were trained (control tags as context), checked against a
plain forward pass computed here."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from conftest import TINY

from multiar.cli import main
from multiar.commands.evaluate import eval_run
from multiar.commands.score import score_run
from multiar.config import load_config
from multiar.run_folder import load_run
from multiar.training.run import train

SEQS = [
    "MKTAYIAKQRQISFVKSHFSRQ",
    "MKKLLPTAAAGLLLLAAQPAMA",
    "MSTNPKPQRKTKRNTNRRPQDVKFPGG",
    "MAAAAGLLKKWWSTTPPRRE",
    "MGGKWSKSSVVGWPAVRERM",
    "MQSLLKRAAEEHHGGPPLLA",
    "MTTRRQQWWEELLKKPPAGS",
    "MDDEEKKRRLLIIVVAAGGS",
    "MPPLLKKQQAAGGSSTTRRE",
    "MHHWWYYFFLLKKRRAAGGS",
]


def tag(i: int) -> str:
    return "A" if i % 2 else "B"


def fasta_file(tmp_path, i: int):
    """Sequence i in data/<its tag>/p<i>.fasta."""
    return tmp_path / "data" / tag(i) / f"p{i}.fasta"


def tagged_run(tmp_path, source: str = "tsv", *extra: str):
    """A tiny protein run tagged A/B by sequence, from a TSV table or from each file's folder."""
    for i, s in enumerate(SEQS):
        fasta_file(tmp_path, i).parent.mkdir(parents=True, exist_ok=True)
        fasta_file(tmp_path, i).write_text(f">p{i}\n{s}\n")
    table = tmp_path / "tags.tsv"
    table.write_text("".join(f"p{i}\t{tag(i)}\n" for i in range(len(SEQS))))
    run = tmp_path / "run"
    overrides = [
        *TINY,
        "domain=protein",
        f"data.paths=[{tmp_path / 'data'}]",
        f"data.tags={'tsv:' + str(table) if source == 'tsv' else source}",
        "data.val_fraction=0.4",
        f"run_dir={run}",
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        *extra,
    ]
    train(load_config("train", overrides))
    return run


def plain_nats(model, ids: list[int], head: list[int], bos: int, eos: int) -> float:
    """Nats of ids + EOS after BOS + head, by one uncached forward pass and a log-softmax."""
    x = torch.tensor([[bos, *head, *ids, eos]])
    with torch.no_grad():
        logp = torch.log_softmax(model(x[:, :-1]).double(), -1)[0]  # (T, V)
    return -sum(float(logp[j, x[0, j + 1]]) for j in range(len(head), x.size(1) - 1))


def test_eval_scores_each_document_with_its_tags_and_reports_the_untagged_figure(tmp_path):
    run = tagged_run(tmp_path)
    result = eval_run(load_config("eval", [f"run={run}", "n=0"]))
    loaded = load_run(run)
    d = loaded.domain
    reference = json.loads((run / "reference" / "validation.json").read_text())
    assert set(reference["tags"]) == set(reference["keys"])  # every document's tags are stored
    tagged = untagged = 0.0
    for key in reference["keys"]:
        i = int(key.split("/p")[1].split(".")[0])
        ids = d.base.encode(next(iter(d.base.read(fasta_file(tmp_path, i)))))
        assert reference["tags"][key] == [tag(i)]
        tagged += plain_nats(loaded.model, ids, d.ids_of_tags(reference["tags"][key]), d.bos_id, d.eos_id)
        untagged += plain_nats(loaded.model, ids, [], d.bos_id, d.eos_id)
    tokens = result["tokens"]
    assert result["ppl"] == pytest.approx(math.exp(tagged / tokens), rel=1e-5)
    assert result["untagged"]["ppl"] == pytest.approx(math.exp(untagged / tokens), rel=1e-5)
    assert result["ppl"] != pytest.approx(result["untagged"]["ppl"], rel=1e-6)
    saved = json.loads((run / "eval" / "eval.json").read_text())
    assert saved["untagged"]["ppl"] == result["untagged"]["ppl"]


def test_quantize_reports_eval_s_perplexity_on_a_tsv_tagged_run(tmp_path):
    run = tagged_run(tmp_path)
    assert main(["quantize", f"run={run}"]) == 0  # was: "train split is empty" (no TSV table on reload)
    report = json.loads((run / "quantize.json").read_text())
    result = eval_run(load_config("eval", [f"run={run}", "n=0"]))
    assert report["val_tokens"] == result["tokens"] and report["val_documents"] == result["documents"]
    assert report["val_ppl_fp32"] == pytest.approx(result["ppl"], rel=1e-9)
    final = load_run(run).config["final"]  # the run's own final figure: the same documents, as trained
    assert final["val_docs/ppl"] == pytest.approx(result["ppl"], rel=1e-6)
    assert final["val_docs/tokens"] == result["tokens"]


def test_score_of_a_tagged_run_uses_each_document_s_tags_and_shows_the_untagged_figure(tmp_path):
    run = tagged_run(tmp_path, "folder")
    out = score_run(load_config("score", [f"run={run}", f"data.paths=[{tmp_path / 'data'}]"]))
    with open(out) as f:
        rows = list(csv.DictReader(f))
    loaded = load_run(run)
    d = loaded.domain
    assert len(rows) == len(SEQS)
    for row in rows:
        i = int(row["document"].split("/p")[1].split(".")[0])
        assert row["tags"] == tag(i)
        ids = d.base.encode(next(iter(d.base.read(fasta_file(tmp_path, i)))))
        with_tags = plain_nats(loaded.model, ids, d.ids_of_tags([tag(i)]), d.bos_id, d.eos_id)
        without = plain_nats(loaded.model, ids, [], d.bos_id, d.eos_id)
        assert float(row["log_likelihood"]) == pytest.approx(-with_tags, abs=2e-3)
        assert float(row["untagged_log_likelihood"]) == pytest.approx(-without, abs=2e-3)


def test_quantize_scores_the_hf_dataset_the_run_was_trained_on(tmp_path):
    from datasets import Dataset

    data = tmp_path / "hf"
    Dataset.from_dict({"sequence": SEQS}).save_to_disk(str(data))
    run = tmp_path / "run"
    overrides = [
        *TINY,
        "domain=protein",
        f"data.hf_dataset={data}",
        "data.hf_column=sequence",
        "data.val_fraction=0.3",
        f"run_dir={run}",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
    ]
    train(load_config("train", overrides))
    assert main(["quantize", f"run={run}"]) == 0
    report = json.loads((run / "quantize.json").read_text())
    result = eval_run(load_config("eval", [f"run={run}", "n=0"]))
    # was: the bundled corpus (data.paths is empty for an HF run), thousands of tokens
    assert report["val_tokens"] == result["tokens"] < sum(len(s) + 1 for s in SEQS)
    assert report["val_ppl_fp32"] == pytest.approx(result["ppl"], rel=1e-9)


def test_a_tsv_tagged_run_resumes_with_the_table_it_was_trained_on(tmp_path):
    run = tagged_run(tmp_path)
    first = json.loads((run / "reference" / "validation.json").read_text())["tags"]
    # the resumed run encodes its data with its saved domain (tags.json keeps the TSV's table)
    tagged_run(tmp_path, "tsv", "ckpt_path=last", "trainer.max_steps=5")
    assert load_run(run).config["final"]["steps"] == 5
    assert json.loads((run / "reference" / "validation.json").read_text())["tags"] == first


def test_a_failure_to_score_the_validation_documents_never_costs_the_run(tmp_path, monkeypatch, caplog):
    import logging

    import multiar.training.run

    def gone(*args, **kwargs):
        raise FileNotFoundError("data/B/p0.fasta: a validation file is gone")

    monkeypatch.setattr(multiar.training.run, "reference_documents", gone)
    with caplog.at_level(logging.WARNING, logger="multiar"):
        run = tagged_run(tmp_path)
    assert (run / "model.safetensors").exists()  # the weights are saved all the same
    assert "val_docs/ppl" not in load_run(run).config["final"]
    assert any("val_docs/*: not scored" in r.getMessage() for r in caplog.records)


def test_a_run_without_reference_is_quantized_and_says_its_ppl_was_not_measured(tmp_path, capsys):
    from conftest import copy_fixture_run

    run = copy_fixture_run(tmp_path)  # the foundation's format: no reference/
    assert main(["quantize", f"run={run}"]) == 0
    report = json.loads((run / "quantize.json").read_text())
    assert (run / "model.int8.safetensors").exists() and "val_ppl_fp32" not in report
    assert report["val_ppl"].startswith("not measured:") and "reference" in report["val_ppl"]
    assert "validation ppl not measured" in capsys.readouterr().out
