"""Data path: document-level deterministic split, packing, the on-disk cache, bad files counted."""

from __future__ import annotations

import shutil

import pytest
from conftest import bundled_files

from multiar.data.corpus import is_validation, prepare_corpus
from multiar.data.packing import BlockDataModule, pack
from multiar.domains import build_domain


def corpus_for(name, tmp_path, files, **kw):
    settings = {}
    return prepare_corpus(
        build_domain(name, settings), settings, [str(f) for f in files], cache_dir=tmp_path / "cache", **kw
    )


def test_split_is_by_document_and_deterministic(tmp_path):
    files = bundled_files("music", 40)
    a = corpus_for("music", tmp_path, files, val_fraction=0.2)
    shutil.rmtree(tmp_path / "cache")
    b = corpus_for("music", tmp_path, files, val_fraction=0.2)
    assert list(a.train["key"]) == list(b.train["key"]) and list(a.val["key"]) == list(b.val["key"])
    assert not set(list(a.train["key"])) & set(list(a.val["key"]))
    assert len(a.train) + len(a.val) == 40
    assert set(list(a.val["key"])) == {
        k for k in list(a.train["key"]) + list(a.val["key"]) if is_validation(k, 0.2)
    }


def test_protein_split_is_by_record_within_one_file(tmp_path):
    c = corpus_for("protein", tmp_path, bundled_files("protein", 1), max_documents=400, val_fraction=0.1)
    assert len(c.train) + len(c.val) == 400
    assert 15 < len(c.val) < 70  # ~10% by hash
    assert all(k.startswith("ecoli_k12_UP000000625.fasta.gz#") for k in list(c.val["key"]))


def test_code_tokenizer_is_fitted_on_training_documents_only(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    # each file repeats a letters-only name of its own, frequent enough to become one BPE token
    names = [f"zq{chr(97 + i)}{chr(97 + i)}word" for i in range(12)]
    for i, name in enumerate(names):
        (folder / f"m{i}.py").write_text(f"def {name}(x):\n    return {name}(x) + {name}\n" * 30)
    c = prepare_corpus(
        build_domain("code", {"vocab_size": 600}),
        {"vocab_size": 600},
        [str(folder)],
        cache_dir=tmp_path / "cache",
        val_fraction=0.25,
    )
    tokens = set(c.domain.tokenizer.get_vocab())
    val_files = {k.split("#")[0] for k in list(c.val["key"])}
    assert val_files and len(val_files) < len(names)
    for i, name in enumerate(names):
        learned = any(name in t for t in tokens)
        # the check can fail: every training file's name is a token, no validation file's name is
        assert learned == (f"m{i}.py" not in val_files), name


def test_second_prepare_reuses_the_cache_without_tokenizing(tmp_path, monkeypatch):
    files = bundled_files("music", 10)
    first = corpus_for("music", tmp_path, files)

    def fail(self, record):
        raise AssertionError("re-tokenized although the cache was valid")

    from multiar.domains.music.domain import MusicDomain

    monkeypatch.setattr(MusicDomain, "encode", fail)
    second = corpus_for("music", tmp_path, files)
    assert second.cache_dir == first.cache_dir
    assert list(second.train["ids"]) == list(first.train["ids"])


def test_changed_settings_or_files_miss_the_cache(tmp_path):
    files = bundled_files("music", 6)
    a = corpus_for("music", tmp_path, files)
    b = corpus_for("music", tmp_path, files[:5])
    settings = {"tokenizer_config": {"num_velocities": 8}}
    c = prepare_corpus(
        build_domain("music", settings), settings, [str(f) for f in files], cache_dir=tmp_path / "cache"
    )
    assert len({a.cache_dir, b.cache_dir, c.cache_dir}) == 3


def test_corrupt_file_among_good_ones_is_skipped_and_counted(tmp_path):
    folder = tmp_path / "midi"
    folder.mkdir()
    for f in bundled_files("music", 5):
        shutil.copy(f, folder)
    (folder / "zz_broken.mid").write_bytes(b"MThd garbage")
    c = corpus_for("music", tmp_path, [folder])
    assert c.stats["files"] == 6 and c.stats["files_skipped"] == 1
    assert len(c.train) + len(c.val) == 5


def test_packed_blocks_hold_only_real_tokens_and_separators():
    docs = [[10, 11, 12], [20, 21], [30, 31, 32, 33, 34]]
    out = pack({"ids": docs}, block_size=4, bos_id=1, eos_id=2, pad_id=0)
    stream = [1, 10, 11, 12, 2, 1, 20, 21, 2, 1, 30, 31, 32, 33, 34, 2]
    blocks = out["block"]
    assert all(len(b) == 5 for b in blocks)
    # consecutive windows overlap by one token; together they are the stream, then padding
    rebuilt = blocks[0] + [t for b in blocks[1:] for t in b[1:]]
    assert rebuilt[: len(stream)] == stream and set(rebuilt[len(stream) :]) <= {0}
    targets = [t for b in blocks for t in b[1:] if t != 0]
    assert targets == stream[1:]  # every token after the first is a target exactly once


def test_datamodule_yields_long_blocks_of_block_size_plus_one(tmp_path):
    c = corpus_for("protein", tmp_path, bundled_files("protein", 1), max_documents=60)
    dm = BlockDataModule(c, block_size=32, batch_size=4)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (4, 33) and batch.dtype.is_floating_point is False
    assert int(batch.max()) < c.domain.vocab_size


def test_too_few_documents_is_a_clear_error(tmp_path):
    path = tmp_path / "one.fasta"
    path.write_text(">only\nMKV\n")
    with pytest.raises(ValueError, match="need at least 2 documents"):
        corpus_for("protein", tmp_path, [path])


def _prepare_keys(args):
    cache, files = args
    c = prepare_corpus(build_domain("code", {"vocab_size": 400}), {"vocab_size": 400}, files, cache_dir=cache)
    return list(c.train["key"]), c.domain.vocab_size, str(c.cache_dir)


def test_concurrent_prepares_share_one_cache_entry(tmp_path):
    import multiprocessing as mp

    files = [str(f) for f in bundled_files("code", 25)]
    with mp.get_context("fork").Pool(2) as pool:
        a, b = pool.map(_prepare_keys, [(tmp_path / "cache", files)] * 2)
    assert a == b
    entries = list((tmp_path / "cache" / "code").iterdir())
    assert [e.name for e in entries] == [a[2].rsplit("/", 1)[-1]]  # no partial folders left behind


def test_same_file_names_in_different_folders_are_different_documents(tmp_path):
    for sub in ("a", "b", "c"):
        (tmp_path / "src" / sub).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "src" / sub / f"util{i}.py").write_text(f"def {sub}{i}():\n    return {i}\n")
    settings = {"vocab_size": 300}
    c = prepare_corpus(
        build_domain("code", settings),
        settings,
        [str(tmp_path / "src")],
        cache_dir=tmp_path / "cache",
        max_documents=7,
    )
    keys = list(c.train["key"]) + list(c.val["key"])
    assert len(keys) == len(set(keys)) == 7
    assert "a/util0.py#0" in keys


