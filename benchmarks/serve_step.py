"""Where a `multiar serve` decode step goes, without HTTP: the server's own engine for one run (loaded as
`multiar serve` loads it: layout, rows attention and captured steps chosen by measuring), its thread
stopped and its steps driven here, every slot decoding (each ended request replaced at once by a new one
of 128 tokens). Per step: its wall time, the captured graph's share of it, and what the engine's Python
around the graph takes (processing, sampling, events; the median of each step's difference); tokens/s
from the mean step. --profile: the engine's top Python functions (the times are then cProfile's, said
so in the JSON); --kernels: the ops and inductor kernels inside 20 more steps (torch.profiler: oneDNN's
linears, the fused attention kernel). A server's step under load also shares the cores with its HTTP side and with the load generator:
serve_load.py's TPOT against this step is that share.

    .venv/bin/python benchmarks/serve_step.py runs/protein_small [--slots 16] [--steps 400]
        [--serve-args dtype=fp32 ...] [--profile] [--kernels] [--json out.json]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import cProfile
import json
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import NEW_TOKENS, body  # noqa: E402 (the closed loop's requests)

from multiar.commands.serve import load_models  # noqa: E402
from multiar.commands.serve_engine import Job  # noqa: E402
from multiar.commands.serve_requests import plan  # noqa: E402
from multiar.config import load_config  # noqa: E402
from multiar.engine.precision import cpu_model  # noqa: E402
from multiar.schema import validate  # noqa: E402


def summary(seconds: list[float]) -> dict[str, float]:
    ms = sorted(1000 * s for s in seconds)
    return {"median_ms": round(statistics.median(ms), 2), "mean_ms": round(statistics.mean(ms), 2),
            "p90_ms": round(ms[int(0.9 * len(ms))], 2)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--steps", type=int, default=400, help="steps timed (after as many again to warm up)")
    p.add_argument("--serve-args", nargs="*", default=[], help="more multiar serve keys, e.g. dtype=fp32")
    p.add_argument("--profile", action="store_true", help="the engine's top functions over the steps")
    p.add_argument("--kernels", action="store_true", help="the ops and kernels inside 20 more steps")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if args.kernels:  # the graph's kernels named in the profile: read when it compiles (a cache of its own)
        import torch._inductor.config as inductor

        inductor.cpp.enable_kernel_profile = True
    cfg = load_config("serve", [f"runs=[{args.run}]", f"slots={args.slots}", *args.serve_args])
    files = Path(tempfile.mkdtemp(prefix="serve_step-"))
    served = next(iter(load_models(validate("serve", cfg), files).values()))
    engine = served.engine
    engine.stop()  # its thread ends (and its check worker: a new one for rows with grammar checks)
    engine.running = True
    engine.checker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="multiar-check")
    seeds = iter(range(1, 1 << 30))

    def step() -> float:
        while engine.busy + engine.waiting < args.slots:  # every slot decoding
            request = plan(served, body(next(seeds), NEW_TOKENS) | {"files": False}, files, 1 << 20)
            engine.submit(Job(request.specs, lambda event: None))  # its events are not read
        start = time.perf_counter()
        engine.step()
        return time.perf_counter() - start

    for _ in range(args.steps):
        step()
    graph: list[float] = []  # the compiled graph's own calls, one a step while every slot decodes
    kind = type(engine.captured) if engine.captured is not None else None
    if kind is not None:
        call = kind.__call__

        def timed(self: Any, *a: Any) -> Any:
            start = time.perf_counter()
            out = call(self, *a)
            graph.append(time.perf_counter() - start)
            return out

        kind.__call__ = timed
    before = (engine.stats.steps, engine.stats.rows_decoding)
    python = cProfile.Profile() if args.profile else None  # its cost is in the times then (said so)
    if python:
        python.enable()
    steps = [step() for _ in range(args.steps)]
    if python:
        python.disable()
    if kind is not None:
        kind.__call__ = call
    rows = (engine.stats.rows_decoding - before[1]) / (engine.stats.steps - before[0])
    if python:
        pstats.Stats(python).sort_stats("tottime").print_stats(20)
    if args.kernels:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as kernels:
            for _ in range(20):
                step()
        table = kernels.key_averages().table(
            sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60
        )
        print(table)
    info = engine.describe()
    result = {"cpu": cpu_model(), "run": str(args.run), "slots": args.slots, "serve_args": args.serve_args,
              "weights": info["dtype"], "steps": "captured" if graph else "eager", "step": summary(steps),
              "rows_per_step": round(rows, 2), "tokens_per_s": round(rows / statistics.mean(steps), 1),
              "under_cprofile": bool(python)}  # fmt: skip
    if len(graph) == len(steps):
        result["graph"] = summary(graph)
        around = [s - g for s, g in zip(steps, graph, strict=True)]
        result["around_graph_ms_median"] = round(1000 * statistics.median(around), 2)
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
