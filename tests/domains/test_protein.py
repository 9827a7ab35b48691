"""Protein in depth: UniProt headers, data filters, termini, control tags (also for music), length
control, fixed positions, ranking by the model, novelty, and the files a biologist gets."""

from __future__ import annotations

import csv
import itertools
import json
import logging
import math
import random
import shutil

import pytest
import torch
import torch.nn.functional as F
from Bio import SeqIO
from Bio.Seq import Seq
from Bio.SeqRecord import SeqRecord
from conftest import QUIET_FILTERS, TINY, bundled_files, proteome_subset

from multiar.commands.conditioning import conditions
from multiar.commands.generate import sample_to_files
from multiar.config import load_config
from multiar.data.corpus import prepare_corpus
from multiar.data.packing import pack
from multiar.data.source import Source
from multiar.domains import build_domain
from multiar.domains.protein.analysis import longest_run, min_window_entropy
from multiar.domains.protein.novelty import BLOSUM62, IdentityAligner, KmerIndex, blosum_letters, nearest
from multiar.errors import ConfigError
from multiar.run_folder import load_run
from multiar.training.run import train


@pytest.fixture(scope="module")
def tagged_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tagged")
    data = proteome_subset(tmp / "data")
    overrides = [
        *TINY,
        "domain=protein",
        f"data.paths=[{data}]",
        "data.tags=header:OX",
        f"run_dir={tmp / 'run'}",
        "model.block_size=128",
        "trainer.max_steps=30",
        "trainer.val_check_interval=30",
    ]
    train(load_config("train", overrides))
    return tmp / "run"


def generate(run, out, *overrides):
    return sample_to_files(load_config("generate", [f"run={run}", f"out={out}", "dtype=fp32", *overrides]))


def test_uniprot_headers_are_parsed():
    domain = build_domain("protein")
    ecoli, yeast = (next(iter(domain.read(p))) for p in domain.default_paths("ecoli+yeast"))
    f = domain.fields(ecoli)
    assert f["db"] == "tr" and f["accession"] == "A0A385XJN2" and f["entry"] == "A0A385XJN2_ECOLI"
    assert f["name"] == "Uncharacterized protein"
    assert (f["OS"], f["OX"], f["GN"], f["PE"], f["SV"]) == (
        "Escherichia coli (strain K12)",
        "83333",
        "ygiA",
        "4",
        "1",
    )
    g = domain.fields(yeast)
    assert g["OS"] == "Saccharomyces cerevisiae (strain ATCC 204508 / S288c)" and g["OX"] == "559292"
    assert g["db"] == "sp" and g["GN"] and g["PE"] in "12345"
    plain = SeqRecord(Seq("MKV"), id="my_protein", description="my_protein some words")
    assert domain.fields(plain) == {"id": "my_protein", "name": "some words"}


def test_summaries_share_one_count_of_the_training_lengths_until_the_training_set_changes():
    """A server starts a metric summary for every request: the training lengths are counted once, and
    again when the training set changes."""
    domain = build_domain("protein")
    domain.training = [("a", "MKV"), ("b", "MKVLA")]
    first, again = domain.metric_summary(), domain.metric_summary()
    assert first.train_lengths is again.train_lengths and first.train_lengths == {3: 1, 5: 1}
    domain.training.append(("c", "MK"))
    assert domain.metric_summary().train_lengths == {3: 1, 5: 1, 2: 1}
    domain.training = [("d", "M")]
    assert domain.metric_summary().train_lengths == {1: 1}


