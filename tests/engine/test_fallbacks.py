"""Private library APIs (PyTorch kernels, miditok internals) are checked once: where a version lacks
one, a public path is taken with one warning line naming what is missing, and results stay the same.
Each test hides the API and compares with what the installed version computes through it."""

from __future__ import annotations

import copy
import logging
import types

import miditok
import pytest
import torch
from conftest import bundled_files

from multiar.domains.music import grammar as music_grammar
from multiar.domains.music.domain import MusicDomain
from multiar.engine import layout, packed
from multiar.engine import quantize as q
from multiar.engine.decode import generate
from multiar.engine.model import GPT, ModelConfig


def recheck() -> None:
    """Forget which APIs were found (they are looked up once per process): after hiding one."""
    for module in (q, music_grammar):
        module.private_api.cache_clear()
    packed.packs.cache_clear()


@pytest.fixture(autouse=True)
def fresh_checks():
    recheck()
    yield
    recheck()


def warnings_naming(caplog: pytest.LogCaptureFixture, name: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if name in r.getMessage()]


def test_int8_without_its_kernel_dequantizes_per_call_with_one_warning(monkeypatch, caplog):
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96, bias=False)
    x = torch.randn(4, 7, 256)
    with torch.no_grad():
        kernel = {bf16: q.Int8Linear.from_linear(linear, bf16)(x) for bf16 in (True, False)}
        monkeypatch.delattr(torch, "_weight_int8pack_mm")
        recheck()
        with caplog.at_level(logging.WARNING, logger="multiar"):
            for bf16 in (True, False):
                layer = q.Int8Linear.from_linear(linear, bf16)
                out = layer(x)
                layer(x)
                # the same int8 weights: within the kernel's bf16 rounding of the activations
                rel = (out - kernel[bf16]).norm() / kernel[bf16].norm()
                assert rel < (1e-2 if bf16 else 1e-5), (bf16, rel)
                exact = x @ (layer.weight.float() * layer.scales[:, None]).t()
                torch.testing.assert_close(out, exact, rtol=1e-5, atol=1e-5)
    assert len(warnings_naming(caplog, "torch._weight_int8pack_mm")) == 1


@pytest.mark.parametrize("hidden", ["_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack_for_cpu"])
def test_int4_without_its_kernels_dequantizes_per_call(monkeypatch, caplog, hidden):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=48, block_size=64, n_layer=2, n_head=2, n_embd=64)).eval()
    idx = torch.randint(0, 48, (2, 12))
    with torch.no_grad():
        kernel_model = q.quantize(copy.deepcopy(model), "int4")
        kernel = kernel_model(idx)
        monkeypatch.delattr(torch, hidden)
        recheck()
        with caplog.at_level(logging.WARNING, logger="multiar"):
            fallback_model = q.quantize(copy.deepcopy(model), "int4")
            layers = [m for m in fallback_model.modules() if isinstance(m, q.Int4Linear)]
            assert layers and all(m.packed is None for m in layers)
            out = fallback_model(idx)
    assert len(warnings_naming(caplog, hidden)) == 1
    # the same codes, computed in fp32 instead of the kernel's bf16
    assert (out - kernel).norm() / kernel.norm() < 1e-2
    assert generate(fallback_model, idx, 6, temperature=0.0) == generate(
        kernel_model, idx, 6, temperature=0.0
    )


@pytest.mark.parametrize("hidden", ["_reorder_linear_weight", "_linear_pointwise"])
def test_the_decode_layout_keeps_nn_linear_without_the_onednn_ops(monkeypatch, caplog, hidden):
    torch.manual_seed(1)
    model = GPT(ModelConfig(vocab_size=64, block_size=64, n_layer=1, n_head=4, n_embd=512)).eval()
    present = {"_reorder_linear_weight", "_linear_pointwise"} - {hidden}
    fake = types.SimpleNamespace(**{name: getattr(torch.ops.mkldnn, name) for name in present})
    monkeypatch.setattr(torch.ops, "mkldnn", fake)
    recheck()
    with caplog.at_level(logging.WARNING, logger="multiar"):
        laid = packed.decode_layout(copy.deepcopy(model))
        packed.decode_layout(copy.deepcopy(model))
    assert not any(isinstance(m, packed.PackedLinear) for m in laid.modules())
    assert len(warnings_naming(caplog, f"torch.ops.mkldnn.{hidden}")) == 1
    idx = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(laid(idx), model(idx))


