"""Every domain in DOMAINS: round trips on bundled real files, outputs that load back, bad input handled."""

from __future__ import annotations

import gzip
import random
from pathlib import Path

import mido
import pytest
from Bio import SeqIO
from conftest import bundled_files, fitted_domain
from symusic import Score

from multiar.data.source import iter_records
from multiar.domain import Domain
from multiar.domains import DOMAINS, build_domain, load_domain
from multiar.domains.code.domain import parses
from multiar.files import Skips


def quarter_notes(score: Score) -> list[tuple]:
    """Notes of all tracks in quarter-note units, so scores of different resolutions compare."""
    tpq = score.ticks_per_quarter
    return sorted(
        (n.time / tpq, n.pitch, n.duration / tpq, n.velocity) for t in score.tracks for n in t.notes
    )


def test_registry_names_match_domain_names_and_configs():
    conf = Path(__file__).parents[2] / "conf" / "domain"
    for name, cls in DOMAINS.items():
        assert cls.name == name
        assert (conf / f"{name}.yaml").exists()
        assert isinstance(fitted_domain(name, 3)[0], Domain)


def test_special_ids_are_distinct_and_inside_the_vocabulary(domain_name):
    domain, _ = fitted_domain(domain_name)
    specials = {domain.pad_id, domain.bos_id, domain.eos_id}
    assert len(specials) == 3
    assert all(0 <= i < domain.vocab_size for i in specials)


def test_round_trip_on_bundled_files(domain_name):
    domain, records = fitted_domain(domain_name)
    for record in records[:25]:
        ids = domain.encode(record)
        assert ids and max(ids) < domain.vocab_size
        assert not {domain.pad_id, domain.bos_id, domain.eos_id} & set(ids)
        decoded, dropped = domain.decode(ids)
        assert dropped == 0
        if domain_name == "protein":
            assert decoded == str(record.seq).upper().rstrip("*")
        elif domain_name == "code":
            assert decoded == record
        elif domain_name == "image":  # patches to their nearest codes: close, not equal
            assert ((decoded.pixels - record.pixels) ** 2).mean() ** 0.5 < 0.15
        else:  # music: the same notes as miditok's own preprocessing of the file keeps
            assert quarter_notes(decoded) == quarter_notes(domain.tokenizer.preprocess_score(record))


def test_saved_state_reloads_to_identical_encoding(domain_name, tmp_path):
    domain, records = fitted_domain(domain_name)
    domain.save(tmp_path)
    again = load_domain(domain_name, tmp_path)
    assert again.vocab_size == domain.vocab_size
    for record in records[:5]:
        assert again.encode(record) == domain.encode(record)


def test_decode_never_raises_on_random_model_output(domain_name):
    domain, _ = fitted_domain(domain_name)
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(domain.vocab_size) for _ in range(rng.randrange(0, 300))]
        artifact, dropped = domain.decode(ids)
        assert 0 <= dropped <= len(ids)
    assert domain.decode([domain.bos_id, domain.eos_id, domain.pad_id])[1] == 3


def test_written_files_load_back(domain_name, tmp_path):
    domain, records = fitted_domain(domain_name)
    artifacts = [domain.decode(domain.encode(r))[0] for r in records[:4]]
    paths = domain.write(artifacts, tmp_path, {"seed": 1, "temperature": 0.9})
    assert paths and all(p.exists() for p in paths)
    if domain_name == "protein":
        back = list(SeqIO.parse(paths[0], "fasta"))
        assert [str(r.seq) for r in back] == artifacts
        assert len({r.id for r in back}) == len(back)
        assert "seed=1" in back[0].description and "temperature=0.9" in back[0].description
    elif domain_name == "music":
        assert [p.suffix for p in paths] == [".mid", ".png"] * len(artifacts)  # each file, its piano roll
        for path, original in zip(paths[::2], artifacts, strict=True):
            assert quarter_notes(Score(str(path))) == quarter_notes(original)
            midi = mido.MidiFile(path)
            assert (
                sum(m.type == "note_on" and m.velocity > 0 for t in midi.tracks for m in t)
                == original.note_num()
            )
    elif domain_name == "image":
        from PIL import Image as PILImage

        for path, original in zip(paths, artifacts, strict=True):
            back = PILImage.open(path)
            assert abs(back.getpixel((3, 4)) / 255 - float(original.pixels[4, 3, 0])) <= 1 / 255
            assert '"seed": 1' in back.text["multiar"]
    else:  # the code, after one comment line with the provenance
        texts = [p.read_text() for p in paths]
        assert [t.split("\n", 1)[1] for t in texts] == artifacts
        assert all(t.startswith("# multiar sample: seed=1 temperature=0.9\n") for t in texts)


