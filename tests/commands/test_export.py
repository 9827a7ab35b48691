"""`multiar export format=hf`: transformers loads the folder and its logits equal multiar's."""

from __future__ import annotations

import json

import torch
import transformers  # a dev dependency: the test must run, never skip
from conftest import TINY, copy_fixture_run

from multiar.cli import main
from multiar.config import load_config
from multiar.run_folder import load_run
from multiar.training.run import train


def assert_same_logits(run_dir, out, prompt):
    run = load_run(run_dir)
    hf = transformers.LlamaForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    idx = torch.tensor([prompt])
    with torch.no_grad():
        ours = run.model(idx)
        theirs = hf(idx).logits
    assert (ours - theirs).abs().max().item() < 1e-4


def test_exported_folder_loads_in_transformers_with_equal_logits(tmp_path):
    run = copy_fixture_run(tmp_path)
    out = tmp_path / "hf"
    assert main(["export", f"run={run}", "format=hf", f"out={out}"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["bos_token_id"] == 1 and config["eos_token_id"] == 2
    assert json.loads((out / "generation_config.json").read_text())["pad_token_id"] == 0
    assert_same_logits(run, out, [1, 5, 9, 12, 3, 20, 7, 7, 8])
    assert main(["export", f"run={run}", "format=hf", f"out={out}"]) == 1  # never silently replaced


def test_a_code_run_exports_its_tokenizer_and_matches_on_a_trained_model(tmp_path):
    run = tmp_path / "code"
    train(
        load_config(
            "train", ["domain=code", "data.max_documents=20", f"run_dir={run}", "trainer.max_steps=8", *TINY]
        )
    )
    out = tmp_path / "hf"
    assert main(["export", f"run={run}", "format=hf", f"out={out}"]) == 0
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    ids = tok("def parse(x):\n    return x")["input_ids"]
    assert load_run(run).domain.encode("def parse(x):\n    return x") == ids
    assert_same_logits(run, out, [1, *ids])
