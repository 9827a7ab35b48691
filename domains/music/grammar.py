"""Music's grammar as miditok's `tokens_errors` counts it, kept per row so that sampling makes none.

miditok's `_tokens_errors` counts three kinds of error: a token type that may not follow the previous
one (`tokens_types_graph`), time going backwards (a Position at or before the current one within a
bar) and, when `remove_duplicated_notes` is set, a pitch played twice at one time; MIDILike also counts
a NoteOff for a pitch that is not sounding and notes never ended. `MusicState.step` replays those
rules one base token at a time, exactly as miditok's loop does, so the state after a row's tokens says
which next tokens would count as an error.

With BPE a token stands for several base tokens. It is allowed when its base tokens replay without
error from the row's state. Most of that is fixed per token and checked once (its internal
successions); what depends on the state is checked with vectors over the vocabulary (the first base
token's type, the first Position's value), and the few tokens whose validity depends on more (a
MIDILike NoteOff, a pitch under `remove_duplicated_notes`) are replayed one by one.

miditok's private `_tokens_errors` and `_ids_to_bytes` are looked up once (`private_api`); a version
without them gets a public path (the public `tokens_errors`, miditok's documented default byte of an id)
and one warning line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache
from importlib.metadata import version

import miditok
import torch
from miditok.constants import CHR_ID_START
from symusic import Note, Score, TimeSignature, Track
from torch import Tensor

from multiar.engine.prefix_states import PrefixStates

log = logging.getLogger("multiar")

NOTE_TYPES = {"Pitch", "NoteOn", "PitchDrum", "DrumOn"}
TIME_RESETS = {"TimeShift", "Time-Shift", "Rest"}


@cache
def private_api(name: str, instead: str) -> Callable | None:
    """miditok's private `MusicTokenizer.<name>` when this miditok has it, else None with one warning
    line naming it and the public path taken `instead`."""
    found = getattr(miditok.MusicTokenizer, name, None)
    if found is None:
        log.warning("miditok %s has no MusicTokenizer.%s: %s", version("miditok"), name, instead)
    return found


def own_error_rules(tokenizer: miditok.MusicTokenizer) -> bool:
    """Whether the tokenizer's class counts errors its own way, not by MusicTokenizer's rules (which
    MusicState replays): it overrides the public `tokens_errors` or the private `_tokens_errors`."""
    cls = type(tokenizer)
    if cls.tokens_errors is not miditok.MusicTokenizer.tokens_errors:
        return True
    base = private_api("_tokens_errors", "the music constraint judges tokenizers by tokens_errors alone")
    return base is not None and getattr(cls, "_tokens_errors", base) is not base


def ids_to_bytes(tokenizer: miditok.MusicTokenizer, sequences: list[list[int]]) -> list[str]:
    """Each sequence of base ids as one string of miditok's bytes (one character per id): what its BPE
    is trained on."""
    if private_api("_ids_to_bytes", "ids become chr(id + CHR_ID_START), add_to_vocab's default") is not None:
        return [tokenizer._ids_to_bytes(ids, as_one_str=True) for ids in sequences]
    return ["".join(chr(i + CHR_ID_START) for i in ids) for ids in sequences]


@dataclass(frozen=True)
class MusicState:
    """What miditok's error count depends on after some tokens (immutable: a state is shared by rows)."""

    prev: str | None = None  # type of the last base token (None: nothing yet, the first is free)
    before: str | None = None  # type of the one before it: Rest -> TimeSig -> Position is no time error
    pos: int = -1  # current Position within the bar
    program: int = 0
    sounding: frozenset[tuple[int, int]] = frozenset()  # (program, pitch) started at the current time
    active: tuple[tuple[int, int], ...] = ()  # MIDILike: notes on and not yet off

    def step(self, token: str, grammar: MusicGrammar) -> tuple[MusicState, bool]:
        """The state after one base token, and whether miditok counts that token as an error."""
        kind, _, value = token.partition("_")
        moved = replace(self, prev=kind, before=self.prev)
        if self.prev is not None and kind not in grammar.graph.get(self.prev, ()):
            return moved, True
        if grammar.midi_like:
            return moved._midi_like(kind, value, grammar)
        if self.prev is None:  # miditok's first token: only a note or a Position changes its state
            if kind in NOTE_TYPES:
                return replace(moved, sounding=self.sounding | {(self.program, int(value))}), False
            return (replace(moved, pos=int(value)) if kind == "Position" else moved), False
        if token == "Bar_None":
            return replace(moved, pos=-1, sounding=frozenset()), False
        if kind in TIME_RESETS:
            return replace(moved, sounding=frozenset()), False
        if kind in NOTE_TYPES:
            note = (self.program, int(value))
            if grammar.remove_duplicates and note in self.sounding:
                return moved, True
            return replace(moved, sounding=self.sounding | {note}), False
        if kind == "Position":
            back = int(value) <= self.pos and not (
                self.prev == "Rest" or (self.prev == "TimeSig" and self.before == "Rest")
            )
            return replace(moved, pos=int(value), sounding=frozenset()), back
        if kind == "Program":
            return replace(moved, program=int(value)), False
        return moved, False

    def _midi_like(self, kind: str, value: str, grammar: MusicGrammar) -> tuple[MusicState, bool]:
        if kind in ("NoteOn", "DrumOn"):
            note = (self.program, int(value))
            if grammar.remove_duplicates and note in self.sounding:
                return replace(self, prev=kind, before=self.prev), True
            return replace(
                self,
                prev=kind,
                before=self.prev,
                sounding=self.sounding | {note},
                active=self.active + (note,),
            ), False
        moved = replace(self, prev=kind, before=self.prev)
        if kind in ("NoteOff", "DrumOff"):
            note = (self.program, int(value))
            if note not in self.active:
                return moved, True  # this pitch wasn't being played
            i = self.active.index(note)
            return replace(moved, active=self.active[:i] + self.active[i + 1 :]), False
        if kind == "Program":
            return replace(moved, program=int(value)), False
        if kind in TIME_RESETS:
            return replace(moved, sounding=frozenset()), False
        return moved, False

    def run(self, tokens: list[str], grammar: MusicGrammar) -> tuple[MusicState, int]:
        state, errors = self, 0
        for token in tokens:
            state, error = state.step(token, grammar)
            errors += error
        return state, errors


