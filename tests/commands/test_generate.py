"""`multiar generate` end to end on tiny runs: what ranking scores, why each row ended (with and without
a draft), which draft runs share the target's tokenizer, long prompts cut like training windows,
filters checked before sampling, and stop texts with escapes."""

from __future__ import annotations

import csv
import logging
import math
import re
import shlex
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import QUIET_FILTERS, TINY, bundled_files, fitted_domain, proteome_subset

from multiar.commands.generate import fit_prompt, same_tokenizer, sample_to_files, stop_sequences, stop_text
from multiar.config import load_config
from multiar.data.packing import pack
from multiar.domains.music.domain import MusicDomain
from multiar.errors import ConfigError
from multiar.run_folder import load_run
from multiar.training.run import train

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(scope="module")
def protein_run(tmp_path_factory):
    """A tiny protein run with control tags (seconds to train: what it samples does not matter here)."""
    tmp = tmp_path_factory.mktemp("generate")
    data = proteome_subset(tmp / "data", per_file=20)
    overrides = [*TINY, "domain=protein", f"data.paths=[{data}]", "data.tags=header:OX",
                 f"run_dir={tmp / 'run'}", "trainer.max_steps=2", "trainer.val_check_interval=2"]  # fmt: skip
    train(load_config("train", overrides))
    return tmp / "run"


def generate(run, out, *overrides):
    return sample_to_files(load_config("generate", [f"run={run}", f"out={out}", "dtype=fp32", *overrides]))


def rows_of(out: Path) -> list[dict]:
    return list(csv.DictReader((out / "samples.csv").open()))


def reference_ppl(model, context: list[int], sampled: list[int], eos: int | None) -> float:
    """exp(mean NLL) of the sampled ids (and EOS) given everything before them, by one plain forward."""
    ids = [*context, *sampled, *([eos] if eos is not None else [])]
    logp = F.log_softmax(model(torch.tensor([ids[:-1]]))[0].float(), dim=-1)
    targets = range(len(context), len(ids))
    return math.exp(-sum(logp[t - 1, ids[t]].item() for t in targets) / len(targets))


def test_ppl_is_the_sampled_tokens_given_bos_tags_and_prompt_with_or_without_the_prompt_written(
    protein_run, tmp_path
):
    run = load_run(protein_run)
    domain, tag = run.domain, run.domain.tag_ids("OX=83333")
    common = ["n=4", "max_new_tokens=20", "prompt=MKV", "tags=OX=83333", "rank_by=ppl", *QUIET_FILTERS]
    generate(protein_run, tmp_path / "with", *common, "include_prompt=true")
    generate(protein_run, tmp_path / "without", *common, "include_prompt=false")
    with_prompt, without = rows_of(tmp_path / "with"), rows_of(tmp_path / "without")
    assert [r["ppl"] for r in with_prompt] == [r["ppl"] for r in without]  # one definition
    context = [domain.bos_id, *tag, *domain.prompt_ids("MKV")[1:]]
    for full, alone in zip(with_prompt, without, strict=True):
        assert full["sequence"] == "MKV" + alone["sequence"]
        sampled = domain.prompt_ids(alone["sequence"])[1:]
        eos = domain.eos_id if alone["end"] == "eos" else None
        want = reference_ppl(run.model, context, sampled, eos)
        assert float(alone["ppl"]) == pytest.approx(want, rel=2e-3)