def test_outputs_are_never_silently_overwritten(domain_name, tmp_path):
    domain, records = fitted_domain(domain_name)
    artifacts = [domain.decode(domain.encode(records[0]))[0]]
    domain.write(artifacts, tmp_path, {})
    with pytest.raises(FileExistsError, match="already exists"):
        domain.write(artifacts, tmp_path, {})
    domain.write(artifacts, tmp_path, {}, overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_metrics_are_prefixed_with_the_domain_name(domain_name):
    domain, records = fitted_domain(domain_name)
    metrics = domain.metrics([domain.decode(domain.encode(r))[0] for r in records[:3]])
    assert metrics and all(k.startswith(f"{domain_name}/") for k in metrics)


def write_corrupt(domain_name: str, folder: Path) -> Path:
    names = {"music": "broken.mid", "code": "broken.py", "protein": "broken.fasta", "image": "broken.png"}
    bad = folder / names[domain_name]
    bad.write_bytes(
        {
            "music": b"MThd\x00\x00garbage",
            "code": b"x = '\xff\xfe'\n",
            "protein": b"not a fasta file\n",
            "image": b"\x89PNG\r\n\x1a\nnot really",
        }[domain_name]
    )
    return bad


def test_corrupt_file_is_skipped_and_counted(domain_name, tmp_path):
    domain = build_domain(domain_name)
    good = bundled_files(domain_name, 2)
    bad = write_corrupt(domain_name, tmp_path)
    skips = Skips()
    records = list(iter_records(domain, [good[0], bad, good[-1]], skips))
    assert skips.count == 1 and skips.seen == 3
    assert str(bad) in skips.reasons[0] and "\n" not in skips.reasons[0]
    assert len(records) >= 2


def test_protein_reads_gzip_and_rejects_letters_outside_the_alphabet(tmp_path):
    domain = build_domain("protein")
    path = tmp_path / "x.fasta.gz"
    with gzip.open(path, "wt") as f:
        f.write(">a\nMKV*\n>b\nmkj1\n")
    a, b = list(domain.read(path))
    assert domain.decode(domain.encode(a))[0] == "MKV"
    with pytest.raises(ValueError, match="record b: letters outside the amino-acid alphabet: 1J"):
        domain.encode(b)


def test_code_samples_are_written_even_when_they_do_not_parse(tmp_path):
    domain, _ = fitted_domain("code")
    samples = ["def ok():\n    return 1\n", "def broken(:\n", "x = [1, 2\n", "print('hi')\n"]
    paths = domain.write(samples, tmp_path, {})
    assert len(paths) == 4 and [p.read_text() for p in paths] == samples
    report = (tmp_path / "syntax_report.tsv").read_text()
    assert "# 2 of 4 samples parse" in report
    assert domain.metrics(samples)["code/parse_rate"] == 0.5
    assert parses(samples[0]) and not parses(samples[1])


def test_music_prompt_must_be_a_midi_file(tmp_path):
    domain = build_domain("music")
    with pytest.raises(FileNotFoundError, match="must be a MIDI file"):
        domain.prompt_ids(str(tmp_path / "missing.mid"))
    ids = domain.prompt_ids(str(bundled_files("music", 1)[0]))
    assert ids[0] == domain.bos_id and len(ids) > 10


def test_music_constraint_samples_only_grammatical_successions():
    import torch

    from multiar.engine.decode import generate
    from multiar.engine.model import GPT, ModelConfig
    from multiar.engine.sampling import ban_tokens

    domain = build_domain("music")
    tok = domain.tokenizer
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=domain.vocab_size, block_size=256, n_layer=1, n_head=2, n_embd=32))
    prompt = torch.tensor([[domain.bos_id]] * 4)
    kw = dict(eos_id=domain.eos_id, generator=torch.Generator().manual_seed(0))
    banned = ban_tokens([domain.pad_id, domain.bos_id])

    def type_errors(row):
        kinds = [tok[i].split("_")[0] for i in row]
        graph = {k: {n.split("_")[0] for n in v} for k, v in tok.tokens_types_graph.items()}
        return sum(b not in graph.get(a, {b}) for a, b in zip(kinds, kinds[1:], strict=False))

    free = generate(model, prompt, 200, processors=[banned], **kw)
    constrained = generate(model, prompt, 200, processors=[banned, domain.constraint()], **kw)
    assert sum(map(type_errors, free)) > 50  # an untrained model breaks the grammar all the time
    assert sum(map(type_errors, constrained)) == 0
    assert sum(len(r) for r in constrained) > 100
    dropped_free = sum(domain.decode(r)[1] for r in free)
    dropped_constrained = sum(domain.decode(r)[1] for r in constrained)
    assert dropped_constrained < dropped_free / 4
