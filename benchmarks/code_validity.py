"""How much of what a code run writes is valid Python, with and without the syntax constraint, side by
side on the same run and seeds: unconditional samples, function completions with `stop_at=block`, and
fill-in-the-middle bodies.

    .venv/bin/python benchmarks/code_validity.py RUN_DIR [--n 100] [--functions 50] [--json out.json]

Prompts come from the run's own validation files (run_dir/reference/validation.json): completions
continue the first line of a top-level `def`; infill asks for the body of a top-level function between
its `def` line and the next top-level statement (a short one, whole). A completion counts as valid when the written file parses;
an infill when prefix + middle + suffix parses. Each task also says how many samples ended by themselves
(EOS, or the block rule) and the parse rate among those: a sample cut by max_new_tokens is unfinished,
not wrong. Under the constraint such a sample ends on its last complete statement (unfinished=auto):
each task says what share was cut back so, and its parse rate as drawn (`..._uncut`). Completions and
middles get `--body-tokens` new tokens, by default enough for 90% of the prompts' own function bodies
(a budget a real body fits in; unconditional samples get `--max-new-tokens`). Last, decoding speed with
and without the constraint (batch 8, the same seed, alternated).
"""

from __future__ import annotations

import argparse
import ast
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from multiar.commands.generate import sample_to_files
from multiar.config import load_config
from multiar.data.reference import read_reference
from multiar.domains.code.analysis import parses
from multiar.engine.precision import cpu_model


def validation_functions(run: Path, limit: int) -> list[tuple[str, str, str]]:
    """(def line, the next top-level statement when under 8 lines, the function's own body) of
    top-level functions in the run's validation files."""
    validation = read_reference(run)["validation"]
    root, found = Path(validation["root"]), []
    for name in validation["files"]:
        path = root / name
        try:
            text = path.read_text(encoding="utf-8")
            tree = ast.parse(text)
        except (OSError, SyntaxError, UnicodeDecodeError):
            continue
        lines = text.splitlines()
        nodes = tree.body
        for node, after in zip(nodes, nodes[1:], strict=False):
            head = lines[node.lineno - 1]
            following = "\n".join(lines[after.lineno - 1 : after.end_lineno])  # the whole next statement
            if (
                isinstance(node, ast.FunctionDef)
                and head.startswith("def ")
                and head.rstrip().endswith(":")
                and after.end_lineno - after.lineno < 8
            ):
                body = "\n".join(lines[node.lineno : node.end_lineno])
                found.append((head.rstrip(), following, body))
        if len(found) >= limit:
            break
    return found[:limit]


def speed(run: Path, constrain: bool, batch: int, tokens: int, seed: int = 1) -> float:
    """Decoded tokens per second for a batch of unconditional rows, `tokens` each (EOS banned so every
    row runs the whole length), with or without the constraint: the decode loop as generate runs it."""
    from multiar.engine.decode import generate
    from multiar.engine.sampling import ban_tokens
    from multiar.run_folder import load_run

    loaded = load_run(run)
    domain = loaded.domain
    processors = [ban_tokens([domain.pad_id, domain.bos_id, domain.eos_id])]
    if constrain:
        processors.append(domain.constraint())
    prompts = [domain.prompt_ids(None)] * batch
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    out = generate(loaded.model, prompts=prompts, max_new_tokens=tokens, processors=processors,
                   generator=generator, eos_id=domain.eos_id)  # fmt: skip
    return sum(map(len, out)) / (time.perf_counter() - start)


def ended(report: dict, reasons: tuple[str, ...] = ("eos", "block")) -> float:
    """The share of a report's samples that ended by themselves (EOS, or the block rule)."""
    return sum(report["metrics"].get(f"code/end_{r}_share", 0.0) for r in reasons)


def body_budget(run: Path, functions: list[tuple[str, str, str]], share: float = 0.9) -> int:
    """New tokens enough for `share` of the functions' own bodies (their token counts' quantile): a
    completion or middle budget a real body of these functions fits in, `share` of the time."""
    from multiar.run_folder import load_run

    domain = load_run(run).domain
    counts = sorted(len(domain.encode(body)) for _, _, body in functions)
    if not counts:
        raise SystemExit(f"{run}: no top-level function in its validation files to prompt with")
    return counts[min(len(counts) - 1, int(share * len(counts)))]