def test_end_reasons_are_the_same_with_and_without_a_draft(protein_run, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("M\nMK\nMS\nMA\nMT\nMQ\nMKL\nMG\n")
    common = ["n=1", "max_new_tokens=30", "temperature=0", f"prompt_file={prompts}", *QUIET_FILTERS]
    generate(protein_run, tmp_path / "free", *common)
    free = rows_of(tmp_path / "free")
    # a stop text that some rows reach: the residue greedy decoding writes most
    letters = "".join(r["sequence"][len(p) :] for r, p in zip(free, prompts.read_text().split(), strict=True))
    stop = max(set(letters), key=letters.count)
    plain = generate(protein_run, tmp_path / "plain", *common, f"stop={stop}")
    fast = generate(protein_run, tmp_path / "fast", *common, f"stop={stop}", "draft=ngram")
    ends = [r["end"] for r in rows_of(tmp_path / "plain")]
    assert "stop" in ends  # the stop matched: the case that was recorded as eos with a draft
    assert [r["end"] for r in rows_of(tmp_path / "fast")] == ends
    assert [r["sequence"] for r in rows_of(tmp_path / "fast")] == [r["sequence"] for r in rows_of(tmp_path / "plain")]  # fmt: skip
    assert fast["metrics"]["protein/eos_rate"] == plain["metrics"]["protein/eos_rate"]


def music(pieces: list, bpe: int | None = None) -> MusicDomain:
    domain = MusicDomain("REMI", {"use_programs": True}, bpe_vocab_size=bpe)
    domain.fit(pieces)
    return domain


def test_a_draft_with_the_same_tokenizer_is_accepted_whatever_it_was_trained_on(tmp_path):
    pieces = [next(MusicDomain().read(f)) for f in bundled_files("music", 12)]
    a, b = music(pieces[:6]), music(pieces[6:])
    assert a.train_stats != b.train_stats  # other pieces, the same (untrained) tokenizer
    assert same_tokenizer(a, b)
    assert not same_tokenizer(a, music(pieces[:6], bpe=600))
    # code: the same tokenizer file, another set of training lines (what novelty is measured against)
    code, _ = fitted_domain("code", 5)
    other, _ = fitted_domain("code", 9)
    code.save(tmp_path / "a")
    other.save(tmp_path / "b")
    (tmp_path / "b" / "tokenizer.json").write_bytes((tmp_path / "a" / "tokenizer.json").read_bytes())
    from multiar.domains import load_domain

    twin = load_domain("code", tmp_path / "b")
    assert (tmp_path / "a" / "train_lines.npy").read_bytes() != (
        tmp_path / "b" / "train_lines.npy"
    ).read_bytes()
    assert same_tokenizer(code, twin)
    assert not same_tokenizer(code, other)


def test_a_long_prompt_is_cut_to_a_window_the_packer_could_produce():
    bos, eos, pad = 1, 2, 0
    prompt = [bos, *range(10, 60)]  # BOS + 50 tokens
    assert fit_prompt(prompt, block_size=64, max_new_tokens=10) == prompt  # fits: as given
    for block, new in ((32, 12), (32, 500), (40, 16)):
        cut = fit_prompt(prompt, block_size=block, max_new_tokens=new)
        assert bos not in cut and cut == prompt[-len(cut) :]
        assert len(cut) == block - min(new, block // 2)  # the room left for new tokens
        # the packer cuts windows every block ids of BOS doc EOS BOS doc EOS ...: with a document of
        # the right length before it, a training window starts where the cut prompt does
        at = len(prompt) - len(cut)  # where the cut starts in BOS + document
        filler = list(range(70, 70 + (-(at + 2)) % block))
        blocks = pack({"ids": [filler, prompt[1:]]}, block, bos, eos, pad)["block"]
        assert any(b[: len(cut)] == cut for b in blocks)


def test_a_long_prompt_is_written_whole_and_continued_from_its_tail(protein_run, tmp_path):
    residues = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQFEVVHSLAKWKRQTLGQHDFSAGEGLYTHMKALRPDEDRLSPLHSVYVDQWDWERVMGDGERQFSTLKSTVEAIWAGIKATEAAVSEEFGLAPFLPDQIHFVHSQELLSRYPDLDAKGRERAIAKDLGAVFLVGIGGKLSDGHRHDVRAPDYDDWSTPSELGHAGLNGDILVWNPVLEDAFELSSMGIRVDADTLKHQLALTGDEDRLELEWHQALLRGEMPQTIGGGIGQSRLTMLLLQLPHIGQVQAGVWPAACRERVPALRF"
    report = generate(protein_run, tmp_path / "o", "n=2", "max_new_tokens=20", f"prompt={residues}")
    assert report["samples"] == 2
    for row in rows_of(tmp_path / "o"):
        assert row["sequence"].startswith(residues)  # the whole prompt, as the user gave it


def test_filters_are_checked_before_any_sampling(protein_run, tmp_path):
    with pytest.raises(ConfigError, match=r"filters\.min_entrpy: .*known: .*min_entropy"):
        generate(protein_run, tmp_path / "o", "n=1", "+filters.min_entrpy=1.5")
    assert not (tmp_path / "o").exists()  # nothing was sampled nor written


def readme_stop_line() -> str:
    lines = [
        line for line in README.read_text().splitlines() if re.match(r"multiar generate .*\bstop='", line)
    ]
    assert lines, "README shows no stop='...' example"
    return lines[0]


def test_readme_stop_example_matches_a_blank_line():
    words = shlex.split(readme_stop_line().split("#")[0])  # as the shell passes it
    assert words[:2] == ["multiar", "generate"]
    cfg = load_config("generate", words[2:])
    assert cfg.stop == r"\n\n"  # free text keeps the backslashes ...
    assert stop_text(cfg.stop) == "\n\n"  # ... and stop reads them as escapes
    domain, _ = fitted_domain("code", 5)
    assert stop_sequences(cfg, domain) == [domain.prompt_ids("\n\n")[1:]]


def test_stop_escapes_are_exact():
    assert stop_text(r"a\tb\\n\r\u00e9") == "a\tb\\n\r\u00e9"
    assert stop_text("déjà\\n") == "déjà\n"  # text beyond ASCII stays as typed
    assert stop_text(r"\d\x") == r"\d\x"  # other backslashes stay as typed
    with pytest.raises(ConfigError, match=r"stop: .*\\u12"):
        stop_text(r"ab\u12")


@pytest.mark.parametrize(
    "key,message",
    [
        ("render=wav", "render: the protein domain has nothing to render"),
        ("resample_invalid=2", "resample_invalid: the protein domain has no validity check"),
    ],
)
def test_keys_a_domain_cannot_honour_fail_before_any_sampling(tmp_path, monkeypatch, key, message):
    from conftest import copy_fixture_run

    import multiar.commands.sample_draw as command  # where generate draws

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before checking the keys")

    monkeypatch.setattr(command, "stream", no_sampling)
    run = copy_fixture_run(tmp_path)
    with pytest.raises(ConfigError, match=message):
        sample_to_files(load_config("generate", [f"run={run}", f"out={tmp_path / 'o'}", "n=1", key]))
    assert not (tmp_path / "o").exists()


def test_an_output_folder_holding_a_report_is_refused_before_sampling(tmp_path, monkeypatch):
    from conftest import copy_fixture_run

    import multiar.commands.sample_draw as command  # where generate draws

    run = copy_fixture_run(tmp_path)
    args = [f"run={run}", f"out={tmp_path / 'o'}", "n=1", "max_new_tokens=3"]
    sample_to_files(load_config("generate", args))
    monkeypatch.setattr(command, "stream", lambda *a, **k: (_ for _ in ()).throw(AssertionError("sampled")))
    with pytest.raises(FileExistsError, match="generate.json: already exists"):
        sample_to_files(load_config("generate", args))


def test_the_decode_layout_is_measured_once_cached_and_pinned_on_request(
    protein_run, tmp_path, caplog, monkeypatch
):
    monkeypatch.setenv("MULTIAR_CACHE", str(tmp_path / "cache"))  # a cache of its own: nothing measured yet
    caplog.set_level(logging.INFO, logger="multiar")
    first = generate(protein_run, tmp_path / "a", "n=2", "batch_size=2", "dtype=fp32")["provenance"]["decode"]
    again = generate(protein_run, tmp_path / "b", "n=2", "batch_size=2", "dtype=fp32")["provenance"]["decode"]
    assert first["how"] in ("measured", "only candidate") and first["dtype"] == "fp32"
    if first["how"] == "measured":  # both layouts timed at batch 2; the second run reads the cache
        assert set(first["step_ms"]) == {"fp32/linear", "fp32/packed"} and first["batch_size"] == 2
        assert again["how"] == "cached" and again["layout"] == first["layout"]
    pinned = generate(protein_run, tmp_path / "c", "n=2", "dtype=fp32", "layout=linear")["provenance"][
        "decode"
    ]
    assert pinned == {**pinned, "dtype": "fp32", "layout": "linear", "how": "forced", "step_ms": {}}
    assert any(r.getMessage().startswith("decoding with fp32/linear, forced") for r in caplog.records)
    with pytest.raises(ConfigError, match="layout: must be auto, linear or packed"):
        load_config("generate", ["run=x", "layout=blocked"])


def test_generate_json_says_how_far_the_fp32_prefetch_measure_got(protein_run, tmp_path, monkeypatch):
    """Once engine.cpu_matvec's fp32 operator has run in the process, provenance.decode.fp32_prefetch is
    where its measure of the prefetch hint stands (cpu_matvec.fp32_ahead); without the operators loaded
    it is left out."""
    from multiar.engine import cpu_matvec

    if cpu_matvec.library() is None:
        pytest.skip("no C++ compiler here: no operators")
    cpu_matvec.matvec(torch.randn(1, 1024), torch.randn(256, 1024))  # 1 MiB, one row: the measure started
    decode = generate(protein_run, tmp_path / "a", "n=1", "max_new_tokens=3")["provenance"]["decode"]
    hint = cpu_matvec.fp32_ahead()
    assert decode["fp32_prefetch"]["hint"] == hint["hint"] in ("measuring", "on", "off", "mixed")
    assert hint["pinned"] or [256, 1024] in [shape["shape"] for shape in decode["fp32_prefetch"]["shapes"]]
    assert decode["fp32_prefetch"]["ahead_bytes"] == 16384
    monkeypatch.setattr(cpu_matvec, "loaded", lambda: False)
    again = generate(protein_run, tmp_path / "b", "n=1", "max_new_tokens=3")["provenance"]["decode"]
    assert "fp32_prefetch" not in again
