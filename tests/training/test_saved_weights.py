"""The run folder's weights as FSDP leaves them: the strategy's gathered state dict, written as
save_model writes the model's own (found on a lent H200: save_model refused FSDP's flat parameters)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_model, save_model

from multiar.engine.model import GPT, ModelConfig
from multiar.run_folder import save_run
from multiar.training.run import model_weights

NO_DOMAIN = SimpleNamespace(save=lambda path: None)  # save_run's tokenizer state: not what is tested


def tiny() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=16))


def flatten(model: GPT) -> None:
    """The model's parameters made views into one flat buffer, as FSDP's flat parameter leaves them."""
    params = list(model.parameters())  # the tied embedding once
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    at = 0
    for p in params:
        p.data = flat[at : at + p.numel()].view_as(p)
        at += p.numel()


def test_the_strategys_state_dict_is_written_as_save_model_writes_the_model(tmp_path):
    model = tiny()
    save_model(model, str(tmp_path / "model.safetensors"))
    gathered = {f"model.{k}": v for k, v in model.state_dict().items()} | {"other.x": torch.ones(1)}
    trainer = SimpleNamespace(strategy=SimpleNamespace(lightning_module_state_dict=lambda: gathered))
    weights = model_weights(trainer)
    assert set(weights) == set(model.state_dict())  # the GPT's own keys, nothing else of the module's
    save_run(tmp_path / "run", model, NO_DOMAIN, {}, weights)
    written = (tmp_path / "run" / "model.safetensors").read_bytes()
    assert written == (tmp_path / "model.safetensors").read_bytes()


def test_flat_parameter_views_are_saved_and_load_back(tmp_path):
    model = tiny()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    flatten(model)
    with pytest.raises(RuntimeError, match="no suitable name to keep"):  # what save_model makes of them
        save_model(model, str(tmp_path / "x"))
    save_run(tmp_path / "run", model, NO_DOMAIN, {}, model.state_dict())
    back = GPT(model.config)
    load_model(back, str(tmp_path / "run" / "model.safetensors"), strict=True)
    for name, value in back.state_dict().items():
        assert torch.equal(value, expected[name]), name
    assert back.lm_head.weight is back.wte.weight  # still tied


def test_fsdps_gathered_copies_one_per_key_are_written_once_with_the_alias(tmp_path):
    """FSDP's full state dict gives each key its own copy (the tied pair two equal tensors), and rank 0
    alone gets them: one copy under lm_head.weight is written, the alias named, and it loads back tied."""
    model = tiny()
    save_model(model, str(tmp_path / "model.safetensors"))
    gathered = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert gathered["wte.weight"].data_ptr() != gathered["lm_head.weight"].data_ptr()
    save_run(tmp_path / "run", model, NO_DOMAIN, {}, gathered)
    written = (tmp_path / "run" / "model.safetensors").read_bytes()
    assert written == (tmp_path / "model.safetensors").read_bytes()
    from safetensors import safe_open

    with safe_open(str(tmp_path / "run" / "model.safetensors"), "pt") as f:
        keys, aliases = list(f.keys()), f.metadata()
    assert (
        "lm_head.weight" in keys and "wte.weight" not in keys and aliases == {"wte.weight": "lm_head.weight"}
    )