def test_bad_records_are_skipped_and_counted_once_per_file(tmp_path, caplog):
    folder = tmp_path / "data"
    folder.mkdir()
    good = "".join(f">g{i}\nMKV{'ACDEFGHIKL' * (i + 2)}*\n" for i in range(12))
    bad = ">b1\nMKJ1\n>b2\nMK2V\n>b3\nJJJ\n>e1\n\n>x1\nXXXXXXXXMK\n"
    (folder / "mixed.fasta").write_text(good + bad)
    domain = build_domain("protein", {"max_x_fraction": 0.5})
    with caplog.at_level(logging.WARNING, logger="multiar"):
        corpus = prepare_corpus(domain, source=Source(domain, [str(folder)]), cache_dir=tmp_path / "cache")
    assert corpus.stats["records_skipped"] == 5
    lines = [r.getMessage() for r in caplog.records if "mixed.fasta" in r.getMessage()]
    assert len(lines) == 1, lines  # one line for the file, not one per record
    assert "skipped 5 record(s)" in lines[0] and "letters outside the amino-acid alphabet" in lines[0]
    assert "empty sequence (1)" in lines[0] and "max_x_fraction=0.5 of X (1)" in lines[0]
    # '*' is stripped, not a letter: every good record was kept
    assert corpus.stats["documents_train"] + corpus.stats["documents_val"] == 12


def test_unknown_letters_mapped_to_x_and_length_filters():
    mapped = build_domain("protein", {"unknown_letters": "x"})
    assert mapped.decode(mapped.encode(SeqRecord(Seq("MKJ1V"), id="a")))[0] == "MKXXV"
    strict = build_domain("protein", {"min_len": 5, "max_len": 8})
    with pytest.raises(ValueError, match="shorter than min_len=5"):
        strict.content(SeqRecord(Seq("MKV"), id="s"))
    with pytest.raises(ValueError, match="longer than max_len=8"):
        strict.content(SeqRecord(Seq("MKVLLLLLL"), id="l"))
    assert strict.content(SeqRecord(Seq("MKVLL"), id="ok")) == b"MKVLL"
    with pytest.raises(ConfigError, match="domain.settings: unknown_letters"):
        train(load_config("train", ["domain=protein", "domain.settings.unknown_letters=drop"]))


def test_long_protein_windows_carry_termini_only_at_its_real_ends():
    bos, eos, pad = 1, 2, 0
    doc = list(range(3, 43))  # 40 residues, blocks of 16
    blocks = pack({"ids": [doc], "key": ["k"]}, 16, bos, eos, pad)["block"]
    assert len(blocks) == 3
    assert (
        blocks[0][0] == bos
        and all(bos not in b[1:] for b in blocks)
        and all(bos not in b for b in blocks[1:])
    )
    assert eos in blocks[-1] and all(eos not in b for b in blocks[:-1])
    assert [t for b in blocks for t in b[:-1]][: len(doc) + 2] == [bos, *doc, eos]


def test_tag_dropout_leaves_out_that_share_of_documents_deterministically():
    docs = [[30, 5, 6, 7]] * 2000
    keys = [f"f#{i}" for i in range(2000)]
    blocks = pack({"ids": docs, "key": keys}, 8, 1, 2, 0, tag_ids=(30, 32), tag_dropout=0.3, seed=3)["block"]
    stream = [t for b in blocks for t in b[:-1]]
    tagged = stream.count(30)
    assert 0.65 < tagged / 2000 < 0.75
    again = pack({"ids": docs, "key": keys}, 8, 1, 2, 0, tag_ids=(30, 32), tag_dropout=0.3, seed=3)["block"]
    assert again == blocks
    none = pack({"ids": docs, "key": keys}, 8, 1, 2, 0, tag_ids=(30, 32), tag_dropout=0.0, seed=3)["block"]
    assert [t for b in none for t in b[:-1]].count(30) == 2000


def test_tags_round_trip_and_condition_generation(tagged_run, tmp_path):
    run = load_run(tagged_run)
    domain = run.domain
    assert domain.tags == ["OX=559292", "OX=83333"] and domain.vocab_size == domain.base.vocab_size + 2
    assert json.loads((tagged_run / "domain" / "tags.json").read_text())["spec"] == "header:OX"
    record = next(iter(domain.read(next((tagged_run.parent / "data").glob("ecoli*")))))
    ids = domain.encode_document("ecoli.fasta#0", record)
    assert ids[0] == domain.first_tag_id + 1 and domain.decode(ids)[0] == str(record.seq)
    report = generate(tagged_run, tmp_path / "o", "n=3", "max_new_tokens=20", "tags=OX=83333")
    assert report["tags"] == "OX=83333"
    descriptions = [r.description for r in SeqIO.parse(tmp_path / "o" / "samples.fasta", "fasta")]
    assert all("tags=OX=83333" in d for d in descriptions)
    with pytest.raises(ConfigError, match=r"unknown tag\(s\) OX=1; this run knows: OX=559292, OX=83333"):
        generate(tagged_run, tmp_path / "o2", "n=1", "tags=OX=1")


