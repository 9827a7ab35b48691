"""What music runs write, with and without the grammar constraint, side by side on the same runs and
seeds: miditok's token error rate, and the distance of each music statistic to the training set's.

    .venv/bin/python benchmarks/music_quality.py RUN_DIR [RUN_DIR ...] [--n 100] [--json out.json]

Per run: its last validation loss (run_dir/metrics.csv), then `multiar generate n=N` with constrain=true
and constrain=false (same seed), and a markdown table of the statistics next to the training pieces'.
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
from pathlib import Path

from multiar.commands.generate import sample_to_files
from multiar.config import load_config
from multiar.domains.music.analysis import STATS


def last_val_loss(run: Path) -> float:
    """The last validation loss the run logged (run_dir/metrics.csv)."""
    with open(run / "metrics.csv", newline="") as f:
        return [float(r["val/loss"]) for r in csv.DictReader(f) if r.get("val/loss")][-1]


def measure(run: Path, n: int, max_new_tokens: int, constrain: bool, out: Path) -> dict[str, float]:
    report = sample_to_files(
        load_config(
            "generate",
            [
                f"run={run}",
                f"out={out}",
                f"n={n}",
                f"batch_size={min(n, 50)}",
                f"max_new_tokens={max_new_tokens}",
                f"constrain={str(constrain).lower()}",
                "overwrite=true",
            ],
        )
    )
    return report["metrics"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run in args.runs:
            entry = {"val/loss": last_val_loss(run)}
            for constrain in (True, False):
                out = Path(tmp) / run.name / ("constrained" if constrain else "free")
                entry["constrained" if constrain else "free"] = measure(
                    run, args.n, args.max_new_tokens, constrain, out
                )
            results[str(run)] = entry
    print("| run | val loss | token errors, constrained | token errors, free | notes/sample (c / f) |")
    print("|---|---|---|---|---|")
    for run, e in results.items():
        c, f = e["constrained"], e["free"]
        print(
            f"| {Path(run).name} | {e['val/loss']:.3f} | {c['music/token_error_rate']:.4f} | "
            f"{f['music/token_error_rate']:.4f} | {c['music/notes_per_sample']:.0f} / {f['music/notes_per_sample']:.0f} |"
        )
    print()
    names = [Path(r).name for r in results]
    print("| statistic | " + " | ".join(f"{n}: samples / training (distance)" for n in names) + " |")
    print("|---|" + "---|" * len(names))
    for stat in STATS:
        cells = []
        for e in results.values():
            m = e["constrained"]
            cells.append(
                f"{m[f'music/{stat}']:.3f} / {m[f'music/{stat}_train']:.3f} ({m[f'music/{stat}_distance']:.2f})"
            )
        print(f"| {stat} | " + " | ".join(cells) + " |")
    means = [f"{e['constrained']['music/distance_mean']:.2f}" for e in results.values()]
    print("| mean distance | " + " | ".join(means) + " |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
