"""Run folders and configs that users share: format versions, planted pickles, names that try to leave
the output folder, no network, a typed config with one-line errors, and byte-identical reruns."""

from __future__ import annotations

import csv
import json
import pickle
import socket
from pathlib import Path

import pytest
import torch
import yaml
from conftest import FIXTURE_RUN, TINY, copy_fixture_run

from multiar.cli import main
from multiar.commands.generate import sample_to_files
from multiar.config import load_config
from multiar.errors import ConfigError
from multiar.files import safe_child, safe_name
from multiar.run_folder import FORMAT_VERSION, load_run
from multiar.training.run import train

TINY = [*TINY, "trainer.val_check_interval=5"]


# --- format versions ---------------------------------------------------------------------------


def test_a_run_of_the_foundation_format_still_loads_with_the_same_logits():
    expected = json.loads((FIXTURE_RUN.parent / "run_format0_logits.json").read_text())
    run = load_run(FIXTURE_RUN)
    assert "format_version" not in run.config  # version 0: written before the key existed
    with torch.no_grad():
        logits = run.model(torch.tensor([run.domain.prompt_ids(expected["prompt"])]))[0, -1]
    assert torch.allclose(logits, torch.tensor(expected["last_logits"]), atol=1e-4)


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, "two", -1])
def test_a_newer_or_unknown_format_version_is_a_one_line_error(tmp_path, capsys, version):
    run = copy_fixture_run(tmp_path)
    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({"format_version": version, **config}))
    with pytest.raises(ConfigError, match="newer multiar" if version == FORMAT_VERSION + 1 else "unknown"):
        load_run(run)
    assert main(["generate", f"run={run}", f"out={tmp_path / 'o'}"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_new_runs_write_the_current_format_version(tmp_path):
    run = tmp_path / "run"
    train(load_config("train", ["data.max_documents=60", f"run_dir={run}", "trainer.max_steps=2", *TINY]))
    text = (run / "config.yaml").read_text()
    assert text.startswith(f"format_version: {FORMAT_VERSION}\n")
    assert load_run(run).config["format_version"] == FORMAT_VERSION


# --- nothing from a run folder is executed -------------------------------------------------------


class Payload:
    """Unpickling this creates a marker file: proof that code from a run folder ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_planted_pickle_never_runs_as_weights_or_as_a_checkpoint(tmp_path):
    marker = tmp_path / "PWNED"
    run = copy_fixture_run(tmp_path)
    (run / "model.safetensors").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(ValueError, match="model.safetensors: not loadable safetensors"):
        load_run(run)
    assert not marker.exists()

    run = tmp_path / "trained"
    args = ["data.max_documents=60", f"run_dir={run}", "trainer.max_steps=5", *TINY]
    train(load_config("train", args))
    torch.save({"evil": Payload(marker)}, run / "checkpoints" / "last.ckpt")  # a real torch pickle
    with pytest.raises(ValueError, match="last.ckpt: not a loadable multiar checkpoint"):
        train(load_config("train", [*args, "trainer.max_steps=8", "ckpt_path=last"]))
    assert not marker.exists()


# --- names from user input stay inside the output folder ------------------------------------------


@pytest.mark.parametrize("name", ["../escape", "/etc/passwd", "a/b", "..", ".", "", "nul\x00byte", "a\\b"])
def test_names_that_would_leave_the_output_folder_are_refused(tmp_path, name):
    with pytest.raises(ValueError, match="not a plain file name"):
        safe_child(tmp_path, name)


@pytest.mark.parametrize("text", ["../../etc/passwd", "/abs/path", "..", "a\x00b", "OX=83333,OS=E. coli", ""])
def test_names_built_from_user_text_are_one_plain_name(tmp_path, text):
    name = safe_name(text)
    path = safe_child(tmp_path, name)
    assert path.parent == tmp_path and path.resolve().parent == tmp_path.resolve()
    assert not name.startswith(".") and "/" not in name and "\x00" not in name


# --- no network ---------------------------------------------------------------------------------


def test_train_and_generate_open_no_network_connection(tmp_path, monkeypatch):
    attempts = []
    real_connect = socket.socket.connect

    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else str(address)
        if host not in ("127.0.0.1", "::1", "localhost") and not str(host).startswith("/"):
            attempts.append(address)
            raise OSError("network access attempted in a test")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    run = tmp_path / "run"
    assert main(["train", "data.max_documents=60", f"run_dir={run}", "trainer.max_steps=3", *TINY]) == 0
    assert main(["generate", f"run={run}", f"out={tmp_path / 'o'}", "n=2", "max_new_tokens=8"]) == 0
    assert attempts == []


# --- config: typed, one line, exit code 2 ----------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("n=abc", "n: Value 'abc' of type 'str' could not be converted to Integer"),
        ("temperature=hot", "temperature: Value 'hot' of type 'str' could not be converted to Float"),
        ("max_new_tokens=-5", "max_new_tokens: must be >= 1, got -5"),
        ("batch_size=0", "batch_size: must be >= 1, got 0"),
        ("top_p=0", "top_p: must be in (0, 1] (1 is off), got 0.0"),
        ("top_k=-1", "top_k: must be >= 0 (0 is off), got -1"),
        ("+colour=red", "colour: Key 'colour' not in 'GenerateSchema'"),
    ],
)
def test_bad_generate_values_are_one_line_with_exit_code_2(tmp_path, capsys, override, message):
    run = copy_fixture_run(tmp_path)
    assert main(["generate", f"run={run}", f"out={tmp_path / 'o'}", override]) == 2
    assert capsys.readouterr().err.strip() == f"multiar generate: {message}"
    assert not (tmp_path / "o").exists()  # nothing was done


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.n_head=3", "model.n_embd: 128 must split into n_head=3 heads"),
        ("data.batch_size=many", "data.batch_size: Value 'many'"),
        ("optim.lr=-1", "optim.lr: must be > 0"),
        ("+trainer.turbo=true", "trainer: unknown Lightning Trainer argument(s): turbo"),
        ("+domain.settings.colour=red", "domain.settings: "),
        ("domain=nonsense", "bad arguments: In 'train': Could not find 'domain/nonsense'"),
        ("data.val_fraction=1.5", "data.val_fraction: must be in (0, 1)"),
    ],
)
def test_bad_train_values_are_one_line_with_exit_code_2(tmp_path, capsys, override, message):
    assert main(["train", f"run_dir={tmp_path / 'r'}", override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"multiar train: {message}") and "\n" not in err
    assert not (tmp_path / "r").exists()


def test_a_run_folder_of_another_domain_is_refused(tmp_path, capsys):
    run = copy_fixture_run(tmp_path)  # a protein run
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert main(["train", "domain=music", f"run_dir={run}", "ckpt_path=last"]) == 2
    assert "holds a protein run, not music" in capsys.readouterr().err


def test_weights_whose_vocab_does_not_match_the_tokenizer_are_refused(tmp_path, capsys):
    run = copy_fixture_run(tmp_path)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["model_config"]["vocab_size"] += 5
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["generate", f"run={run}"]) == 2
    assert "model vocab_size 33 != tokenizer vocab_size 28" in capsys.readouterr().err


def test_prompt_null_unsets_and_dollar_braces_stay_literal():
    assert load_config("generate", ["run=r", "prompt=null"]).prompt is None
    assert load_config("generate", ["run=r", "prompt=${oc.env:HOME}"]).prompt == "${oc.env:HOME}"
    assert load_config("generate", ["run=r", "prompt=a\\${x}"]).prompt == "a\\${x}"


def test_processors_that_ban_every_token_end_the_row_with_no_valid_token():
    from multiar.engine.decode import Token, stream
    from multiar.engine.sampling import ban_tokens

    run = load_run(FIXTURE_RUN)
    every = ban_tokens(range(run.domain.vocab_size))
    events = list(stream(run.model, torch.tensor([[1, 5, 6]]), 4, processors=[every]))
    assert events == [Token(0, None, "no_valid_token")]  # nothing drawn from NaN probabilities


# --- reproducibility ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["music", "code", "protein"])
def test_same_run_seed_and_settings_give_byte_identical_files(tmp_path, name):
    run = tmp_path / "run"
    docs = {"music": 20, "code": 20, "protein": 60}[name]
    train(
        load_config(
            "train",
            [f"domain={name}", f"data.max_documents={docs}", f"run_dir={run}", "trainer.max_steps=3", *TINY],
        )
    )
    outs = []
    for out in ("a", "b"):
        args = [f"run={run}", f"out={tmp_path / out}", "n=3", "seed=11", "max_new_tokens=40", "top_p=0.9"]
        sample_to_files(load_config("generate", args))
        outs.append({p.name: p.read_bytes() for p in (tmp_path / out).iterdir() if p.name != "generate.json"})
    assert outs[0] == outs[1] and len(outs[0]) >= 1
    reports = [json.loads((tmp_path / o / "generate.json").read_text()) for o in ("a", "b")]
    for r in reports:
        r.pop("created")  # the one time stamp; files hold none
        r["files"] = [Path(f).name for f in r["files"]]
    decodes = [r["provenance"].pop("decode") for r in reports]  # the first measures, the second reads it
    assert decodes[1]["how"] in ("cached", "forced", "only candidate")
    assert [(d["dtype"], d["layout"]) for d in decodes] == [(decodes[0]["dtype"], decodes[0]["layout"])] * 2
    assert reports[0] == reports[1]


def test_same_data_and_seed_give_the_same_first_20_training_losses(tmp_path):
    losses = []
    for name in ("a", "b"):
        run = tmp_path / name
        train(
            load_config("train", ["data.max_documents=200", f"run_dir={run}", "trainer.max_steps=20", *TINY])
        )
        with open(run / "metrics.csv", newline="") as f:
            losses.append([float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")])
    assert len(losses[0]) == 20 and losses[0] == losses[1]


def test_prompt_file_batches_prompts_of_different_lengths_and_stop_text_is_not_written(tmp_path):
    from Bio import SeqIO

    run = copy_fixture_run(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("MKT\n\nMAAAAAAAAAW\n")
    args = [f"run={run}", f"prompt_file={prompts}", "n=2", "max_new_tokens=12", "min_new_tokens=12"]
    sample_to_files(load_config("generate", [*args, f"out={tmp_path / 'a'}"]))
    seqs = [str(r.seq) for r in SeqIO.parse(tmp_path / "a" / "samples.fasta", "fasta")]
    assert [s[:3] for s in seqs] == ["MKT", "MKT", "MAA", "MAA"]
    assert [len(s) for s in seqs] == [15, 15, 23, 23]  # prompt + 12 new residues each
    # the untrained fixture repeats its favourite residue: stop at it, past the prompt only
    favourite = max(set(seqs[0][3:]), key=seqs[0][3:].count)
    sample_to_files(load_config("generate", [*args, f"out={tmp_path / 'b'}", f"stop={favourite}"]))
    cut = [str(r.seq) for r in SeqIO.parse(tmp_path / "b" / "samples.fasta", "fasta")]
    for s in cut:
        prompt_len = 3 if s.startswith("MKT") else 11
        assert favourite not in s[prompt_len:]
    assert len(cut[0]) < len(seqs[0]) and cut[0] == seqs[0][: len(cut[0])]  # same draw, ended at the stop
