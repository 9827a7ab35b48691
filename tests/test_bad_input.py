"""Bad input, fed on purpose: every bad file is skipped with one line naming it and counted, never fatal
(unless every file is bad, or data.strict=true); the readers, decoders and config composition are
fuzzed with hypothesis and raise nothing but their documented errors."""

from __future__ import annotations

import contextlib
import gzip
import logging
import shutil
import zlib
from pathlib import Path

import pytest
from conftest import bundled_files, fitted_domain
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from symusic import Score, Track

from multiar.config import load_config
from multiar.data.corpus import prepare_corpus
from multiar.data.source import iter_records
from multiar.domains import DOMAINS, build_domain
from multiar.errors import ConfigError
from multiar.files import Skips

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def corpus(name, tmp_path, folder, settings_=None, **kw):
    settings_ = settings_ or {}
    return prepare_corpus(
        build_domain(name, settings_), settings_, [str(folder)], cache_dir=tmp_path / "cache", **kw
    )


def skipped_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "skipped:" in r.getMessage()]


def test_bad_midi_files_are_skipped_named_and_counted(tmp_path, caplog):
    folder = tmp_path / "midi"
    folder.mkdir()
    good = bundled_files("music", 4)
    for f in good:
        shutil.copy(f, folder)
    data = good[0].read_bytes()
    (folder / "truncated.mid").write_bytes(data[: len(data) // 2])
    (folder / "random.mid").write_bytes(bytes(range(256)) * 3)
    (folder / "empty.mid").write_bytes(b"")
    no_notes = Score(480)
    no_notes.tracks.append(Track(program=0))
    (folder / "no_notes.mid").write_bytes(bytes(no_notes.dumps_midi()))
    with caplog.at_level(logging.WARNING, logger="multiar"):
        c = corpus("music", tmp_path, folder)
    assert c.stats["files"] == 8 and c.stats["files_skipped"] == 4
    assert len(c.train) + len(c.val) == 4
    lines = skipped_lines(caplog)
    for name in ("truncated.mid", "random.mid", "empty.mid", "no_notes.mid"):
        assert sum(name in line for line in lines) == 1  # one line per bad file, naming it
    assert all("\n" not in line for line in lines)
    assert any("no notes" in line for line in lines) and any("empty file" in line for line in lines)


def write_fasta_gz(path: Path, n: int) -> bytes:
    aa = "ACDEFGHIKLMNPQRSTVWY"
    text = "".join(f">p{i}\nMKT{aa[i % 20] * 10}{aa[i // 20 % 20] * 10}\n" for i in range(n))  # all distinct
    data = gzip.compress(text.encode())
    path.write_bytes(data)
    return data


def test_bad_fasta_files_are_skipped_named_and_counted(tmp_path, caplog):
    folder = tmp_path / "fa"
    folder.mkdir()
    write_fasta_gz(folder / "good.fasta.gz", 30)
    data = write_fasta_gz(tmp_path / "x.fasta.gz", 400)
    (folder / "cut.fasta.gz").write_bytes(data[: len(data) // 2])  # the gzip stream ends early
    corrupt = bytearray(data)
    corrupt[len(data) // 2 : len(data) // 2 + 40] = bytes(40)
    (folder / "corrupt.fasta.gz").write_bytes(bytes(corrupt))  # zlib.error before this fix
    (folder / "no_records.fasta").write_text("just some text\nwith no header\n")
    (folder / "mixed.fasta").write_text(">ok1\nmktayiak\n>empty\n\n>bad\nMKT123J\n>ok2\r\nMKTAY\r\nIAKQR\r\n")
    with caplog.at_level(logging.WARNING, logger="multiar"):
        c = corpus("protein", tmp_path, folder)
    assert c.stats["files"] == 5 and c.stats["files_skipped"] == 3
    lines = skipped_lines(caplog)
    for name in ("cut.fasta.gz", "corrupt.fasta.gz", "no_records.fasta"):
        assert sum(name in line for line in lines) == 1
    # a cut file gives no documents at all, not the records before the cut
    keys = list(c.train["key"]) + list(c.val["key"])
    assert not any(k.startswith("cut.") for k in keys)
    # in mixed.fasta: lower case is read as upper case, CRLF line ends as LF, the empty record and the
    # record with invalid letters are skipped and counted
    assert c.stats["records_skipped"] == 2
    d = c.domain
    docs = dict(zip(keys, list(c.train["ids"]) + list(c.val["ids"]), strict=True))
    assert docs["mixed.fasta#0"] == [d.stoi[a] for a in "MKTAYIAK"]
    assert docs["mixed.fasta#3"] == [d.stoi[a] for a in "MKTAYIAKQR"]


def test_bad_code_files_are_skipped_named_and_counted(tmp_path, caplog):
    folder = tmp_path / "src"
    folder.mkdir()
    for i in range(6):
        (folder / f"ok{i}.py").write_text(f"def f{i}(x):\n    return x * {i}\n" * 5)
    (folder / "latin1.py").write_bytes("s = 'café'\n".encode("latin-1"))
    (folder / "nul.py").write_bytes(b"x = 1\x00\n")
    with open(folder / "huge.py", "wb") as f:  # 50 MB
        f.write(b"x = 1\n" * (50 * 1024 * 1024 // 6))
    with caplog.at_level(logging.WARNING, logger="multiar"):
        c = corpus("code", tmp_path, folder, {"vocab_size": 300})
    assert c.stats["files"] == 9 and c.stats["files_skipped"] == 3
    lines = skipped_lines(caplog)
    assert any("latin1.py" in line and "not UTF-8" in line for line in lines)
    assert any("nul.py" in line and "NUL" in line for line in lines)
    assert any("huge.py" in line and "max_file_bytes" in line for line in lines)


def test_every_file_bad_is_a_clear_error_and_strict_stops_at_the_first(tmp_path):
    folder = tmp_path / "midi"
    folder.mkdir()
    for i in range(3):
        (folder / f"bad{i}.mid").write_bytes(b"not midi at all")
    with pytest.raises(ValueError, match=r"every one of the 3 input files is unreadable; first: .*bad0\.mid"):
        corpus("music", tmp_path, folder)
    for f in bundled_files("music", 3):
        shutil.copy(f, folder)
    assert corpus("music", tmp_path, folder).stats["files_skipped"] == 3
    with pytest.raises(ValueError, match=r"bad0\.mid: .*data\.strict=true"):
        corpus("music", tmp_path / "strict", folder, strict=True)


def test_a_file_failing_half_way_costs_no_documents_of_the_others(tmp_path):
    folder = tmp_path / "fa"
    folder.mkdir()
    data = write_fasta_gz(tmp_path / "x.fasta.gz", 400)
    (folder / "a_cut.fasta.gz").write_bytes(data[: len(data) // 2])  # first in sorted order
    write_fasta_gz(folder / "b_good.fasta.gz", 50)
    c = corpus("protein", tmp_path, folder, max_documents=40)
    keys = list(c.train["key"]) + list(c.val["key"])
    # before: the cut file's first records took max_documents slots and were then dropped: fewer docs
    assert len(keys) == 40 and all(k.startswith("b_good") for k in keys)
    assert len(c.val) >= 1


def test_exact_duplicate_documents_are_removed_once_before_the_split(tmp_path):
    chorales = Path(bundled_files("music", 1)[0]).parent
    a, b = chorales / "bwv69_6.mid", chorales / "bwv69_6-a.mid"
    assert a.read_bytes() == b.read_bytes()  # bundled twice, byte for byte
    folder = tmp_path / "midi"
    folder.mkdir()
    for f in [a, b, *bundled_files("music", 6)]:
        shutil.copy(f, folder)
    c = corpus("music", tmp_path, folder)
    keys = list(c.train["key"]) + list(c.val["key"])
    assert c.stats["duplicates_removed"] == 1
    assert sum(k.startswith("bwv69_6") for k in keys) == 1
    fa = tmp_path / "dup.fasta"
    fa.write_text(">a\nMKTAYIAK\n>b\nmktayiak\n>c\nMKTW\n>d\nMKTV\n")  # b repeats a (case aside)
    p = corpus("protein", tmp_path, fa)
    assert p.stats["duplicates_removed"] == 1 and len(p.train) + len(p.val) == 3


SUFFIX = {"music": ".mid", "code": ".py", "protein": ".fasta", "image": ".png"}


@pytest.mark.parametrize("name", sorted(DOMAINS))
def test_fuzz_readers_raise_only_documented_errors(name, tmp_path):
    domain = build_domain(name)
    seeds = [b"", b"MThd\x00\x00\x00\x06\x00\x01\x00\x01\x01\xe0MTrk", b">x\nMKT\n", b"\x1f\x8b\x08\x00"]
    seeds.append(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")  # a PNG header, then anything

    @FUZZ
    @given(
        data=st.one_of(
            st.binary(max_size=400), st.sampled_from(seeds).flatmap(lambda s: st.binary().map(s.__add__))
        )
    )
    def check(data):
        for suffix in (SUFFIX[name], ".fasta.gz") if name == "protein" else (SUFFIX[name],):
            path = tmp_path / f"fuzz{suffix}"
            path.write_bytes(data)
            with contextlib.suppress(ValueError, OSError):  # the documented errors: skipped and counted
                list(domain.read(path))

    check()


@pytest.mark.parametrize("name", sorted(DOMAINS))
def test_fuzz_decode_never_raises(name):
    domain, _ = fitted_domain(name, k=10)

    @FUZZ
    @given(ids=st.lists(st.integers(min_value=-5, max_value=domain.vocab_size + 5), max_size=300))
    def check(ids):
        artifact, dropped = domain.decode(ids)
        assert 0 <= dropped <= len(ids)

    check()


@FUZZ
@given(overrides=st.lists(st.text(max_size=30), max_size=3))
def test_fuzz_config_overrides_raise_only_config_errors(overrides):
    for command in ("generate", "train"):
        try:
            load_config(command, ["run=r", *overrides] if command == "generate" else overrides)
        except ConfigError as err:
            assert str(err) and "\n" not in str(err).strip()


def test_zlib_errors_in_a_reader_are_skipped_not_fatal(tmp_path, monkeypatch):
    # any library error from one file (here a raw zlib.error, as gzip raised before) is that file's
    domain = build_domain("protein")
    good = tmp_path / "good.fasta"
    good.write_text(">a\nMKT\n")
    real_read = domain.read

    def read(path):
        if path.name == "boom.fasta":
            raise zlib.error("Error -3 while decompressing data: invalid distance too far back")
        return real_read(path)

    (tmp_path / "boom.fasta").write_text(">b\nMKT\n")
    monkeypatch.setattr(domain, "read", read)
    skips = Skips()
    keys = [k for k, _ in iter_records(domain, [tmp_path / "boom.fasta", good], skips)]
    assert keys == ["good.fasta#0"] and skips.count == 1 and "Error -3" in skips.reasons[0]


def test_an_encoder_error_of_any_type_is_skipped_and_counted(tmp_path, monkeypatch):
    from multiar.domains.music.domain import MusicDomain

    real = MusicDomain.encode
    calls = {"n": 0}

    def flaky(self, record):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyError("miditok choked on this one")  # not a ValueError
        return real(self, record)

    monkeypatch.setattr(MusicDomain, "encode", flaky)
    c = corpus("music", tmp_path, Path(bundled_files("music", 1)[0]).parent, max_documents=8)
    assert c.stats["records_skipped"] == 1 and len(c.train) + len(c.val) == 7