def test_tags_on_an_untagged_run_and_a_bad_tag_source_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="data.tags: 'organism'"):
        train(load_config("train", ["domain=protein", "data.tags=organism"]))
    with pytest.raises(ConfigError, match="data.tags: .*missing.tsv"):
        train(load_config("train", ["domain=protein", f"data.tags=tsv:{tmp_path / 'missing.tsv'}"]))
    with pytest.raises(ConfigError, match="the code domain's records have no header fields"):
        train(load_config("train", ["domain=code", "data.tags=header:OX"]))


def test_length_window_masks_eos_before_min_len_and_cuts_at_max_len(tagged_run, tmp_path):
    generate(tagged_run, tmp_path / "o", "n=12", "min_len=15", "max_len=25", "prompt=MK", "temperature=1.5")
    records = list(SeqIO.parse(tmp_path / "o" / "samples.fasta", "fasta"))
    lengths = [len(r.seq) for r in records]
    assert all(15 <= n <= 25 for n in lengths), lengths
    for r in records:
        assert str(r.seq).startswith("MK")
        assert ("truncated" in r.description.split()) == (len(r.seq) == 25 and "end=max_len" in r.description)
        assert "end=eos" in r.description or "end=max_len" in r.description
    with pytest.raises(ConfigError, match="min_len/max_len/template count bytes"):
        conditions(load_config("generate", ["run=r", "min_len=3"]), build_domain("code"), [[1]])


def test_fixed_template_positions_are_kept(tagged_run, tmp_path):
    template = "MKTAYIAKQRQISFVKSHFSRQLEERLGLI"
    generate(tagged_run, tmp_path / "o", "n=5", f"template={template}", "fixed=1-5,12,20-22", "temperature=2")
    records = list(SeqIO.parse(tmp_path / "o" / "samples.fasta", "fasta"))
    kept = [*range(1, 6), 12, 20, 21, 22]
    for r in records:
        assert len(r.seq) == len(template) and "kept=1-5,12,20-22" in r.description
        assert all(r.seq[p - 1] == template[p - 1] for p in kept)
        assert "truncated" not in r.description
    assert len({str(r.seq) for r in records}) > 1  # the free positions were sampled
    with pytest.raises(ConfigError, match="fixed: '31' is outside the template's positions 1-30"):
        generate(tagged_run, tmp_path / "o2", f"template={template}", "fixed=31")


def reference_ppl(model, domain, tag_ids, seq, ended):
    """exp(mean NLL) of the residues (and EOS) after BOS + tags, by a plain full forward."""
    residues = domain.base.encode(SeqRecord(Seq(seq), id="s"))
    ids = [domain.bos_id, *tag_ids, *residues, *([domain.eos_id] if ended else [])]
    x, y = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
    nll = F.cross_entropy(model(x)[0].float(), y[0], reduction="none")[len(tag_ids) :]
    return math.exp(nll.mean().item())


def test_ranking_orders_by_the_models_own_perplexity(tagged_run, tmp_path):
    report = generate(
        tagged_run, tmp_path / "o", "n=8", "max_new_tokens=30", "tags=OX=559292", "rank_by=ppl", "top=3",
        *QUIET_FILTERS,
    )  # fmt: skip
    assert report["ranked"] == 3
    top = list(SeqIO.parse(tmp_path / "o" / "top" / "samples.fasta", "fasta"))
    assert len(top) == 3
    ppls = [float(r.description.split("ppl=")[1].split()[0]) for r in top]
    assert ppls == sorted(ppls) and [f"rank={i}" in r.description for i, r in enumerate(top, 1)] == [True] * 3
    run = load_run(tagged_run)
    rows = list(csv.DictReader((tmp_path / "o" / "samples.csv").open()))
    assert len(rows) == 8 and min(float(r["ppl"]) for r in rows) == ppls[0]
    by_id = {r["id"]: r for r in rows}
    assert [by_id[r.id]["rank"] for r in top] == ["1", "2", "3"]  # the ranked copies keep their ids
    for r in rows:  # each sample's ppl is the model's own
        want = reference_ppl(
            run.model, run.domain, run.domain.tag_ids("OX=559292"), r["sequence"], r["end"] == "eos"
        )
        assert float(r["ppl"]) == pytest.approx(want, rel=2e-3)


