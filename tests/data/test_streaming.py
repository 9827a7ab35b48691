"""Corpora from HF datasets (any domain) and streamed corpora larger than memory."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import yaml
from conftest import TINY, bundled_files
from datasets import Dataset

from multiar.commands.evaluate import eval_run
from multiar.config import load_config
from multiar.data.corpus import is_validation, prepare_corpus
from multiar.data.source import Source
from multiar.data.streaming import (
    PACK_DOCUMENTS,
    ShuffledStream,
    StreamingDataModule,
    StreamStats,
    stream_blocks,
)
from multiar.domains import build_domain
from multiar.errors import ConfigError
from multiar.training.run import train

AMINO = "ACDEFGHIKLMNPQRSTVWY"


def many_fasta_files(folder, n=300, seed=0):
    rng = random.Random(seed)
    folder.mkdir()
    seqs = {}
    for i in range(n):
        seq = "".join(rng.choice(AMINO) for _ in range(rng.randint(5, 60)))
        (folder / f"f{i:04d}.fasta").write_text(f">s{i}\n{seq}\n")
        seqs[f"f{i:04d}.fasta#0"] = seq
    return seqs


def test_streaming_holds_few_documents_and_sees_every_token_once_per_epoch(tmp_path):
    seqs = many_fasta_files(tmp_path / "corpus")
    domain = build_domain("protein")
    source = Source(domain, [str(tmp_path / "corpus")])
    stats = StreamStats()
    ds = ShuffledStream(
        lambda order: stream_blocks(source, domain, 32, 0.1, False, stats, order), source.shards(), 0, 50
    )
    blocks = [b["block"].tolist() for b in ds]
    train_docs = [s for k, s in seqs.items() if not is_validation(k, 0.1)]
    assert 0 < len(train_docs) < len(seqs)
    # every token of every training document (and its EOS) is a target exactly once; BOS starts windows
    expected = Counter(t for s in train_docs for t in [domain.stoi[a] for a in s] + [domain.eos_id])
    seen = Counter(t for b in blocks for t in b[1:] if t not in (domain.pad_id, domain.bos_id))
    assert seen == expected
    assert stats.read == len(train_docs) and stats.most_held <= PACK_DOCUMENTS < len(train_docs)
    # a second epoch: the same tokens, in another order
    again = [b["block"].tolist() for b in ds]
    assert Counter(t for b in again for t in b[1:] if t not in (domain.pad_id, domain.bos_id)) == expected
    assert again != blocks


def test_a_streamed_run_trains_and_evaluates_on_its_validation_split(tmp_path):
    many_fasta_files(tmp_path / "corpus", n=120)
    cfg = load_config(
        "train",
        [
            *TINY,
            "domain=protein",
            f"data.paths=[{tmp_path / 'corpus'}]",
            "data.streaming=true",
            "data.val_fraction=0.2",
            "trainer.max_steps=4",
            "trainer.val_check_interval=2",
            f"run_dir={tmp_path / 'run'}",
        ],
    )
    result = train(cfg)
    assert result["steps"] == 4 and result["val/loss"] > 0
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert config["data_stats"]["streaming"] is True
    report = eval_run(load_config("eval", [f"run={tmp_path / 'run'}", "n=0"]))
    assert report["documents"] == sum(is_validation(f"f{i:04d}.fasta#0", 0.2) for i in range(120))


def test_code_trains_from_a_saved_hf_dataset_column(tmp_path):
    texts = [f.read_text() for f in bundled_files("code", 12)]
    Dataset.from_dict({"content": texts + [None], "n": list(range(13))}).save_to_disk(str(tmp_path / "hf"))
    cfg = load_config(
        "train",
        [
            *TINY,
            "domain=code",
            f"data.hf_dataset={tmp_path / 'hf'}",
            "data.hf_column=content",
            "domain.settings.vocab_size=400",
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
            f"run_dir={tmp_path / 'run'}",
        ],
    )
    train(cfg)
    stats = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data_stats"]
    empty = sum(not t.strip() for t in texts)
    assert stats["rows"] == 13 and stats["files_skipped"] == 1 + empty  # the None row and empty ones
    assert stats["documents_train"] + stats["documents_val"] == len({t for t in texts if t.strip()})
    assert eval_run(load_config("eval", [f"run={tmp_path / 'run'}", "n=0"]))["unit"] == "byte"


def test_protein_and_music_read_hf_columns(tmp_path):
    Dataset.from_dict({"seq": ["MKTAYIAKQR", "MSTNPKPQRK", "MAAAAGXX"]}).save_to_disk(str(tmp_path / "p"))
    protein = build_domain("protein")
    corpus = prepare_corpus(
        protein,
        {},
        cache_dir=tmp_path / "c",
        source=Source(protein, hf_dataset=str(tmp_path / "p"), hf_column="seq"),
    )
    assert corpus.stats["documents_train"] + corpus.stats["documents_val"] == 3
    midi = [f.read_bytes() for f in bundled_files("music", 4)]
    Dataset.from_dict({"midi": midi + [b"not midi"]}).save_to_disk(str(tmp_path / "m"))
    music = build_domain("music")
    corpus = prepare_corpus(
        music,
        {},
        cache_dir=tmp_path / "c",
        source=Source(music, hf_dataset=str(tmp_path / "m"), hf_column="midi"),
    )
    assert (
        corpus.stats["files_skipped"] == 1
        and corpus.stats["documents_train"] + corpus.stats["documents_val"] == 4
    )
    with pytest.raises(ConfigError, match="has no column 'text'; its columns: midi"):
        Source(music, hf_dataset=str(tmp_path / "m"), hf_column="text")
    with pytest.raises(ConfigError, match="data.paths or data.hf_dataset"):
        load_config("train", ["data.paths=[x]", "data.hf_dataset=y", "data.hf_column=z"])


def test_each_epoch_reorders_the_stream_also_with_worker_processes(tmp_path):
    many_fasta_files(tmp_path / "corpus", n=60)
    domain = build_domain("protein")
    dm = StreamingDataModule(
        Source(domain, [str(tmp_path / "corpus")]), domain, 32, 4, 0.1, num_workers=1, shuffle_buffer=20
    )
    loader = dm.train_dataloader()
    first, second = ([b.tolist() for b in loader] for _ in range(2))
    assert first != second  # the worker's copy of the stream got the next epoch
    special = (domain.pad_id, domain.bos_id)
    targets = [
        Counter(t for b in run for row in b for t in row[1:] if t not in special) for run in (first, second)
    ]
    assert targets[0] == targets[1]  # the same tokens, each a target once per epoch


def test_under_several_ranks_each_rank_streams_without_end_so_all_take_the_same_steps(tmp_path):
    # ranks read different files (unequal blocks): a rank whose stream ended first would leave the others
    # waiting in the gradient all-reduce. Each rank's stream starts its next pass at once instead
    import itertools
    from types import SimpleNamespace

    stream = ShuffledStream(lambda order: [f"{s}{i}" for s in order for i in range(2)], ["a", "b", "c"], 0, 2)
    assert len(list(stream)) == 6  # one process: an epoch is one pass
    stream.cycle = True
    blocks = list(itertools.islice(iter(stream), 18))
    passes = [blocks[i : i + 6] for i in (0, 6, 12)]
    assert all(sorted(p) == ["a0", "a1", "b0", "b1", "c0", "c1"] for p in passes)
    assert len({tuple(p) for p in passes}) > 1  # each pass its own order

    domain = build_domain("protein")
    folder = tmp_path / "fasta"
    many_fasta_files(folder, n=20)
    module = StreamingDataModule(Source(domain, [str(folder)]), domain, 64, 4, 0.1)
    module.trainer = SimpleNamespace(world_size=2, max_steps=10)
    assert module.train_dataloader().dataset.cycle
    module.trainer = SimpleNamespace(world_size=2, max_steps=-1)
    with pytest.raises(ValueError, match="trainer.max_steps"):
        module.train_dataloader()
    module.trainer = SimpleNamespace(world_size=1, max_steps=-1)
    assert not module.train_dataloader().dataset.cycle
