"""Music in depth: every one-stream tokenization, BPE, a grammar that makes no token errors (by
miditok's own count), bar-aligned windows, augmentation, continuation, files and statistics."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import mido
import numpy as np
import pytest
import torch
from conftest import TINY, bundled_files
from symusic import Note, Score, Tempo, TimeSignature, Track

from multiar.cli import domain_option_shorthand
from multiar.commands.generate import domain_options, fit_prompt, sample_to_files
from multiar.config import load_config
from multiar.data.corpus import prepare_corpus
from multiar.data.packing import pack
from multiar.domains import build_domain, load_domain
from multiar.domains.music.analysis import estimate_key, piano_roll, piece_stats
from multiar.domains.music.domain import MusicDomain
from multiar.engine.decode import generate
from multiar.engine.model import GPT, ModelConfig
from multiar.engine.sampling import ban_tokens
from multiar.errors import ConfigError
from multiar.training.run import train

TOKENIZATIONS = ["REMI", "TSD", "MIDILike", "Structured"]


def music_domain(tokenization: str = "REMI", bpe: int | None = None, k: int = 40) -> tuple[MusicDomain, list]:
    config = {
        "use_programs": True,
        "use_time_signatures": tokenization != "Structured",
    }  # Structured: 4/4 only
    domain = MusicDomain(tokenization, config, bpe_vocab_size=bpe)
    records = [next(domain.read(f)) for f in bundled_files("music", k)]
    domain.fit(records)
    return domain, records


def notes(score: Score) -> list[tuple]:
    tpq = score.ticks_per_quarter
    return sorted((n.time / tpq, n.pitch, n.duration / tpq) for t in score.tracks for n in t.notes)


@pytest.mark.parametrize("tokenization", TOKENIZATIONS)
def test_each_tokenization_round_trips_the_chorales(tokenization):
    domain, records = music_domain(tokenization, k=12)
    for record in records:
        decoded, dropped = domain.decode(domain.encode(record))
        assert dropped == 0
        want = notes(domain.tokenizer.preprocess_score(record.copy()))
        if tokenization == "MIDILike":  # NoteOff pairs with the earliest sounding note of its pitch: two
            # overlapping notes of one pitch swap durations, so compare onsets and pitches
            decoded_notes, want = [n[:2] for n in notes(decoded)], [n[:2] for n in want]
        else:
            decoded_notes = notes(decoded)
        assert decoded_notes == want


def test_bpe_is_learned_on_training_pieces_saved_and_reloaded(tmp_path):
    base, records = music_domain("REMI")
    domain, _ = music_domain("REMI", bpe=700)
    assert domain.vocab_size == 700 and domain.tokenizer.is_trained
    ids = domain.encode(records[0])
    assert len(ids) < len(base.encode(records[0])) / 2  # BPE shortens a chorale more than twice
    assert max(ids) >= base.vocab_size  # learned tokens are used
    domain.save(tmp_path)
    again = load_domain("music", tmp_path)
    assert again.vocab_size == 700 and again.encode(records[0]) == ids
    assert (
        notes(again.decode(ids)[0])
        == notes(domain.decode(ids)[0])
        == notes(base.decode(base.encode(records[0]))[0])
    )
    with pytest.raises(ValueError, match="must exceed the base vocabulary"):
        MusicDomain(bpe_vocab_size=100)


@pytest.mark.parametrize("bpe", [None, 800])
def test_random_ids_decode_without_raising(bpe):
    domain, _ = music_domain("REMI", bpe=bpe, k=20)
    rng = random.Random(0)
    for _ in range(30):
        ids = [rng.randrange(-3, domain.vocab_size + 5) for _ in range(rng.randrange(0, 200))]
        score, dropped = domain.decode(ids)
        assert isinstance(score, Score) and 0 <= dropped <= len(ids)


@pytest.mark.parametrize(
    ("tokenization", "bpe"), [("REMI", None), ("REMI", 800), ("TSD", 800), ("MIDILike", None)]
)
def test_constraint_allows_exactly_the_tokens_miditok_counts_no_error_for(tokenization, bpe):
    """For prefixes of real pieces and of sampled rows: a token is allowed iff appending it leaves
    miditok's tokens_errors count unchanged (MIDILike: its end-of-piece count of unfinished notes set
    aside, which no next token but a NoteOff changes)."""
    domain, records = music_domain(tokenization, bpe=bpe, k=20)
    grammar = domain.grammar
    ids = domain.encode(records[3])
    rng = random.Random(1)
    candidates = [i for i in range(domain.vocab_size) if i not in domain.special_ids]
    for cut in (1, 7, rng.randrange(10, len(ids) - 1), rng.randrange(10, len(ids) - 1)):
        prefix = ids[:cut]
        base = domain.token_errors(prefix)
        allowed = grammar.allowed(grammar.state(prefix), domain.eos_id)
        for v in rng.sample(candidates, min(250, len(candidates))):
            after = domain.token_errors(prefix + [v])
            if grammar.midi_like:  # the unfinished-notes count moves by the notes v starts or ends
                state = grammar.state(prefix + [v])
                after -= len(state.active) - len(grammar.state(prefix).active)
            assert bool(allowed[v]) == (after == base), (cut, domain.tokenizer[v] if not bpe else v)


# with a BPE vocabulary: 23 s on 2 cores, slow tier; the plain vocabulary runs by default
@pytest.mark.parametrize("bpe", [None, pytest.param(800, marks=pytest.mark.slow)])
def test_sampling_under_the_constraint_makes_no_token_errors(bpe):
    """>= 100 samples from an untrained and from a (briefly) trained model: 0 errors by miditok's
    tokens_errors; without the constraint the same models make many."""
    domain, records = music_domain("REMI", bpe=bpe)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=domain.vocab_size, block_size=128, n_layer=1, n_head=2, n_embd=32))
    banned = ban_tokens([domain.pad_id, domain.bos_id])
    for trained in (False, True):
        if trained:  # 60 steps on real pieces: the model now writes music-like successions
            data = [[domain.bos_id, *domain.encode(r), domain.eos_id] for r in records]
            stream = torch.tensor([i for d in data for i in d])
            opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
            for _ in range(60):
                starts = torch.randint(0, len(stream) - 129, (16,))
                batch = torch.stack([stream[s : s + 129] for s in starts])
                loss = torch.nn.functional.cross_entropy(
                    model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten()
                )
                opt.zero_grad()
                loss.backward()
                opt.step()
        kw = dict(eos_id=domain.eos_id, min_new_tokens=20)
        prompt = [[domain.bos_id]] * 100
        out = generate(
            model,
            prompts=prompt,
            max_new_tokens=120,
            processors=[banned, domain.constraint()],
            generator=torch.Generator().manual_seed(1),
            **kw,
        )
        free = generate(
            model,
            prompts=prompt,
            max_new_tokens=120,
            processors=[banned],
            generator=torch.Generator().manual_seed(1),
            **kw,
        )
        assert len(out) == 100 and sum(map(len, out)) > 2000
        assert sum(domain.token_errors(r) for r in out) == 0
        assert sum(domain.token_errors(r) for r in free) > 50
        assert sum(domain.decode(r)[0].note_num() for r in out) > 200


def test_windows_start_at_bar_lines_and_cover_every_token():
    domain, records = music_domain("REMI", k=10)
    docs = [domain.encode(r) for r in records]
    starts = [i for i, ok in enumerate(domain.window_starts) if ok]
    blocks = pack({"ids": docs}, 128, domain.bos_id, domain.eos_id, domain.pad_id, window_starts=starts)[
        "block"
    ]
    stream = [i for d in docs for i in (domain.bos_id, *d, domain.eos_id)]
    firsts = set(starts) | {domain.bos_id}
    covered, at, before = set(), 0, None
    for b in blocks:  # find each window in the stream: windows advance, overlap, and cover it all
        real = [i for i in b if i != domain.pad_id]
        at = next(
            s for s in range(at + (before is not None), len(stream)) if stream[s : s + len(real)] == real
        )
        if before is not None and any(i in firsts for i in stream[before + 1 : before + 129]):
            assert b[0] in firsts  # a window never begins inside a note, unless a bar outgrows a block
        covered.update(range(at + 1, at + len(real)))
        before = at
    assert covered == set(range(1, len(stream)))
    assert len(blocks) < 1.6 * len(stream) / 128
    assert sum(b[0] in firsts for b in blocks) > 0.8 * len(blocks)


def test_a_long_prompt_is_cut_at_a_bar_line_to_a_window_the_packer_could_produce():
    domain, records = music_domain("REMI", k=3)
    prompt = [domain.bos_id, *domain.encode(records[0])]
    cut = fit_prompt(prompt, 256, 64, domain.window_starts)
    assert domain.bos_id not in cut and domain.tokenizer[cut[0]] == "Bar_None"
    assert 64 < len(cut) <= 256 - 64 and cut == prompt[-len(cut) :]
    # training windows after a piece's first start at a bar line, without BOS: with a piece of the
    # right length before it, the packer starts one exactly where the cut prompt does
    starts = [i for i, ok in enumerate(domain.window_starts) if ok]
    bar = starts[0]
    found = any(
        b[: len(cut)] == cut
        for f in range(256)
        for b in pack({"ids": [[bar] * f, prompt[1:]]}, 256, domain.bos_id, domain.eos_id, domain.pad_id,
                      window_starts=starts)["block"]
    )  # fmt: skip
    assert found
    with pytest.raises(ValueError, match="no bar line in its last 64 tokens"):
        fit_prompt(prompt, 128, 64, domain.window_starts)  # a chorale's bar is longer than 64 tokens


def test_statistics_of_a_hand_made_piece():
    score = Score(4)  # 4 ticks per quarter: one tick is a 16th note, a 4/4 bar is 16 ticks
    score.time_signatures.append(TimeSignature(0, 4, 4))
    track = Track(program=0)
    for time, duration, pitch in [(0, 8, 60), (0, 4, 64), (4, 4, 67), (8, 1, 73), (32, 2, 62)]:
        track.notes.append(Note(time, duration, pitch, 80))
    score.tracks.append(track)
    stats = piece_stats(score)
    assert estimate_key(np.array([(0, 8, 60), (0, 4, 64), (4, 8, 67), (8, 9, 73), (32, 34, 62)])) == (0, True)
    assert stats["notes_per_bar"] == pytest.approx(5 / 3)  # 5 notes, bars at ticks 0, 16, 32
    assert stats["polyphony"] == pytest.approx((2 + 2 + 1 + 1) / 4)  # sounding at onsets 0, 4, 8, 32
    assert stats["pitch_range"] == 13
    assert stats["pitch_class_entropy"] == pytest.approx(np.log2(5))  # five pitch classes, once each
    assert stats["in_scale_ratio"] == pytest.approx(4 / 5)  # C major: C# is the one outside
    assert stats["empty_bar_ratio"] == pytest.approx(1 / 3)
    assert stats["groove_consistency"] == pytest.approx(((1 - 3 / 16) + (1 - 1 / 16)) / 2)


def test_piano_roll_is_a_real_picture(tmp_path):
    from PIL import Image

    record = next(build_domain("music").read(bundled_files("music", 1)[0]))
    path = piano_roll(record, tmp_path / "roll.png", "a chorale")
    pixels = np.asarray(Image.open(path).convert("L"), dtype=float)
    assert pixels.shape[1] > 500 and pixels.std() > 10  # not blank
    with pytest.raises(FileExistsError):
        piano_roll(record, path)


@pytest.fixture(scope="module")
def music_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("musicrun")
    data = tmp / "midi" / "chorales"
    data.mkdir(parents=True)
    for f in bundled_files("music", 24):  # a folder of MIDI files as the input
        (data / f.name).write_bytes(f.read_bytes())
    overrides = [
        *TINY,
        "domain=music",
        f"data.paths=[{tmp / 'midi'}]",
        f"run_dir={tmp / 'run'}",
        "trainer.max_steps=20",
        "trainer.val_check_interval=20",
        "data.val_fraction=0.2",
        "domain.settings.bpe_vocab_size=600",
        "data.augment={pitch: [-2, 3]}",
        "model.block_size=128",
    ]
    train(load_config("train", overrides))
    return tmp / "run"


def test_training_learns_bpe_augments_training_pieces_only_and_stores_statistics(music_run):
    stats = json.loads((music_run / "domain" / "train_stats.json").read_text())
    assert stats["notes_per_bar"]["pieces"] > 10 and stats["notes_per_bar"]["mean"] > 1
    domain = load_domain("music", music_run / "domain")
    assert domain.vocab_size == 600 and domain.tokenizer.is_trained
    corpus = prepare_corpus(
        build_domain("music", {"bpe_vocab_size": 600}),
        {"bpe_vocab_size": 600},
        [str(music_run.parent / "midi")],
        cache_dir=music_run.parent / "cache",
        val_fraction=0.2,
        augment={"pitch": [-2, 3]},
    )
    keys_train, keys_val = corpus.train["key"], corpus.val["key"]
    assert not any("@" in k for k in keys_val)  # validation is never augmented
    originals = [k for k in keys_train if "@" not in k]
    assert corpus.stats["augmented_copies"] == len(keys_train) - len(originals) > len(originals)
    assert {k.split("@")[1] for k in keys_train if "@" in k} <= {"p-2v+0d+0", "p+3v+0d+0"}


def test_continuation_keeps_the_prompt_its_tempo_and_writes_files_a_musician_can_use(music_run, tmp_path):
    source = next(build_domain("music").read(bundled_files("music", 30)[-1]))
    source.tempos = [Tempo(0, 72.0)]
    prompt = tmp_path / "prompt.mid"
    source.dump_midi(str(prompt))
    out = tmp_path / "out"
    report = sample_to_files(
        load_config(
            "generate",
            [
                f"run={music_run}",
                f"out={out}",
                "n=3",
                "max_new_tokens=60",
                f"prompt={prompt}",
                "options.prompt_bars=2",
                "dtype=fp32",
            ],
        )
    )
    assert report["metrics"]["music/token_error_rate"] == 0
    assert report["metrics"]["music/notes_per_bar_train"] > 1 and "music/distance_mean" in report["metrics"]
    domain = load_domain("music", music_run / "domain")
    two_bars = source.clip(0, 2 * 4 * source.tpq)
    want = notes(domain.tokenizer.decode(domain.tokenizer.encode(two_bars)))
    for i in range(3):
        written = Score(str(out / f"sample_{i:03d}.mid"))
        assert not Counter(want) - Counter(notes(written))  # the prompt's first two bars ...
        assert written.note_num() > len(want)  # ... and the continuation
        assert [round(t.qpm) for t in written.tempos] == [72]
        assert written.time_signatures[0].numerator == source.time_signatures[0].numerator
        text = [m.text for m in written.markers]
        assert any("multiar run=" in t and "seed=1" in t and "prompt_bars=2" in t for t in text)
        meta = [m for track in mido.MidiFile(out / f"sample_{i:03d}.mid").tracks for m in track if m.is_meta]
        assert any(
            m.type in ("text", "marker") and "multiar run=" in m.text for m in meta
        )  # mido reads it too
        assert (out / f"sample_{i:03d}.png").stat().st_size > 5000


def test_each_continuation_keeps_its_own_prompts_tempos_and_time_signature(music_run, tmp_path):
    files = bundled_files("music", 30)[-2:]
    lines = []
    for f, qpm, (num, den) in zip(files, (72.0, 150.0), ((3, 4), (4, 4)), strict=True):
        source = next(build_domain("music").read(f))
        source.tempos = [Tempo(0, qpm)]
        source.time_signatures = [TimeSignature(0, num, den)]
        source.dump_midi(str(tmp_path / f"{qpm:.0f}.mid"))
        lines.append(str(tmp_path / f"{qpm:.0f}.mid"))
    (tmp_path / "prompts.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    overrides = [f"run={music_run}", f"out={out}", "n=2", "max_new_tokens=30",
                 f"prompt_file={tmp_path / 'prompts.txt'}", "options.prompt_bars=2", "dtype=fp32"]  # fmt: skip
    sample_to_files(load_config("generate", overrides))
    for i, (qpm, numerator) in enumerate([(72, 3), (72, 3), (150, 4), (150, 4)]):
        midi = mido.MidiFile(out / f"sample_{i:03d}.mid")
        meta = [m for track in midi.tracks for m in track if m.is_meta]
        assert [round(mido.tempo2bpm(m.tempo)) for m in meta if m.type == "set_tempo"] == [qpm], i
        assert [m.numerator for m in meta if m.type == "time_signature"][:1] == [numerator], i


def test_time_signatures_the_tokens_do_not_hold_come_from_the_prompt(tmp_path):
    domain = MusicDomain("REMI", {"use_programs": True, "use_time_signatures": False})
    source = next(domain.read(bundled_files("music", 1)[0]))
    source.tempos = [Tempo(0, 72.0), Tempo(4 * source.tpq, 90.0)]
    source.time_signatures = [TimeSignature(0, 3, 4)]
    source.dump_midi(str(tmp_path / "p.mid"))
    meta = domain.prompt_meta(str(tmp_path / "p.mid"))
    sample = domain.decode(domain.prompt_ids(str(tmp_path / "p.mid"))[1:])[0]
    assert sample.time_signatures[0].numerator == 4  # what the tokens alone give
    whole = domain.with_prompt_meta(sample, meta)
    assert [(t.numerator, t.denominator) for t in whole.time_signatures] == [(3, 4)]
    assert [(t.time, round(t.qpm)) for t in whole.tempos] == [(0, 72), (4 * sample.tpq, 90)]
    alone = domain.with_prompt_meta(sample, meta, whole=False)  # a file without its prompt
    assert [(t.time, round(t.qpm)) for t in alone.tempos] == [(0, 90)]
    assert domain.prompt_meta(None) is None and domain.with_prompt_meta(sample, None).tempos == sample.tempos


def test_filters_on_a_domain_without_filters_are_refused_before_sampling(music_run, tmp_path):
    with pytest.raises(ConfigError, match="filters.min_entropy: the music domain has no sample filters"):
        sample_to_files(
            load_config("generate", [f"run={music_run}", f"out={tmp_path / 'o'}", "filters.min_entropy=2"])
        )
    assert not (tmp_path / "o").exists()


def test_render_names_what_is_missing_and_keeps_the_midi(music_run, tmp_path, monkeypatch, caplog):
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)
    out = tmp_path / "out"
    report = sample_to_files(
        load_config(
            "generate",
            [f"run={music_run}", f"out={out}", "n=1", "max_new_tokens=20", "render=wav", "dtype=fp32"],
        )
    )
    assert report["render"].startswith("skipped: render=wav needs the fluidsynth program")
    assert (out / "sample_000.mid").exists() and not (out / "sample_000.wav").exists()
    monkeypatch.undo()
    if shutil.which("fluidsynth") is None:
        return
    report = sample_to_files(
        load_config(
            "generate",
            [
                f"run={music_run}",
                f"out={tmp_path / 'wav'}",
                "n=1",
                "max_new_tokens=20",
                "render=wav",
                f"soundfont={tmp_path / 'none.sf2'}",
            ],
        )
    )
    assert "SoundFont" in report["render"] and str(tmp_path / "none.sf2") in report["render"]
    from multiar.domains.music.domain import SOUNDFONTS

    if any(Path(f).is_file() for f in SOUNDFONTS):  # both installed: a real WAV beside the MIDI file
        out = tmp_path / "real"
        report = sample_to_files(
            load_config(
                "generate",
                [f"run={music_run}", f"out={out}", "n=1", "max_new_tokens=40", "render=wav", "dtype=fp32"],
            )
        )
        assert report["render"] == "1 wav file(s)"
        wav = (out / "sample_000.wav").read_bytes()
        assert wav[:4] == b"RIFF" and len(wav) > 10_000


def test_music_options_elsewhere_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="options.prompt_bars: must be >= 1, got 0"):
        domain_options(load_config("generate", ["run=x", "options.prompt_bars=0"]), build_domain("music"))
    # the CLI reads a declared option as a top-level key; other commands' keys are left alone
    assert domain_option_shorthand("generate", ["prompt_bars=0", "n=2"]) == ["options.prompt_bars=0", "n=2"]
    assert domain_option_shorthand("train", ["prompt_bars=0"]) == ["prompt_bars=0"]
    with pytest.raises(ValueError, match="unknown corpus 'jazz'.*chorales, pop909"):
        build_domain("music").default_paths("jazz")
    pop = build_domain("music").default_paths("pop909")[0]
    assert len(list(pop.glob("*.mid"))) == 200 and (pop / "LICENSE.txt").exists()
    with pytest.raises(ValueError, match="unknown key"):
        build_domain("music").augment(Score(), {"transpose": [1]})


@pytest.mark.parametrize("bpe", [None, 800])
def test_speculative_decoding_under_the_stateful_grammar_equals_greedy(bpe):
    """Draft tokens the target rejects roll the per-row grammar state back: greedy speculative output
    (n-gram drafts, which are often wrong, and a model draft) is greedy output, token for token."""
    from multiar.engine.speculative import speculative_generate

    domain, records = music_domain("REMI", bpe=bpe, k=20)
    torch.manual_seed(0)
    target = GPT(ModelConfig(vocab_size=domain.vocab_size, block_size=256, n_layer=1, n_head=2, n_embd=32))
    draft = GPT(ModelConfig(vocab_size=domain.vocab_size, block_size=256, n_layer=1, n_head=2, n_embd=16))
    prompts = [[domain.bos_id, *domain.encode(r)[:40]] for r in records[:4]]
    kw = dict(temperature=0.0, eos_id=domain.eos_id)
    banned = ban_tokens([domain.pad_id, domain.bos_id])
    plain = generate(
        target, prompts=prompts, max_new_tokens=60, processors=[banned, domain.constraint()], **kw
    )
    for source in ("ngram", draft):
        fast, stats = speculative_generate(
            target, prompts, 60, draft=source, k=4, processors=[banned, domain.constraint()], **kw
        )
        assert fast == plain
        assert 0 < stats.as_dict()["acceptance_rate"] < 1  # drafts were accepted and rejected
        assert all(
            domain.token_errors(p[1:] + r) == domain.token_errors(p[1:])
            for p, r in zip(prompts, fast, strict=True)
        )