def test_novelty_search_finds_a_training_sequence_at_full_identity():
    domain = build_domain("protein")
    records = list(itertools.islice(domain.read(domain.default_paths("yeast")[0]), 500))
    seqs = [str(r.seq) for r in records]
    index = KmerIndex(seqs)
    ids = [r.id for r in records]
    found = nearest([seqs[123], seqs[45][10:90], seqs[7][:50] + "W" + seqs[7][51:120]], index, ids)
    assert found[0] == (1.0, ids[123])
    assert found[1] == (1.0, ids[45])  # a copied fragment is a copy
    assert found[2][1] == ids[7] and 0.98 < found[2][0] < 1.0
    shuffled = "".join(sorted(seqs[123]))  # same composition, no homology
    assert nearest([shuffled], index, ids)[0][0] < 0.6


def most_identical_optimal_alignment(query: str, target: str) -> int:
    """The reference: every best-scoring alignment Bio.Align enumerates (BLOSUM62, gaps 11 + (k - 1), free
    end gaps), the most identities among them."""
    from Bio import Align

    align = Align.PairwiseAligner(mode="global", substitution_matrix=BLOSUM62)
    align.open_gap_score, align.extend_gap_score, align.end_gap_score = -11, -1, 0
    alignments = align.align(query, target)
    return max(a.counts().identities for a in itertools.islice(alignments, 5000))


@pytest.mark.parametrize("backend", ["biopython", "parasail"])
def test_identity_is_the_most_identical_of_the_best_scoring_alignments(backend):
    if backend == "parasail":
        pytest.importorskip("parasail")
    rng = random.Random(3)
    aligner = IdentityAligner(backend)
    letters = "ACDEFGHIKLMNPQRSTVWY"
    pairs = []
    for _ in range(60):  # short pairs: few enough optimal alignments to enumerate; some near copies
        target = "".join(rng.choice(letters) for _ in range(rng.randint(8, 40)))
        start = rng.randrange(len(target))
        query = "".join(c if rng.random() < 0.7 else rng.choice(letters) for c in target[start : start + 20])
        pairs.append((query or "A", target))
    for query, target in pairs:
        assert aligner.identities(query, target) == most_identical_optimal_alignment(query, target), (
            query,
            target,
        )


def test_both_identity_backends_agree_on_proteome_sized_pairs():
    pytest.importorskip("parasail")
    domain = build_domain("protein")
    seqs = [
        blosum_letters(str(r.seq))
        for r in itertools.islice(domain.read(domain.default_paths("ecoli")[0]), 120)
    ]
    fast, reference = IdentityAligner("parasail"), IdentityAligner("biopython")
    rng = random.Random(5)
    for _ in range(80):
        query, target = rng.choice(seqs)[: rng.randint(20, 160)], rng.choice(seqs)
        assert fast.identities(query, target) == reference.identities(query, target)
    for _ in range(40):  # unrelated random pairs: a negative best, where Bio.Align aligns nothing
        query = "".join(rng.choice("ACDEFGHIKLMNPQRSTVWY") for _ in range(rng.randint(150, 300)))
        target = "".join(rng.choice("ACDEFGHIKLMNPQRSTVWY") for _ in range(rng.randint(150, 300)))
        assert fast.identities(query, target) == reference.identities(query, target)
    long = seqs[0] * 60  # past parasail's 32-bit range at this scale: Bio.Align's doubles take it
    assert fast.identities(long, long) == len(long)
    assert blosum_letters("muoj*") == "MCKX*"  # selenocysteine as C, pyrrolysine as K, the unknown as X


