"""MIDI: miditok tokenizations (REMI by default), a stateful grammar that samples no token errors, piano rolls and audio."""

from multiar.domains.music.domain import MusicDomain

__all__ = ["MusicDomain"]
