"""benchmarks/inference_speed.py's rounds: the rows a target compares run back to back in every round, and
the target's ratio is taken round by round."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from inference_speed import bench, paired_ratios, round_units, target_pairs  # noqa: E402


def test_groups_sharing_a_row_are_one_unit_and_every_other_row_runs_alone() -> None:
    names = ["a", "b", "c", "d", "e"]
    units = round_units(names, [("b", "d"), ("d", "a"), ("x", "e")])
    assert sorted(map(tuple, units)) == [("a", "b", "d"), ("c",), ("e",)]


def test_a_group_runs_back_to_back_in_every_round_in_either_order() -> None:
    log: list[str] = []
    entries = {name: (lambda name=name: log.append(name)) for name in "abcdef"}
    times = bench(entries, 12, [("b", "e")])
    assert all(len(t) == 12 for t in times.values())
    rounds = [log[6 * (r + 1) : 6 * (r + 2)] for r in range(12)]  # the warm-up round first
    assert all(sorted(r) == list("abcdef") for r in rounds)
    assert all(abs(r.index("b") - r.index("e")) == 1 for r in rounds)
    assert {r.index("b") < r.index("e") for r in rounds} == {True, False}
    assert len({r.index("b") // 2 for r in rounds}) > 1  # the pair's place in a round moves too


def test_a_ratio_is_taken_round_by_round() -> None:
    times = {"multiar": [1.0, 2.0, 1.0], "llama": [1.5, 2.0, 0.5]}
    assert paired_ratios(times, "multiar", "llama") == [1.5, 1.0, 0.5]


def test_a_target_compares_the_first_baseline_row_present() -> None:
    names = ["multiar compile=true (bf16)", "llama.cpp bf16", "multiar int8 compile=true", "llama-server f32"]
    pairs = {what: (n, d) for what, n, d, _ in target_pairs(names)}
    assert pairs == {
        "bf16 >= 1.0x llama.cpp bf16": ("multiar compile=true (bf16)", "llama.cpp bf16"),
        "int8 >= 1.6x bf16": ("multiar int8 compile=true", "multiar compile=true (bf16)"),
    }