def measure(
    args: argparse.Namespace, functions: list[tuple[str, str, str]], tmp: Path, constrain: str
) -> dict:
    """The three tasks' validity under constrain=true or false, same seeds."""
    common = [f"run={args.run}", f"constrain={constrain}", "seed=1", "overwrite=true"]
    free = sample_to_files(load_config("generate", [*common, f"out={tmp}/u{constrain}", f"n={args.n}",
                                                    f"max_new_tokens={args.max_new_tokens}"]))  # fmt: skip
    block = sample_to_files(load_config("generate", [*common, f"out={tmp}/b{constrain}", "n=1",
                                                     f"prompt_file={tmp / 'prompts.txt'}", "stop_at=block",
                                                     f"max_new_tokens={args.body_tokens}"]))  # fmt: skip
    infilled = []  # (ended with EOS, prefix + middle + suffix parses, cut back to its last statement)
    for i, (head, after, _) in enumerate(functions):
        prefix, suffix = head + "\n    ", "\n\n" + after + "\n"
        report = sample_to_files(load_config("generate", [*common, f"out={tmp}/i{constrain}{i}", "n=1",
                                                          f"prompt_prefix={prefix}", f"prompt_suffix={suffix}",
                                                          f"max_new_tokens={args.body_tokens}"]))  # fmt: skip
        whole = parses(prefix + report["middles"][0] + suffix)
        infilled.append(
            (ended(report, ("eos",)) > 0, whole, report["metrics"]["code/cut_unfinished_share"] > 0)
        )
    done = [ok for end, ok, _ in infilled if end]
    # a sample cut back to its last complete statement (unfinished=auto under the constraint) parses by
    # that cut: the rates as drawn leave those out
    free_cut, block_cut = (r["metrics"]["code/cut_unfinished_share"] for r in (free, block))
    return {
        "unconditional_parse_rate": free["metrics"]["code/parse_rate"],
        "unconditional_cut_share": free_cut,
        "unconditional_parse_rate_uncut": free["metrics"]["code/parse_rate"] - free_cut,
        "unconditional_ended": ended(free),
        "unconditional_parse_rate_ended": free["metrics"]["code/ended_parse_rate"],
        "unconditional_compile_rate": free["metrics"]["code/compile_rate"],
        "unconditional_no_valid_token": free["metrics"].get("code/end_no_valid_token_share", 0.0),
        "copied_share": free["metrics"].get("code/copied_share"),
        "completion_block_parse_rate": block["metrics"]["code/parse_rate"],
        "completion_block_cut_share": block_cut,
        "completion_block_parse_rate_uncut": block["metrics"]["code/parse_rate"] - block_cut,
        "completion_block_ended": ended(block),
        "completion_block_parse_rate_ended": block["metrics"]["code/ended_parse_rate"],
        "infill_parse_rate": sum(ok for _, ok, _ in infilled) / max(len(infilled), 1),
        "infill_cut_share": sum(cut for _, _, cut in infilled) / max(len(infilled), 1),
        "infill_parse_rate_uncut": sum(ok and not cut for _, ok, cut in infilled) / max(len(infilled), 1),
        "infill_ended": len(done) / max(len(infilled), 1),
        "infill_parse_rate_ended": sum(done) / max(len(done), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--functions", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int, default=200, help="unconditional samples' budget")
    parser.add_argument(
        "--body-tokens",
        type=int,
        help="completions' and middles' budget (default: enough for 90%% of the functions' own bodies)",
    )
    parser.add_argument("--speed-tokens", type=int, default=128, help="tokens per row of the speed rows")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    functions = validation_functions(args.run, args.functions)
    args.body_tokens = args.body_tokens or body_budget(args.run, functions)
    results: dict = {"run": str(args.run), "functions": len(functions), "n": args.n, "cpu": cpu_model(),
                     "threads": torch.get_num_threads(), "python": platform.python_version(),
                     "max_new_tokens": args.max_new_tokens, "body_tokens": args.body_tokens}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "prompts.txt").write_text("\n".join(head for head, _, _ in functions) + "\n")
        for constrain in ("true", "false"):
            results[f"constrain={constrain}"] = measure(args, functions, tmp, constrain)
            print(f"constrain={constrain}", json.dumps(results[f"constrain={constrain}"]), flush=True)
    # speed side by side, alternated so that the machine's load falls on both alike
    rates = {"true": [], "false": []}
    for _ in range(2):
        for constrain in ("false", "true"):
            rates[constrain].append(speed(args.run, constrain == "true", 8, args.speed_tokens))
    for constrain, r in rates.items():
        results[f"constrain={constrain}"]["tokens_per_s_batch8"] = max(r)
    results["speed_ratio"] = max(rates["true"]) / max(rates["false"])
    print("tokens/s batch 8:", {k: [round(x, 1) for x in v] for k, v in rates.items()}, flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
