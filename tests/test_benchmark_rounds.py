"""benchmarks/inference_speed.py's rounds: the rows a target compares run side by side in every round, and
the target's ratio is taken round by round."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from inference_speed import (  # noqa: E402
    CANDIDATE_ROWS,
    TARGETS,
    auto_vs_fastest,
    bench,
    paired_ratios,
    picked_row,
    round_units,
    target_pairs,
)


def test_pairs_sharing_a_row_make_a_chain_with_it_in_the_middle_and_every_other_row_runs_alone() -> None:
    names = ["a", "b", "c", "d", "e"]
    units = round_units(names, [("b", "d"), ("d", "a"), ("x", "e")])
    assert units == [["b", "d", "a"], ["c"], ["e"]]
    assert round_units(names, [("a", "b"), ("c", "d"), ("d", "a")]) == [["c", "d", "a", "b"], ["e"]]


def test_the_targets_rows_make_chains_that_keep_every_pair_side_by_side() -> None:
    names = [numerator for _, numerator, _, _ in TARGETS] + ["llama-server bf16", "llama-server f32", "other"]
    pairs = [(n, d) for _, n, d, _ in target_pairs(names)]
    assert len(pairs) == len(TARGETS)
    units = round_units(names, pairs)
    for n, d in pairs:
        unit = next(u for u in units if n in u)
        assert abs(unit.index(n) - unit.index(d)) == 1


def test_pairs_run_side_by_side_in_every_round_either_way_round() -> None:
    log: list[str] = []
    entries = {name: (lambda name=name: log.append(name)) for name in "abcdef"}
    times = bench(entries, 16, [("b", "e"), ("e", "a")])
    assert all(len(t) == 16 for t in times.values())
    rounds = [log[6 * (r + 1) : 6 * (r + 2)] for r in range(16)]  # the warm-up round first
    assert all(sorted(r) == list("abcdef") for r in rounds)
    assert all(
        abs(r.index("b") - r.index("e")) == 1 and abs(r.index("e") - r.index("a")) == 1 for r in rounds
    )
    assert {r.index("b") < r.index("e") for r in rounds} == {True, False}
    assert len({r.index("e") for r in rounds}) > 1  # the chain's place in a round moves too


def test_a_ratio_is_taken_round_by_round() -> None:
    times = {"multiar": [1.0, 2.0, 1.0], "llama": [1.5, 2.0, 0.5]}
    assert paired_ratios(times, "multiar", "llama") == [1.5, 1.0, 0.5]


def test_a_target_compares_the_first_baseline_row_present() -> None:
    names = [
        "multiar compile=true (bf16)",
        "llama.cpp bf16",
        "llama-server bf16",
        "multiar int8 compile=true",
    ]
    pairs = {what: (n, d) for what, n, d, _ in target_pairs(names)}
    assert pairs == {
        "bf16 >= 1.0x llama.cpp bf16": ("multiar compile=true (bf16)", "llama-server bf16"),
        "int8 >= 1.6x bf16": ("multiar int8 compile=true", "multiar compile=true (bf16)"),
    }


def test_the_auto_row_is_held_to_the_row_of_its_pick_round_by_round_then_to_the_fastest() -> None:
    assert picked_row("multiar auto (bf16 packed)") == "multiar bf16 packed"
    pace = [1.0, 1.0, 1.5, 1.5, 1.5]  # the RAM's pace moves between rounds
    picked = f"multiar {CANDIDATE_ROWS[0]}"
    auto = "multiar auto (" + CANDIDATE_ROWS[0] + ")"
    times = {f"multiar {c}": [4.0] * 5 for c in CANDIDATE_ROWS}  # slower candidates
    times[picked] = list(pace)
    times[auto] = [1.1, 1.1, 1.0, 1.0, 1.65]  # 1.1x the pick's seconds, but in two rounds at the fast pace
    versus = auto_vs_fastest(times, auto, tokens=256)
    assert versus["picked_vs_fastest"] == 1.0
    assert [round(r, 3) for r in versus["vs_picked_rounds"]] == [0.909, 0.909, 1.5, 1.5, 0.909]
    assert round(versus["vs_fastest_candidate"], 3) == 0.909  # the rounds' median, not the medians' 1.36
    assert round(versus["vs_fastest_candidate_of_medians"], 3) == 1.364
    if len(CANDIDATE_ROWS) > 1:  # another candidate twice as fast as the pick: the pick's ratio halves
        times[f"multiar {CANDIDATE_ROWS[1]}"] = [0.5 * p for p in pace]
        versus = auto_vs_fastest(times, auto, tokens=256)
        assert versus["picked_vs_fastest"] == 0.5
        assert round(versus["vs_fastest_candidate"], 3) == round(0.5 / 1.1, 3)
