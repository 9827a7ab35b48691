"""multiar's GPT as a llama-architecture GGUF file (the `gguf` package), for llama.cpp and what builds on
it: the weights under llama.cpp's names (through transformers' Llama names, engine.hf_format), the
hyperparameters as llama.* metadata, and the tokenizer where GGUF can hold it (a byte-level BPE as
gpt2-style tokens + merges); otherwise tokenizer.ggml.model = "none" with llama.vocab_size, and the
caller feeds token ids.

q and k: llama.cpp's llama architecture rotates interleaved channel pairs (2i, 2i+1), as multiar does;
transformers' layout (rotate-half) is undone here with the permutation llama.cpp's own converter
(convert_hf_to_gguf.py, LlamaModel.permute) applies to a transformers checkpoint."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from multiar.engine.hf_format import to_llama_state
from multiar.engine.model import GPT

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
Q8_BLOCK = 32  # q8_0 quantizes rows in blocks of 32 values


@dataclass
class Vocabulary:
    """What the tokenizer part of the file holds: the special ids, and for a byte-level BPE its tokens
    (id order), token types and merges; tokens None: no tokenizer in the file (ids only)."""

    size: int
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    tokens: list[str] | None = None
    token_types: list[int] = field(default_factory=list)
    merges: list[str] = field(default_factory=list)


def bpe_vocabulary(tokenizer_json: str, size: int, ids: dict[str, int | None]) -> Vocabulary | None:
    """A `tokenizers` byte-level BPE (tokenizer.json text) as gpt2-style GGUF tokens + merges; None when
    it is another kind of tokenizer or does not cover ids 0..size-1."""
    data = json.loads(tokenizer_json)
    model, pre = data.get("model") or {}, data.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel":
        return None
    by_id = {i: t for t, i in model["vocab"].items()}
    special = {t["id"] for t in data.get("added_tokens", []) if t.get("special")}
    for t in data.get("added_tokens", []):
        by_id.setdefault(t["id"], t["content"])
    if sorted(by_id) != list(range(size)):
        return None
    tokens = [by_id[i] for i in range(size)]
    types = [3 if i in special else 1 for i in range(size)]  # llama.cpp: 1 normal, 3 control
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return Vocabulary(size, ids.get("bos"), ids.get("eos"), ids.get("pad"), tokens, types, merges)


def llama_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """The model's weights under llama.cpp's tensor names (fp32), q and k in llama.cpp's layout."""
    import gguf

    c = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.n_layer)
    out = {}
    for hf_name, w in to_llama_state(model).items():
        if hf_name == "lm_head.weight":
            continue  # tied: llama.cpp uses token_embd when output.weight is absent
        base = hf_name.removesuffix(".weight")
        name = names.get_name(base)
        if name is None:
            raise ValueError(f"{hf_name}: no llama.cpp name")
        if base.endswith(("q_proj", "k_proj")):
            w = unpermute_rotate_half(w, c.n_head)
        out[f"{name}.weight"] = w
    return out


def unpermute_rotate_half(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """transformers' rotate-half rows of q or k back to interleaved pairs (llama.cpp's permute)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def encode_tensor(w: torch.Tensor, kind: str) -> tuple[np.ndarray, Any]:
    """One tensor as the bytes of a GGUF type: 1-D tensors (norms) and rows q8_0 cannot block stay f32
    (llama.cpp's converter keeps norms f32 too); the array and its GGMLQuantizationType."""
    import gguf

    q = gguf.GGMLQuantizationType
    data = w.detach().float().cpu().numpy()
    if kind == "f32" or data.ndim == 1:
        return data, q.F32
    if kind == "f16":
        return data.astype(np.float16), q.F16
    kind_q = {"bf16": q.BF16, "q8_0": q.Q8_0}[kind]
    if kind_q == q.Q8_0 and data.shape[-1] % Q8_BLOCK:
        return data.astype(np.float16), q.F16
    return gguf.quants.quantize(data, kind_q), kind_q


FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


def write_gguf(model: GPT, path: Path, kind: str, vocab: Vocabulary, meta: dict[str, str]) -> None:
    """Write model as a llama-architecture GGUF file of type kind (f32, f16, bf16, q8_0) at path."""
    import gguf

    if kind not in GGUF_TYPES:
        raise ValueError(f"gguf_type: one of {', '.join(GGUF_TYPES)}, got {kind!r}")
    c = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(meta.get("name", "multiar"))
    writer.add_context_length(c.block_size)
    writer.add_embedding_length(c.n_embd)
    writer.add_block_count(c.n_layer)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.n_head)
    writer.add_head_count_kv(c.n_head)
    writer.add_rope_dimension_count(c.head_size)
    writer.add_rope_freq_base(c.rope_base)
    writer.add_layer_norm_rms_eps(c.norm_eps)
    writer.add_vocab_size(c.vocab_size)
    writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[kind]))
    add_vocabulary(writer, vocab)
    for key, value in meta.items():
        writer.add_string(f"multiar.{key}", value)
    for name, w in llama_tensors(model).items():
        data, qtype = encode_tensor(w, kind)
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def inert_merge(vocab: Vocabulary) -> list[str]:
    """For a BPE without merges (protein: a letter per token): llama.cpp refuses a gpt2 vocabulary with
    no merges key and the gguf package cannot write an empty array, so one merge of two control tokens,
    which a text's letters never form."""
    controls = [t for t, kind in zip(vocab.tokens or [], vocab.token_types, strict=True) if kind == 3]
    if len(controls) < 2:
        raise ValueError("a BPE vocabulary without merges needs two control tokens for GGUF")
    return [f"{controls[0]} {controls[1]}"]


def add_vocabulary(writer: Any, vocab: Vocabulary) -> None:
    """The tokenizer keys: gpt2-style BPE where there is one, else "none" (ids only)."""
    if vocab.tokens is None:
        writer.add_tokenizer_model("none")
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(vocab.tokens)
        writer.add_token_types(vocab.token_types)
        writer.add_token_merges(vocab.merges or inert_merge(vocab))
        writer.add_add_bos_token(False)
    for key, value in (("bos", vocab.bos_id), ("eos", vocab.eos_id), ("pad", vocab.pad_id)):
        if value is not None:
            getattr(writer, f"add_{key}_token_id")(value)