class MusicGrammar:
    """The vocabulary's base tokens and the rules; `processor()` is the logits processor."""

    def __init__(self, tokenizer: miditok.MusicTokenizer, vocab_size: int, special_ids: set[int]) -> None:
        self.graph = {k: {n.split("_")[0] for n in v} for k, v in tokenizer.tokens_types_graph.items()}
        self.midi_like = isinstance(tokenizer, miditok.MIDILike)
        self.exact = self.midi_like or not own_error_rules(tokenizer)
        if tokenizer.config.use_pitch_intervals:
            self.exact = False
        if not self.exact:
            log.warning(
                "music: %s has its own error rules; the constraint checks token types only",
                type(tokenizer).__name__,
            )
        self.remove_duplicates = bool(tokenizer.config.remove_duplicated_notes)
        self.vocab_size = vocab_size
        self.special_ids = special_ids
        self.base = [[] if i in special_ids else base_tokens(tokenizer, i) for i in range(vocab_size)]
        kinds = sorted({t.split("_")[0] for b in self.base for t in b} | set(self.graph))
        self.kind_index = {k: i for i, k in enumerate(kinds)}
        first = [b[0].split("_")[0] if b else None for b in self.base]
        # (kinds + 1, V): the first base token's type may follow the row's last one (last row: nothing yet)
        self.follows = torch.zeros(len(kinds) + 1, vocab_size, dtype=torch.bool)
        for k, ki in self.kind_index.items():
            nexts = self.graph.get(k)
            self.follows[ki] = torch.tensor([f is None or nexts is None or f in nexts for f in first])
        starts = start_kinds(tokenizer)  # after BOS: what a piece starts with (REMI: Bar), not anything
        self.follows[-1] = torch.tensor([f in starts for f in first])
        # the value of a token's first Position that is not after a Bar inside the token (-1: none): it
        # is checked against the row's Position, unless miditok's Rest (-> TimeSig) exemption applies
        self.position = torch.full((vocab_size,), -1)
        self.position_first = torch.zeros(vocab_size, dtype=torch.bool)  # that Position starts the token
        self.exempt = torch.zeros(vocab_size, dtype=torch.bool)  # exempt by the token's own tokens
        self.exempt_after_rest = torch.zeros(
            vocab_size, dtype=torch.bool
        )  # TimeSig, Position: if Rest before
        fixed_ok, replay = [], []
        for i, b in enumerate(self.base):
            kinds_in = [t.split("_")[0] for t in b]
            for j, t in enumerate(b):
                if t == "Bar_None":
                    break
                if kinds_in[j] == "Position":
                    self.position[i], self.position_first[i] = int(t.split("_")[1]), j == 0
                    self.exempt[i] = j >= 1 and (
                        kinds_in[j - 1] == "Rest"
                        or (j >= 2 and kinds_in[j - 1] == "TimeSig" and kinds_in[j - 2] == "Rest")
                    )
                    self.exempt_after_rest[i] = j == 1 and kinds_in[0] == "TimeSig"
                    break
            if self.exact and (
                (self.midi_like and {"NoteOff", "DrumOff"} & set(kinds_in))
                or (self.remove_duplicates and NOTE_TYPES & set(kinds_in))
            ):
                replay.append(i)  # its validity depends on which notes sound: replayed per row
                fixed_ok.append(True)
            else:  # internal errors are the token's own: replay it once after nothing (first token free)
                fixed_ok.append(MusicState().run(b, self)[1] == 0 if self.exact else True)
        self.fixed_ok = torch.tensor(fixed_ok)
        self.replay = replay
        self.bar_first = torch.tensor([bool(b) and b[0] == "Bar_None" for b in self.base])  # starts a bar

    def state(self, ids: list[int], start: MusicState | None = None) -> MusicState:
        state = start or MusicState()
        for i in ids:
            if 0 <= i < self.vocab_size and i not in self.special_ids:
                state = state.run(self.base[i], self)[0]
        return state

    def allowed(self, state: MusicState, eos_id: int) -> Tensor:
        """(V,) bool: the tokens that add no error after state."""
        row = self.follows[self.kind_index.get(state.prev, -1) if state.prev is not None else -1]
        ok = row & self.fixed_ok
        if not self.exact:
            return ok
        # time going backwards: the first Position against the row's, unless Rest (-> TimeSig) precedes
        after_rest = state.prev == "Rest"
        exempt = (
            self.exempt
            | (self.position_first & (after_rest or (state.prev == "TimeSig" and state.before == "Rest")))
            | (self.exempt_after_rest & after_rest)
        )
        ok &= ~((self.position >= 0) & (self.position <= state.pos) & ~exempt)
        for i in self.replay:
            if ok[i]:
                ok[i] = state.run(self.base[i], self)[1] == 0
        if self.midi_like:
            ok[eos_id] = not state.active  # un-ended notes count as errors at the end
        return ok

    def processor(self, eos_id: int) -> Callable[[Tensor, Tensor], Tensor]:
        states: PrefixStates[MusicState] = PrefixStates(self.state, lambda s, new: self.state(new, start=s))

        def constrain(ids: Tensor, logits: Tensor) -> Tensor:
            mask = torch.stack([self.allowed(states.state_of(row), eos_id) for row in ids.tolist()])
            dead = ~mask.any(-1)
            mask[dead] = True  # a row no token can continue cleanly: the model chooses (never seen)
            return logits.masked_fill(~mask.to(logits.device), float("-inf"))

        return constrain


def start_kinds(tokenizer: miditok.MusicTokenizer) -> set[str]:
    """The token types a piece's tokens begin with, by encoding one-note pieces (a note on the first
    beat or later, with or without a time signature): miditok's encoder says it, not a table here."""
    kinds = set()
    for onset in (0, tokenizer.time_division):
        for signature in (None, (4, 4), (3, 4)):
            score = Score(tokenizer.time_division)
            if signature is not None:
                score.time_signatures.append(TimeSignature(0, *signature))
            track = Track(program=0)
            track.notes.append(Note(onset, tokenizer.time_division, 60, 80))
            score.tracks.append(track)
            tokens = tokenizer(score, encode_ids=False).tokens
            kinds.add(tokens[0].split("_")[0])
    return kinds


def base_tokens(tokenizer: miditok.MusicTokenizer, i: int) -> list[str]:
    """The base tokens one id stands for: itself, or a BPE token's pieces."""
    if not tokenizer.is_trained:
        return [tokenizer[i]]
    seq = miditok.TokSequence(ids=[i], are_ids_encoded=True)
    tokenizer.decode_token_ids(seq)  # public: sets the base tokens
    return list(seq.tokens)
