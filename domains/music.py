"""Music: MIDI files through symusic, tokenized by a miditok tokenizer (REMI by default)."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any

import miditok
import torch
from symusic import Score
from torch import Tensor

from multiar.domain import safe_child, write_new_file
from multiar.generate import LogitsProcessor

SPECIALS = ("PAD_None", "BOS_None", "EOS_None")


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


class MusicDomain:
    name = "music"
    suffixes = (".mid", ".midi")
    unit = "note"

    def __init__(
        self,
        tokenization: str = "REMI",
        tokenizer_config: dict[str, Any] | None = None,
        tokenizer: miditok.MusicTokenizer | None = None,
    ) -> None:
        if tokenizer is None:
            if not hasattr(miditok, tokenization):
                raise ValueError(f"unknown miditok tokenization {tokenization!r}")
            tokenizer = getattr(miditok, tokenization)(_tokenizer_config(tokenizer_config or {}))
        if not tokenizer.one_token_stream:
            raise ValueError("the music domain needs one token stream: set use_programs=true")
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.vocab_size
        self.pad_id, self.bos_id, self.eos_id = (tokenizer[s] for s in SPECIALS)
        self.special_ids = {tokenizer[s] for s in tokenizer.special_tokens}

    def default_paths(self, corpus: str | None = None) -> list[Path]:
        if corpus not in (None, "chorales"):
            raise ValueError(f"unknown corpus {corpus!r}: the {self.name} domain bundles chorales")
        return [Path(str(files("multiar.domains") / "assets" / "music" / "bach_chorales"))]

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
        """REMI's vocabulary is fixed by its config; BPE training slots in here."""

    def encode(self, record: Score) -> list[int]:
        ids = self.tokenizer.encode(record).ids
        if not ids:
            raise ValueError("no tokens after miditok preprocessing")
        return ids

    def prompt_ids(self, prompt: str | None) -> list[int]:
        if not prompt:
            return [self.bos_id]
        path = Path(prompt).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{path}: music prompt must be a MIDI file")
        try:
            score = next(self.read(path))
        except (ValueError, RuntimeError) as err:
            raise ValueError(f"{path}: unreadable MIDI prompt: {err}") from err
        return [self.bos_id] + self.encode(score)

    def decode(self, ids: list[int]) -> tuple[Score, int]:
        keep = [i for i in ids if i not in self.special_ids and 0 <= i < self.vocab_size]
        if not keep:
            return Score(self.tokenizer.time_division), len(ids)
        seq = miditok.TokSequence(ids=keep)
        self.tokenizer.complete_sequence(seq)
        # tokens_errors: the share of tokens that break the tokenizer's succession rules;
        # miditok's decoder skips them, so they count as dropped
        errors = round(float(self.tokenizer.tokens_errors(seq)) * len(keep))
        return self.tokenizer.decode(seq), len(ids) - len(keep) + errors

    def write(
        self,
        artifacts: Sequence[Score],
        out_dir: Path,
        provenance: dict,
        overwrite: bool = False,
        start: int = 0,
    ) -> list[Path]:
        return [
            write_new_file(
                safe_child(Path(out_dir), f"sample_{start + i:03d}.mid"),
                lambda tmp, s=score: s.dump_midi(str(tmp)),
                overwrite,
            )
            for i, score in enumerate(artifacts)
        ]

    def metrics(self, artifacts: Sequence[Score]) -> dict[str, float]:
        notes = [n for s in artifacts for t in s.tracks for n in t.notes]
        per_sample = [sum(len(t.notes) for t in s.tracks) for s in artifacts]
        pitch_classes = Counter(n.pitch % 12 for n in notes)
        total = sum(pitch_classes.values())
        entropy = -sum(c / total * math.log2(c / total) for c in pitch_classes.values()) if total else 0.0
        return {
            "music/notes_per_sample": sum(per_sample) / max(len(per_sample), 1),
            "music/empty_rate": sum(n == 0 for n in per_sample) / max(len(per_sample), 1),
            "music/pitch_class_entropy": entropy,
        }

    def constraint(self) -> LogitsProcessor | None:
        """Only token types that miditok's grammar (tokens_types_graph) lets follow the previous token."""
        vocab = [self.tokenizer[i] for i in range(self.vocab_size)]
        kinds = sorted({token.split("_")[0] for token in vocab})
        kind_id = {k: i for i, k in enumerate(kinds)}
        kind_of = torch.tensor([kind_id[token.split("_")[0]] for token in vocab])  # (V,)
        allowed = torch.ones(len(kinds), self.vocab_size, dtype=torch.bool)  # (kinds, V); unlisted: anything
        for kind, successors in self.tokenizer.tokens_types_graph.items():
            nexts = [kind_id[n.split("_")[0]] for n in successors if n.split("_")[0] in kind_id]
            if kind in kind_id and nexts:  # EOS has no successors: a finished row may repeat anything
                allowed[kind_id[kind]] = torch.isin(kind_of, torch.tensor(nexts))

        def processor(ids: Tensor, logits: Tensor) -> Tensor:
            mask = allowed.to(logits.device)[kind_of.to(logits.device)[ids[:, -1]]]  # (B, V)
            return logits.masked_fill(~mask, float("-inf"))

        return processor

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(directory / "tokenizer.json")

    @classmethod
    def load(cls, directory: Path) -> MusicDomain:
        path = directory / "tokenizer.json"
        tokenization = json.loads(path.read_text())["tokenization"]
        return cls(tokenizer=getattr(miditok, tokenization)(params=path))
