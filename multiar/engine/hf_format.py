"""multiar's GPT in transformers' Llama format: the weight names, the q/k layout and the config.json."""

from __future__ import annotations

from typing import Any

import torch

from multiar.engine.model import GPT


def to_llama_state(model: GPT) -> dict[str, torch.Tensor]:
    """multiar's weights under transformers' Llama names and layout.

    multiar rotates interleaved channel pairs (2i, 2i+1); Llama's rotate-half pairs (i, i + hs/2) at the
    same frequency. Reordering each head's q and k rows as [0, 2, 4, ..., 1, 3, 5, ...] turns one into
    the other, and attention scores do not change under a permutation applied to both q and k.
    """
    c = model.config
    nh, hs, C = c.n_head, c.head_size, c.n_embd
    order = torch.cat([torch.arange(0, hs, 2), torch.arange(1, hs, 2)])
    rows = (torch.arange(nh)[:, None] * hs + order).flatten()  # (C,)
    state = {"model.embed_tokens.weight": model.wte.weight, "model.norm.weight": model.norm_f.weight}
    for i, block in enumerate(model.blocks):
        pre = f"model.layers.{i}"
        q, k, v = block.attn.qkv.weight.split(C, dim=0)
        gate, up = block.mlp.gate_up.weight.chunk(2, dim=0)
        state |= {
            f"{pre}.input_layernorm.weight": block.norm_1.weight,
            f"{pre}.post_attention_layernorm.weight": block.norm_2.weight,
            f"{pre}.self_attn.q_proj.weight": q[rows],
            f"{pre}.self_attn.k_proj.weight": k[rows],
            f"{pre}.self_attn.v_proj.weight": v,
            f"{pre}.self_attn.o_proj.weight": block.attn.proj.weight,
            f"{pre}.mlp.gate_proj.weight": gate,
            f"{pre}.mlp.up_proj.weight": up,
            f"{pre}.mlp.down_proj.weight": block.mlp.down.weight,
        }
    return {k: v.detach().float().contiguous().clone() for k, v in state.items()}


def llama_config(model: GPT, domain_ids: dict[str, int]) -> dict[str, Any]:
    c = model.config
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": c.n_embd,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "num_key_value_heads": c.n_head,
        "head_dim": c.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": c.block_size,
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_base,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        **domain_ids,
    }
