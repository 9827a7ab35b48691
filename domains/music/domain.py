"""Music: MIDI files through symusic, tokenized by a miditok tokenizer (REMI by default, optionally
with BPE learned on the training files), decoded to .mid files with a piano roll beside each."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from collections.abc import Iterable, Iterator, Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any

import miditok
from miditok.data_augmentation import augment_score_multiple_offsets
from miditok.utils import get_bars_ticks
from symusic import Score, Tempo, TextMeta, TimeSignature

from multiar.domain import Domain, DomainBase, GenerateOption, MetricSummary
from multiar.domains.music import analysis as music_analysis
from multiar.domains.music.grammar import MusicGrammar, ids_to_bytes
from multiar.engine.sampling import LogitsProcessor
from multiar.files import safe_child, write_new_file

SPECIALS = ("PAD_None", "BOS_None", "EOS_None")
CORPORA = {"chorales": "bach_chorales", "pop909": "pop909"}


def _tokenizer_config(settings: dict[str, Any]) -> miditok.TokenizerConfig:
    settings = dict(settings)
    if "beat_res" in settings:
        # YAML has no tuple keys: "0_4: 8" means beats 0 to 4 at 8 samples per beat
        settings["beat_res"] = {tuple(map(int, k.split("_"))): v for k, v in settings["beat_res"].items()}
    if "pitch_range" in settings:
        settings["pitch_range"] = tuple(settings["pitch_range"])
    settings.setdefault("special_tokens", list(SPECIALS))
    settings.setdefault("use_programs", True)  # one token stream for all tracks
    return miditok.TokenizerConfig(**settings)


class MusicDomain(DomainBase):
    name = "music"
    suffixes = (".mid", ".midi")
    unit = "note"
    tokenizer_files = ("tokenizer.json",)  # miditok's parameters and BPE merges decide the ids
    generate_options = {
        "prompt_bars": GenerateOption(
            int, None, "continue only the prompt's first N bars (cut at a bar line)", minimum=1
        )
    }

    def __init__(
        self,
        tokenization: str = "REMI",
        tokenizer_config: dict[str, Any] | None = None,
        tokenizer: miditok.MusicTokenizer | None = None,
        bpe_vocab_size: int | None = None,
        train_stats: dict | None = None,
    ) -> None:
        if tokenizer is None:
            if not hasattr(miditok, tokenization):
                raise ValueError(f"unknown miditok tokenization {tokenization!r}")
            tokenizer = getattr(miditok, tokenization)(_tokenizer_config(tokenizer_config or {}))
        if not tokenizer.one_token_stream:
            raise ValueError("the music domain needs one token stream: set use_programs=true")
        if bpe_vocab_size is not None and bpe_vocab_size <= tokenizer.vocab_size and not tokenizer.is_trained:
            raise ValueError(
                f"bpe_vocab_size={bpe_vocab_size} must exceed the base vocabulary ({tokenizer.vocab_size})"
            )
        self.tokenizer = tokenizer
        self.bpe_vocab_size = bpe_vocab_size
        self.train_stats = train_stats or {}  # music_analysis.summarize of the training pieces
        self._grammar: MusicGrammar | None = None
        self._set_vocab()

    def _set_vocab(self) -> None:
        self.vocab_size = len(self.tokenizer)  # with BPE: the learned vocabulary
        self.pad_id, self.bos_id, self.eos_id = (self.tokenizer[s] for s in SPECIALS)
        self.special_ids = {self.tokenizer[s] for s in self.tokenizer.special_tokens}
        self._grammar = None

    def default_paths(self, corpus: str | None = None) -> list[Path]:
        folder = CORPORA.get(corpus or "chorales")
        if folder is None:
            raise ValueError(
                f"unknown corpus {corpus!r}: the {self.name} domain bundles {', '.join(CORPORA)}"
            )
        return [Path(str(files("multiar.domains.music") / "assets" / folder))]

    def read(self, path: Path) -> Iterator[Score]:
        yield self._score(path.read_bytes())

    def from_value(self, value: Any, key: str) -> Score:
        if isinstance(value, dict) and "bytes" in value:  # datasets' binary feature dicts
            value = value["bytes"]
        if isinstance(value, str):  # a path to a MIDI file
            return self._score(Path(value).expanduser().read_bytes())
        if not isinstance(value, (bytes, bytearray)):
            raise ValueError(f"{key}: expected MIDI bytes or a path, got {type(value).__name__}")
        return self._score(bytes(value))

    @staticmethod
    def _score(data: bytes) -> Score:
        if not data:
            raise ValueError("empty file")
        try:
            score = Score.from_midi(data)
        except (RuntimeError, ValueError, IndexError) as err:  # symusic's parser: RuntimeError
            raise ValueError(f"not a readable MIDI file ({str(err).strip().splitlines()[0]})") from err
        if score.note_num() == 0:
            raise ValueError("no notes")
        return score

    def content(self, record: Score) -> bytes:
        return bytes(record.dumps_midi())

    def units(self, record: Score) -> int:
        return int(record.note_num())

    def fit(self, records: Iterable[Score]) -> None:
        """The training pieces' statistics (generated sets are compared with them), and, with
        bpe_vocab_size, miditok's BPE learned on them (bar by bar, miditok's default split)."""
        scores = list(records)
        # measured on what the tokens keep (quantized times, the time signatures the tokens carry), as
        # generated pieces are: a dataset's stray time signatures cannot make the two differ
        self.train_stats = music_analysis.summarize(list(self._as_tokens_keep(scores)))
        if self.bpe_vocab_size and not self.tokenizer.is_trained:
            self.tokenizer.train(
                vocab_size=self.bpe_vocab_size, model="BPE", iterator=ScoreIterator(self.tokenizer, scores)
            )
            self._set_vocab()

    def _as_tokens_keep(self, scores: list[Score]) -> Iterator[Score]:
        for score in scores:
            try:
                yield self.tokenizer.decode(self.tokenizer.encode(score))
            except Exception:  # noqa: BLE001 - a piece the tokenizer cannot take is skipped when encoded
                continue

    def encode(self, record: Score) -> list[int]:
        ids = self.tokenizer.encode(record).ids  # BPE ids once trained
        if not ids:
            raise ValueError("no tokens after miditok preprocessing")
        return ids

    @property
    def window_starts(self) -> list[bool]:
        """Per id: whether a training window or a cut prompt may start there (a bar's first token)."""
        return self.grammar.bar_first.tolist()

    @staticmethod
    def check_augment(spec: Any) -> None:
        """ValueError in one line unless spec maps pitch/velocity/duration to lists of offsets."""
        if not isinstance(spec, dict):
            raise ValueError(
                f"data.augment: expected {{pitch: [...], velocity: [...], duration: [...]}}, got {spec!r}"
            )
        unknown = set(spec) - {"pitch", "velocity", "duration"}
        if unknown:
            raise ValueError(f"data.augment: unknown key(s) {sorted(unknown)}: use pitch, velocity, duration")
        for key, offsets in spec.items():
            if not isinstance(offsets, list) or not all(isinstance(o, (int, float)) for o in offsets):
                raise ValueError(f"data.augment.{key}: expected a list of offsets, got {offsets!r}")

    def augment(self, record: Score, spec: dict[str, Any]) -> list[tuple[str, Score]]:
        """Shifted copies of a training piece (data.augment: pitch, velocity, duration offsets, by
        miditok's augment_score_multiple_offsets; each offset on its own), named by their offsets."""
        self.check_augment(spec)
        copies = augment_score_multiple_offsets(
            record,
            pitch_offsets=list(spec.get("pitch") or []),  # offsets leaving the pitch range are left out
            velocity_offsets=list(spec.get("velocity") or []),
            duration_offsets=list(spec.get("duration") or []),  # beats; miditok turns them into ticks
        )
        return [("p{:+d}v{:+d}d{:+d}".format(*map(int, offsets)), copy) for offsets, copy in copies]

    def prompt_ids(self, prompt: str | None, prompt_bars: int | None = None) -> list[int]:
        """BOS + the prompt file's tokens; prompt_bars: only its first bars (cut at a bar line, so never
        inside a note)."""
        score = self._prompt_score(prompt, prompt_bars)
        return [self.bos_id] if score is None else [self.bos_id] + self.encode(score)

    def prompt_meta(self, prompt: str | None, prompt_bars: int | None = None) -> Score | None:
        """What a sample keeps from its prompt beyond the tokens: the prompt's tempos, and its time
        signatures where the tokens hold none (use_tempos / use_time_signatures off), as a Score
        without notes; None without a prompt."""
        score = self._prompt_score(prompt, prompt_bars)
        if score is None:
            return None
        meta = Score(score.tpq)
        if not self.tokenizer.config.use_tempos:
            meta.tempos = score.tempos
        if not self.tokenizer.config.use_time_signatures:
            meta.time_signatures = score.time_signatures
        return meta

    def with_prompt_meta(self, score: Score, meta: Score | None, whole: bool = True) -> Score:
        """A copy of a decoded sample with its prompt's meta (prompt_meta) in the tokenizer's ticks;
        whole=False (a file without the prompt): only the tempo and time signature the prompt ends in,
        from tick 0."""
        score = score.copy()
        if meta is None:
            return score
        scale = score.tpq / meta.tpq  # ticks: the prompt file's resolution -> the tokenizer's
        tempos, signatures = list(meta.tempos), list(meta.time_signatures)
        if not whole:
            tempos, signatures = tempos[-1:], signatures[-1:]
        at = (lambda t: round(t * scale)) if whole else (lambda t: 0)
        if tempos:
            score.tempos = [Tempo(at(t.time), t.qpm) for t in tempos]
        if signatures:
            score.time_signatures = [
                TimeSignature(at(t.time), t.numerator, t.denominator) for t in signatures
            ]
        return score

    def _prompt_score(self, prompt: str | None, bars: int | None) -> Score | None:
        """The prompt file's score, only its first bars when bars is given; None without a prompt."""
        if not prompt:
            return None
        path = Path(prompt).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{path}: music prompt must be a MIDI file")
        try:
            score = next(self.read(path))
        except (ValueError, RuntimeError) as err:
            raise ValueError(f"{path}: unreadable MIDI prompt: {err}") from err
        if bars is not None:
            ticks = get_bars_ticks(score)
            if bars < 1:
                raise ValueError(f"prompt_bars={bars}: must be at least 1")
            if bars < len(ticks):
                score = score.clip(0, ticks[bars])  # notes starting in the bars, whole
        return score

    def _sequence(self, ids: list[int]) -> miditok.TokSequence:
        seq = miditok.TokSequence(ids=list(ids), are_ids_encoded=self.tokenizer.is_trained)
        if self.tokenizer.is_trained:
            self.tokenizer.decode_token_ids(seq)  # BPE ids -> base ids
        self.tokenizer.complete_sequence(seq)
        return seq

    def token_errors(self, ids: list[int]) -> int:
        """How many of the ids miditok's tokens_errors counts as errors (specials left out)."""
        keep = [i for i in ids if i not in self.special_ids and 0 <= i < self.vocab_size]
        if not keep:
            return 0
        # tokens_errors: errors over base tokens, divided by the ids given (it decodes BPE ids itself)
        seq = miditok.TokSequence(ids=list(keep), are_ids_encoded=self.tokenizer.is_trained)
        return round(float(self.tokenizer.tokens_errors(seq)) * len(keep))

    def decode(self, ids: list[int]) -> tuple[Score, int]:
        keep = [i for i in ids if i not in self.special_ids and 0 <= i < self.vocab_size]
        if not keep:
            return Score(self.tokenizer.time_division), len(ids)
        # tokens that break miditok's rules are skipped by its decoder: they count as dropped
        errors = self.token_errors(keep)
        return self.tokenizer.decode(self._sequence(keep)), len(ids) - len(keep) + errors

    def write(
        self,
        artifacts: Sequence[Score],
        out_dir: Path,
        provenance: dict,
        overwrite: bool = False,
        start: int = 0,
    ) -> list[Path]:
        """sample_NNN.mid (with the run, seed and settings in a text meta event at tick 0) and
        sample_NNN.png, its piano roll. A continuation's prompt tempos are in the sample already
        (with_prompt_meta)."""
        paths = []
        note = "multiar " + " ".join(f"{k}={v}" for k, v in provenance.items())
        for i, score in enumerate(artifacts):
            score = score.copy()
            score.markers.append(TextMeta(0, note))
            name = f"sample_{start + i:03d}"
            paths.append(
                write_new_file(
                    safe_child(Path(out_dir), f"{name}.mid"),
                    lambda tmp, s=score: s.dump_midi(str(tmp)),
                    overwrite,
                )
            )
            paths.append(music_analysis.piano_roll(score, Path(out_dir) / f"{name}.png", name, overwrite))
        return paths

    def metrics(self, artifacts: Sequence[Score]) -> dict[str, float]:
        """Each statistic of music_analysis over the samples, and its distance to the training pieces'
        (in training standard deviations); the token error rate is reported by generate."""
        per_sample = [s.note_num() for s in artifacts]
        samples = music_analysis.summarize(artifacts)
        out = {
            "music/notes_per_sample": sum(per_sample) / max(len(per_sample), 1),
            "music/empty_rate": sum(n == 0 for n in per_sample) / max(len(per_sample), 1),
        }
        return out | statistics_metrics(samples, self.train_stats)

    def metric_summary(self) -> MusicSummary:
        return MusicSummary(self.train_stats)

    @property
    def grammar(self) -> MusicGrammar:
        if self._grammar is None:
            self._grammar = MusicGrammar(self.tokenizer, self.vocab_size, self.special_ids)
        return self._grammar

    def constraint(self) -> LogitsProcessor | None:
        """Only tokens that miditok's tokens_errors would not count: its type successions, no time
        going backwards, (MIDILike) no NoteOff without its note; per row, with BPE too."""
        return self.grammar.processor(self.eos_id)

    def render(self, midi: Path, out: Path, soundfont: str | None = None, overwrite: bool = False) -> Path:
        """A WAV of one .mid through the fluidsynth program and a General MIDI SoundFont."""
        return render_wav(midi, out, soundfont, overwrite)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(directory / "tokenizer.json")  # with BPE: the learned merges too
        (directory / "train_stats.json").write_text(json.dumps(self.train_stats, indent=1, sort_keys=True))

    @classmethod
    def load(cls, directory: Path) -> MusicDomain:
        path = directory / "tokenizer.json"
        tokenization = json.loads(path.read_text())["tokenization"]
        stats = directory / "train_stats.json"
        return cls(
            tokenizer=getattr(miditok, tokenization)(params=path),
            train_stats=json.loads(stats.read_text()) if stats.exists() else None,
        )


class ScoreIterator(miditok.TokTrainingIterator):
    """miditok's BPE training input from Score objects already read (the training split), instead of
    file paths: each piece's base tokens as byte strings, split per bar like miditok's own iterator."""

    def load_file(self, score: Score) -> list[str]:
        seq = self.tokenizer(
            self.tokenizer.preprocess_score(score.copy()), encode_ids=False, no_preprocess_score=True
        )
        bars = [s.ids for s in seq.split_per_bars() if len(s) > 0]
        return ids_to_bytes(self.tokenizer, bars)


# Debian's General MIDI SoundFonts: fluid-soundfont-gm (148 MB), timgm6mb-soundfont (6 MB, what .ci/run
# installs), and the alternative either registers
SOUNDFONTS = (
    "/usr/share/sounds/sf2/FluidR3_GM.sf2",
    "/usr/share/sounds/sf2/TimGM6mb.sf2",
    "/usr/share/sounds/sf2/default-GM.sf2",
)


def render_wav(midi: Path, out: Path, soundfont: str | None = None, overwrite: bool = False) -> Path:
    """Render with fluidsynth; RuntimeError in one line naming what is missing."""
    binary = shutil.which("fluidsynth")
    if binary is None:
        raise RuntimeError("render=wav needs the fluidsynth program (Debian: apt install fluidsynth)")
    font = soundfont or next((f for f in SOUNDFONTS if Path(f).is_file()), None)
    if font is None or not Path(font).is_file():
        raise RuntimeError(
            f"render=wav needs a General MIDI SoundFont ({font or SOUNDFONTS[0]} not found; Debian: apt install timgm6mb-soundfont or fluid-soundfont-gm, or soundfont=PATH)"
        )

    def synthesize(tmp: Path) -> None:
        command = [binary, "-ni", "-F", str(tmp), "-T", "wav", "-r", "44100", font, str(midi)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0 or not tmp.stat().st_size:
            reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"{midi}: fluidsynth failed: {reason}")

    write_new_file(out, synthesize, overwrite)
    return out


def statistics_metrics(samples: dict[str, dict[str, float]], train_stats: dict | None) -> dict[str, float]:
    """Each statistic's mean over the samples and, given the training pieces', its distance to them."""
    out = {f"music/{k}": v["mean"] for k, v in samples.items()}
    if train_stats:
        far = music_analysis.distances(samples, train_stats)
        out |= {f"music/{k}_train": v["mean"] for k, v in train_stats.items()}
        out |= {f"music/{k}_distance": v for k, v in far.items()}
        known = [v for v in far.values() if not math.isnan(v)]
        out["music/distance_mean"] = sum(known) / len(known) if known else math.nan
    return out


class MusicSummary(MetricSummary):
    """The music metrics of any number of samples from sums: notes, empty pieces, and per statistic the
    sum and count over the pieces that have it (their mean is what summarize gives)."""

    def __init__(self, train_stats: dict | None) -> None:
        super().__init__()
        self.train_stats = train_stats
        self.notes = self.empty = 0
        self.stat_sums = dict.fromkeys(music_analysis.STATS, 0.0)
        self.stat_counts = dict.fromkeys(music_analysis.STATS, 0)

    def add(self, domain: Domain, artifacts: Sequence[Score], details: Sequence[dict]) -> None:
        self.count += len(artifacts)
        for score in artifacts:
            self.notes += score.note_num()
            self.empty += score.note_num() == 0
            for key, value in music_analysis.piece_stats(score).items():
                if key in self.stat_sums and not math.isnan(value):
                    self.stat_sums[key] += value
                    self.stat_counts[key] += 1

    def metrics(self, domain: Domain) -> dict[str, float]:
        n = max(self.count, 1)
        means = {k: self.stat_sums[k] / c if (c := self.stat_counts[k]) else math.nan for k in self.stat_sums}
        out = {"music/notes_per_sample": self.notes / n, "music/empty_rate": self.empty / n}
        return out | statistics_metrics({k: {"mean": v} for k, v in means.items()}, self.train_stats)