def test_a_cpu_whose_onednn_packs_no_bf16_keeps_bf16_as_nn_linear_and_drops_the_candidate(
    monkeypatch, caplog
):
    # oneDNN's answer on an AVX2-only CPU (AMD EPYC Milan): its ops exist, a bf16 pack raises
    reorder = torch.ops.mkldnn._reorder_linear_weight

    def refuses_bf16(weight, rows):
        if weight.dtype == torch.bfloat16:
            raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx512bw\nmore")
        return reorder(weight, rows)

    fake = types.SimpleNamespace(
        _reorder_linear_weight=refuses_bf16, _linear_pointwise=torch.ops.mkldnn._linear_pointwise
    )
    monkeypatch.setattr(torch.ops, "mkldnn", fake)
    recheck()
    torch.manual_seed(1)
    model = GPT(ModelConfig(vocab_size=64, block_size=64, n_layer=1, n_head=4, n_embd=512)).eval()
    with caplog.at_level(logging.WARNING, logger="multiar"):
        bf16 = packed.decode_layout(copy.deepcopy(model).to(torch.bfloat16))
        fp32 = packed.decode_layout(copy.deepcopy(model))
        candidates = layout.float_candidates(torch.device("cpu"), "auto", "auto")
        forced, choice = layout.prepare_for_decoding(copy.deepcopy(model), dtype="bf16", layout="packed")
    assert not any(isinstance(m, packed.PackedLinear) for m in bf16.modules())
    assert any(isinstance(m, packed.PackedLinear) for m in fp32.modules())  # fp32 packs as before
    assert candidates == ["fp32/linear", "fp32/packed", "bf16/linear"]
    assert (choice.dtype, choice.layout, choice.how) == ("bf16", "linear", "only candidate")
    assert not any(isinstance(m, packed.PackedLinear) for m in forced.modules())
    said = warnings_naming(caplog, "cannot pack torch.bfloat16")
    assert len(said) == 1 and "avx512bw" in said[0] and "\n" not in said[0]
    idx = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(forced(idx).float(), model(idx), rtol=3e-2, atol=3e-2)


def test_the_pack_probe_agrees_with_torchs_own_bf16_flag_on_this_cpu():
    # so a probe that stopped packing bf16 where oneDNN can (a CPU with AVX512 or AMX) fails here
    if not torch.backends.mkldnn.is_available() or packed._onednn_ops() is None:
        pytest.skip("this PyTorch has no oneDNN packed Linear")
    assert packed.packs(torch.float32)
    supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if supported is None:
        pytest.skip("torch.ops.mkldnn._is_mkldnn_bf16_supported is missing in this PyTorch")
    assert packed.packs(torch.bfloat16) == bool(supported())


@pytest.fixture(scope="module")
def bpe_music() -> MusicDomain:
    domain = MusicDomain("REMI", {"use_programs": True}, bpe_vocab_size=500)
    domain.fit([next(domain.read(f)) for f in bundled_files("music", 10)])
    return domain


def test_bpe_training_bytes_without_mididoks_private_converter(monkeypatch, caplog, bpe_music):
    tokenizer = bpe_music.tokenizer
    bars = [[5, 9, 40], [7], [3, 3, 60, 100]]
    expected = tokenizer._ids_to_bytes(bars, as_one_str=True)
    assert music_grammar.ids_to_bytes(tokenizer, bars) == expected
    monkeypatch.delattr(miditok.MusicTokenizer, "_ids_to_bytes")
    recheck()
    with caplog.at_level(logging.WARNING, logger="multiar"):
        assert music_grammar.ids_to_bytes(tokenizer, bars) == expected
        assert music_grammar.ids_to_bytes(tokenizer, []) == []
    assert len(warnings_naming(caplog, "_ids_to_bytes")) == 1


def test_bpe_tokens_are_split_into_base_tokens_through_miditoks_public_api(bpe_music):
    """base_tokens of a BPE piece's ids, joined, are the piece's base tokens (no private table used)."""
    tokenizer = bpe_music.tokenizer
    score = next(bpe_music.read(bundled_files("music", 11)[-1]))
    ids = bpe_music.encode(score)
    assert max(ids) >= 300  # learned tokens
    base = tokenizer(score, encode_ids=False).tokens
    assert [t for i in ids for t in music_grammar.base_tokens(tokenizer, i)] == base


def test_the_grammar_without_mididoks_private_error_count_judges_by_the_public_one(monkeypatch, caplog):
    domain = MusicDomain("REMI", {"use_programs": True})
    exact = domain.grammar
    assert exact.exact
    monkeypatch.delattr(miditok.MusicTokenizer, "_tokens_errors")
    recheck()
    with caplog.at_level(logging.WARNING, logger="multiar"):
        again = MusicDomain("REMI", {"use_programs": True}).grammar
        MusicDomain("TSD", {"use_programs": True}).grammar  # noqa: B018 - one warning in all
    assert len(warnings_naming(caplog, "_tokens_errors")) == 1
    # REMI keeps miditok's own count (its public tokens_errors is the base class's): the same masks
    assert again.exact and torch.equal(again.fixed_ok, exact.fixed_ok)
    state = again.state(domain.encode(next(domain.read(bundled_files("music", 1)[0])))[:15])
    assert torch.equal(again.allowed(state, domain.eos_id), exact.allowed(state, domain.eos_id))

    class OwnRules(miditok.REMI):  # a tokenizer with its own public count: only types are checked
        def tokens_errors(self, tokens):  # noqa: ANN001, ANN202
            return 0.0

    tokenizer = OwnRules(miditok.TokenizerConfig(use_programs=True))
    grammar = music_grammar.MusicGrammar(tokenizer, len(tokenizer), {0, 1, 2})
    assert not grammar.exact
