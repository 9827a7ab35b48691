"""`multiar generate` at scale: wall time per sample and peak RSS for n protein samples of up to 100
residues, novelty search off and on, side by side in one run (each in a fresh process).

    .venv/bin/python benchmarks/generate_scale.py [--run runs/demo/protein] [--ns 1000,10000,100000]
        [--novelty-ns 1000,10000] [--workers-ns 1000] [--batch-size 256] [--workers 1]
        [--json benchmarks/generate_scale.json]

The run: the demo protein model (`make demo`: 4 layers x 128, 0.8M parameters) unless --run names
another. Per n: seconds, ms per sample, peak RSS (MB, ru_maxrss of the process), and with novelty on the
share of the wall time the search took (from its log line); --workers-ns: novelty on with the search
spread over 2 worker processes (filters.workers=2). Targets (issue 23): ms/sample at the largest
n within 1.2x of the smallest (novelty off), peak RSS within 200 MB, the search <= 25% of the time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

SCRIPT = """
import logging, resource, sys, time
logging.basicConfig(level=logging.INFO, format="%(message)s")
from multiar.commands.generate import sample_to_files
from multiar.config import load_config
started = time.perf_counter()
sample_to_files(load_config("generate", sys.argv[1:]))
print("RESULT", time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def measure(run: Path, n: int, novelty: bool, batch_size: int, workers: int, out: Path) -> dict:
    args = [f"run={run}", f"out={out}", f"n={n}", f"batch_size={batch_size}", "max_new_tokens=100",
            "progress=false", f"filters.novelty={str(novelty).lower()}", f"filters.workers={workers}"]  # fmt: skip
    done = subprocess.run([sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    seconds, rss = map(float, done.stdout.split("RESULT")[-1].split())
    row = {"n": n, "novelty": novelty, "workers": workers, "seconds": round(seconds, 1), "ms_per_sample": round(1000 * seconds / n, 2),
           "peak_rss_mb": round(rss)}  # fmt: skip
    if novelty and (m := re.search(r"novelty search .*?\((\w+)\).*?([\d.]+) ms per sample", done.stderr)):
        row["search_backend"] = m.group(1)
        row["search_share"] = round(float(m.group(2)) * n / 1000 / seconds, 3)
    # read after the run: it includes the run's own threads (~1-2); above that, other jobs were running
    row["load_avg_1min"] = round(os.getloadavg()[0], 2)
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/demo/protein"))
    parser.add_argument("--ns", default="1000,10000,100000")
    parser.add_argument("--novelty-ns", default="1000,10000")
    parser.add_argument("--workers-ns", default="1000")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not (args.run / "model.safetensors").exists():
        raise SystemExit(f"{args.run}: no run there (make demo trains runs/demo/protein)")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = (
            (False, args.ns, args.workers),
            (True, args.novelty_ns, args.workers),
            (True, args.workers_ns, 2),
        )
        for novelty, ns, workers in runs:
            for n in [int(x) for x in ns.split(",") if x]:
                out = Path(tmp) / f"{n}-{novelty}-{workers}"
                rows.append(measure(args.run, n, novelty, args.batch_size, workers, out))
                report(rows, args.json)  # after every row: a long run cut short keeps what it measured


def report(rows: list[dict], path: Path | None) -> None:
    from multiar.engine.precision import cpu_model  # imports torch, which only this summary needs here

    off = [r for r in rows if not r["novelty"]]
    shares = [r["search_share"] for r in rows if "search_share" in r]
    summary = {
        "cpu": cpu_model(),
        "time_ratio_largest_vs_smallest": round(off[-1]["ms_per_sample"] / off[0]["ms_per_sample"], 2) if off else None,
        "rss_growth_mb": off[-1]["peak_rss_mb"] - off[0]["peak_rss_mb"] if off else None,
        "largest_search_share": max(shares) if shares else None,
    }  # fmt: skip
    print(json.dumps(summary), flush=True)
    if path:
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps({"rows": rows, **summary}, indent=1) + "\n")
        partial.replace(path)


if __name__ == "__main__":
    main()
