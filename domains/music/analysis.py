"""What a musician looks at in a set of pieces: per-piece statistics, their distance to the training
set, and a piano roll.

Statistics (all tracks together; bars from the time signatures, miditok's `get_bars_ticks`):
notes_per_bar, polyphony (notes sounding at each distinct onset, averaged over onsets), pitch_range
(semitones), pitch_class_entropy (bits), in_scale_ratio (share of notes in the key that the
Krumhansl-Kessler profiles estimate), empty_bar_ratio (bars without an onset) and groove_consistency
(1 - the mean Hamming distance between consecutive bars' onset patterns on a 16th-note grid, over the
grid size; Wu & Yang 2020).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from miditok.utils import get_bars_ticks
from symusic import Score

from multiar.figures import new_figure, write_png

STATS = (
    "notes_per_bar",
    "polyphony",
    "pitch_range",
    "pitch_class_entropy",
    "in_scale_ratio",
    "empty_bar_ratio",
    "groove_consistency",
)
# Krumhansl & Kessler (1982) key profiles, tonic first
MAJOR_PROFILE = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
MINOR_PROFILE = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])
MAJOR_SCALE = (0, 2, 4, 5, 7, 9, 11)
MINOR_SCALE = (0, 2, 3, 5, 7, 8, 10)  # natural minor


def notes_of(score: Score) -> np.ndarray:
    """(N, 3) int array of (onset tick, end tick, pitch), drums left out: they have no pitch."""
    rows = [(n.time, n.time + n.duration, n.pitch) for t in score.tracks if not t.is_drum for n in t.notes]
    return np.array(rows, dtype=np.int64).reshape(-1, 3)


def estimate_key(notes: np.ndarray) -> tuple[int, bool]:
    """(tonic pitch class, is_major): the profile best correlated with the duration-weighted
    pitch-class histogram (Krumhansl-Schmuckler)."""
    hist = np.bincount(notes[:, 2] % 12, weights=notes[:, 1] - notes[:, 0], minlength=12)
    best, key = -2.0, (0, True)
    for tonic in range(12):
        for major, profile in ((True, MAJOR_PROFILE), (False, MINOR_PROFILE)):
            r = np.corrcoef(hist, np.roll(profile, tonic))[0, 1] if hist.std() > 0 else 0.0
            if r > best:
                best, key = r, (tonic, major)
    return key


def piece_stats(score: Score) -> dict[str, float]:
    """The statistics of one piece; NaN where a piece has no notes to measure."""
    notes = notes_of(score)
    bars = get_bars_ticks(score) if score.note_num() else [0]
    if not len(notes):
        return {k: math.nan for k in STATS} | {"notes_per_bar": 0.0, "empty_bar_ratio": 1.0}
    onsets = np.unique(notes[:, 0])
    sounding = [int(((notes[:, 0] <= t) & (notes[:, 1] > t)).sum()) for t in onsets]
    counts = np.bincount(notes[:, 2] % 12, minlength=12) / len(notes)
    tonic, major = estimate_key(notes)
    scale = {(tonic + d) % 12 for d in (MAJOR_SCALE if major else MINOR_SCALE)}
    edges = list(bars) + [max(int(notes[:, 1].max()), bars[-1] + 1)]
    grid = max(score.tpq // 4, 1)  # a 16th note
    patterns = []
    for start, end in zip(edges[:-1], edges[1:], strict=True):
        inside = onsets[(onsets >= start) & (onsets < end)]
        patterns.append((frozenset(((inside - start) // grid).tolist()), max((end - start) // grid, 1)))
    groove = [
        1 - len(a ^ b) / max(qa, qb) for (a, qa), (b, qb) in zip(patterns[:-1], patterns[1:], strict=True)
    ]
    return {
        "notes_per_bar": len(notes) / len(bars),
        "polyphony": float(np.mean(sounding)),
        "pitch_range": float(notes[:, 2].max() - notes[:, 2].min()),
        "pitch_class_entropy": float(-sum(p * math.log2(p) for p in counts if p > 0)),
        "in_scale_ratio": float(np.isin(notes[:, 2] % 12, list(scale)).mean()),
        "empty_bar_ratio": sum(not p for p, _ in patterns) / len(patterns),
        "groove_consistency": float(np.mean(groove)) if groove else math.nan,
    }


def summarize(scores: Sequence[Score]) -> dict[str, dict[str, float]]:
    """Per statistic: mean and standard deviation over the pieces that have it."""
    per_piece = [piece_stats(s) for s in scores]
    out = {}
    for key in STATS:
        values = np.array([p[key] for p in per_piece if not math.isnan(p[key])])
        out[key] = {
            "mean": float(values.mean()) if len(values) else math.nan,
            "std": float(values.std()) if len(values) else math.nan,
            "pieces": len(values),
        }
    return out


def distances(samples: dict[str, dict[str, float]], train: dict[str, dict[str, float]]) -> dict[str, float]:
    """Per statistic, |samples' mean - training mean| in training standard deviations (0: alike)."""
    out = {}
    for key in STATS:
        a, b = samples[key]["mean"], train.get(key, {}).get("mean", math.nan)
        spread = max(train.get(key, {}).get("std", 0.0), 1e-9)
        out[key] = abs(a - b) / spread if not (math.isnan(a) or math.isnan(b)) else math.nan
    return out


def piano_roll(score: Score, path: Path, title: str = "", overwrite: bool = False) -> Path:
    """A PNG of the piece: time in beats x pitch, one colour per track, a line at every bar."""
    fig, ax = new_figure(10, 4)
    tpq = max(score.tpq, 1)
    for i, track in enumerate(score.tracks):
        if not track.notes:
            continue
        starts = np.array([n.time for n in track.notes]) / tpq
        lengths = np.array([n.duration for n in track.notes]) / tpq
        pitches = np.array([n.pitch for n in track.notes])
        label = track.name or f"program {track.program}"
        ax.barh(pitches, lengths, left=starts, height=0.9, color=f"C{i % 10}", label=label)
    for tick in get_bars_ticks(score) if score.note_num() else []:
        ax.axvline(tick / tpq, color="0.85", linewidth=0.5, zorder=0)
    ax.set_xlabel("beats")
    ax.set_ylabel("pitch")
    ax.set_title(title, fontsize=9)
    if any(t.notes for t in score.tracks):
        ax.legend(loc="upper right", fontsize=7)
    return write_png(path, fig, overwrite)