def test_failed_build_leaves_no_partial_cache_folder(tmp_path, monkeypatch):
    from multiar.domains.protein.domain import ProteinDomain

    path = tmp_path / "few.fasta"
    path.write_text("".join(f">r{i}\nMKV{'ACDEFGHIKL'[i % 10] * (i + 1)}\n" for i in range(20)))
    real, calls = ProteinDomain.encode, {"n": 0}

    def interrupted(self, record):
        calls["n"] += 1
        if calls["n"] == 10:  # encode runs in the build only (content checks come before the split)
            raise KeyboardInterrupt
        return real(self, record)

    monkeypatch.setattr(ProteinDomain, "encode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        corpus_for("protein", tmp_path, [path])
    assert list((tmp_path / "cache" / "protein").iterdir()) == []


def test_packed_blocks_are_keyed_by_the_code_that_packs(tmp_path, monkeypatch):
    """A change of the transforms pack calls (fill-in-the-middle, tag dropout) gives a new cache key, so
    stale blocks are never reused; datasets' own fingerprint missed such a change."""
    import multiar.data.packing as data_module

    c = corpus_for("protein", tmp_path, bundled_files("protein", 1), max_documents=40)
    kwargs = {"block_size": 32, "fim": None}
    key = data_module.packing_fingerprint(c.train, kwargs)
    assert key == data_module.packing_fingerprint(c.train, dict(kwargs))
    assert key != data_module.packing_fingerprint(c.train, {**kwargs, "block_size": 64})
    real = data_module.inspect.getsource
    monkeypatch.setattr(
        data_module.inspect,
        "getsource",
        lambda f: real(f) + ("# a new transform" if f is data_module.fim_module else ""),
    )
    assert data_module.packing_fingerprint(c.train, kwargs) != key