def test_low_complexity_and_homopolymer_measures():
    assert min_window_entropy("Q" * 12, 12) == 0.0
    assert min_window_entropy("ACDEFGHIKLMN", 12) == pytest.approx(math.log2(12))
    assert min_window_entropy("ACDEFGHIKLMNQQQQQQQQQQQQACDEF", 12) == 0.0
    assert longest_run("MKKKKVAA") == 4 and longest_run("") == 0


def test_outputs_a_biologist_can_use(tagged_run, tmp_path):
    report = generate(tagged_run, tmp_path / "o", "n=6", "max_new_tokens=40")
    out = tmp_path / "o"
    records = list(SeqIO.parse(out / "samples.fasta", "fasta"))
    assert len({r.id for r in records}) == len(records) == 6
    for r in records:
        words = dict(w.split("=", 1) for w in r.description.split()[1:] if "=" in w)
        assert int(words["length"]) == len(r.seq)
        assert {"ppl", "identity", "nearest", "end", "passes", "temperature", "seed"} <= set(words)
    rows = list(csv.DictReader((out / "samples.csv").open()))
    assert [r["id"] for r in rows] == [r.id for r in records]
    assert rows[0]["temperature"] == "1.0" and rows[0]["seed"] == "1"  # the settings, as in the FASTA
    for name in ("composition.png", "lengths.png", "novelty.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    m = report["metrics"]
    for key in (
        "protein/aa_kl",
        "protein/length_ks",
        "protein/eos_rate",
        "protein/pass_rate",
        "protein/median_identity",
    ):
        assert key in m and 0.0 <= m[key] < 100
    assert 0.0 <= m["protein/median_identity"] <= 1.0


def test_music_enables_control_tags_by_config(tmp_path):
    """The tag mechanism is generic: a folder name as a style tag for music, grammar kept."""
    data = tmp_path / "music"
    for style, files in (("early", bundled_files("music", 3)), ("late", bundled_files("music", 6)[3:])):
        (data / style).mkdir(parents=True)
        for f in files:
            shutil.copy(f, data / style / f.name)
    overrides = [*TINY, "domain=music", f"data.paths=[{data}]", "data.tags=folder", f"run_dir={tmp_path / 'run'}",
                 "trainer.max_steps=4", "trainer.val_check_interval=4", "data.val_fraction=0.3"]  # fmt: skip
    train(load_config("train", overrides))
    run = load_run(tmp_path / "run")
    assert run.domain.tags == ["early", "late"] or sorted(run.domain.tags) == ["early", "late"]
    report = generate(tmp_path / "run", tmp_path / "o", "n=2", "max_new_tokens=40", "tags=late")
    assert report["tags"] == "late" and len(list((tmp_path / "o").glob("*.mid"))) == 2


def test_tags_from_a_tsv_table_the_file_and_the_folder(tmp_path):
    from multiar.tags import Tagged

    table = tmp_path / "tags.tsv"
    table.write_text("# id\ttags\nsp|P0A7B8|HSLV_ECOLI\tprotease, heat\nsample.fasta\tfromfile\n")
    record = SeqRecord(Seq("MKV"), id="sp|P0A7B8|HSLV_ECOLI", description="sp|P0A7B8|HSLV_ECOLI x OX=83333")
    other = SeqRecord(Seq("MKV"), id="q", description="q")
    by_tsv = Tagged(build_domain("protein"), f"tsv:{table}")
    assert by_tsv.document_tags("a/b.fasta#0", record) == ["protease", "heat"]
    assert by_tsv.document_tags("a/sample.fasta#3", other) == ["fromfile"]
    assert by_tsv.document_tags("a/b.fasta#1", other) == []
    assert Tagged(build_domain("protein"), "folder").document_tags("ecoli/b.fasta#0", other) == ["ecoli"]
    assert Tagged(build_domain("protein"), "file").document_tags("x/b.fasta.gz#0", other) == ["b"]
    assert Tagged(build_domain("protein"), "header:OX").document_tags("b#0", record) == ["OX=83333"]
    (tmp_path / "bad.tsv").write_text("no tab here\n")
    with pytest.raises(ConfigError, match="bad.tsv:1: expected 'id<TAB>tag,tag'"):
        Tagged(build_domain("protein"), f"tsv:{tmp_path / 'bad.tsv'}")
