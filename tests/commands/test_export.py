"""`multiar export format=hf`: transformers loads the folder and its logits equal multiar's; format=gguf:
the file read back holds llama metadata, llama.cpp's tensor names and the weights (a code run its BPE),
and (slow, where llama-cpp-python is installed) llama.cpp's logits equal multiar's."""

from __future__ import annotations

import json

import numpy as np
import pytest
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


def test_a_protein_run_exports_its_alphabet_as_a_tokenizer_tags_included(tmp_path):
    run = tmp_path / "protein"
    over = [
        "domain=protein",
        "data.max_documents=40",
        f"run_dir={run}",
        "trainer.max_steps=2",
        "data.tags=header:OX",
    ]
    train(load_config("train", [*over, *TINY]))
    out = tmp_path / "hf"
    assert main(["export", f"run={run}", "format=hf", f"out={out}"]) == 0
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    domain = load_run(run).domain
    assert domain.tags  # the tags follow the alphabet as special tokens, at the ids the model knows
    text = "MKTAYIAKQRQISFVKSHFSRQXBZUO"
    assert tok(text)["input_ids"] == domain.prompt_ids(text)[1:]
    tag = domain.tags[0]
    assert tok(f"<{tag}>M")["input_ids"] == [domain.tag_ids(tag)[0], domain.prompt_ids("M")[1]]
    assert tok.decode(domain.prompt_ids(text)[1:]) == text


def gguf_weights(path):
    """Each tensor of a GGUF file dequantized to fp32, by name, and the file's reader."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return reader, {t.name: (t, gguf.quants.dequantize(t.data, t.tensor_type)) for t in reader.tensors}


def field(reader, key):
    return reader.fields[key].contents()


@pytest.mark.parametrize(("kind", "tolerance"), [("f32", 0.0), ("f16", 1e-3), ("bf16", 8e-3), ("q8_0", 8e-3)])
def test_gguf_holds_the_weights_and_llama_metadata(tmp_path, kind, tolerance):
    from multiar.engine.gguf_format import llama_tensors

    run_dir = copy_fixture_run(tmp_path)
    out = tmp_path / f"model-{kind}.gguf"
    assert main(["export", f"run={run_dir}", "format=gguf", f"out={out}", f"gguf_type={kind}"]) == 0
    run = load_run(run_dir)
    c = run.model.config
    reader, tensors = gguf_weights(out)
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "llama.block_count") == c.n_layer
    assert field(reader, "llama.embedding_length") == c.n_embd
    assert field(reader, "llama.feed_forward_length") == c.intermediate_size
    assert field(reader, "llama.attention.head_count") == c.n_head
    assert field(reader, "llama.rope.dimension_count") == c.head_size
    assert field(reader, "llama.context_length") == c.block_size
    assert field(reader, "llama.vocab_size") == c.vocab_size
    assert field(reader, "tokenizer.ggml.model") == "gpt2"  # protein: its letters, a BPE without merges
    assert (
        field(reader, "tokenizer.ggml.tokens") == run.domain.itos
        and field(reader, "tokenizer.ggml.merges") == ["<pad> <bos>"]  # inert: letters never form it
    )
    assert field(reader, "multiar.domain") == "protein"
    parts = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up")
    names = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(c.n_layer) for n in (*parts, "ffn_down")
    }
    assert set(tensors) == names
    want = llama_tensors(run.model)
    q, k = run.model.blocks[0].attn.qkv.weight.split(c.n_embd)[:2]
    assert torch.equal(want["blk.0.attn_q.weight"], q) and torch.equal(want["blk.0.attn_k.weight"], k)
    for name, (tensor, data) in tensors.items():
        w = want[name].numpy()
        assert tuple(reversed(tensor.shape.tolist())) == w.shape, name  # GGUF lists ne0 (columns) first
        err = np.abs(data.reshape(w.shape) - w).max() / np.abs(w).max()
        assert err <= (0.0 if w.ndim == 1 else tolerance), (name, err)
    assert main(["export", f"run={run_dir}", "format=gguf", f"out={out}"]) == 1  # never silently replaced


def test_a_code_run_exports_its_bpe_into_the_gguf(tmp_path):
    run_dir = tmp_path / "code"
    train(
        load_config(
            "train",
            ["domain=code", "data.max_documents=20", f"run_dir={run_dir}", "trainer.max_steps=2", *TINY],
        )
    )
    out = tmp_path / "code.gguf"
    assert main(["export", f"run={run_dir}", "format=gguf", f"out={out}", "gguf_type=q8_0"]) == 0
    reader, tensors = gguf_weights(out)
    from multiar.engine.gguf_format import llama_tensors

    want = llama_tensors(load_run(run_dir).model)  # n_embd 32: rows q8_0 blocks (the fixture's 16 stay f16)
    assert tensors["blk.0.attn_q.weight"][0].tensor_type.name == "Q8_0"
    for name, (_, data) in tensors.items():
        w = want[name].numpy()
        assert np.abs(data.reshape(w.shape) - w).max() <= 8e-3 * np.abs(w).max(), name
    tok = json.loads(load_run(run_dir).domain.hf_tokenizer_json())
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert len(tokens) == len(tok["model"]["vocab"]) and tokens[:3] == ["<pad>", "<bos>", "<eos>"]
    assert all(tokens[i] == t for t, i in tok["model"]["vocab"].items())
    assert field(reader, "tokenizer.ggml.merges") == [" ".join(m) for m in tok["model"]["merges"]]
    assert field(reader, "tokenizer.ggml.eos_token_id") == 2


@pytest.mark.slow
def test_llama_cpp_loads_the_gguf_with_equal_logits(tmp_path):
    """llama-cpp-python (where it builds: 15-30 minutes on 2 cores; or built without its library,
    CMAKE_ARGS=-DLLAMA_BUILD=OFF, and LLAMA_CPP_LIB_PATH naming a llama.cpp build) evaluates the f32 file:
    its logits equal multiar's, and it tokenizes protein text to the domain's ids."""
    llama_cpp = pytest.importorskip("llama_cpp")
    run_dir = copy_fixture_run(tmp_path)
    out = tmp_path / "model.gguf"
    assert main(["export", f"run={run_dir}", "format=gguf", f"out={out}", "gguf_type=f32"]) == 0
    prompt = [1, 5, 9, 12, 3, 20, 7, 7, 8]
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=32, logits_all=True, verbose=False, n_threads=1)
    llm.eval(prompt)
    theirs = torch.tensor(np.array(llm.scores[: len(prompt)]))
    with torch.no_grad():
        ours = load_run(run_dir).model(torch.tensor([prompt]))[0]
    assert (ours - theirs).abs().max().item() < 1e-3
    domain, text = load_run(run_dir).domain, "MKTAYIAKQRQISFVKSHFSRQXBZUO"
    # llama.cpp reads protein text as the domain does
    assert llm.tokenize(text.encode(), add_bos=False) == domain.prompt_ids(text)[1:]
    assert llm.detokenize(domain.prompt_ids(text)[1:]).decode() == text
