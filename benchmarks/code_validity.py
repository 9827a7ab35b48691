"""How much of what a code run writes is valid Python, with and without the syntax constraint, side by
side on the same run and seeds: unconditional samples, function completions with `stop_at=block`, and
fill-in-the-middle bodies.

    .venv/bin/python benchmarks/code_validity.py RUN_DIR [--n 100] [--functions 50] [--json out.json]

Prompts come from the run's own validation files (run_dir/reference/validation.json): completions
continue the first line of a top-level `def`; infill asks for the body of a top-level function between
its `def` line and the next top-level statement (a short one, whole). A completion counts as valid when the written file parses;
an infill when prefix + middle + suffix parses.
"""

from __future__ import annotations

import argparse
import ast
import json
import tempfile
from pathlib import Path

from multiar.commands.generate import sample_to_files
from multiar.config import load_config
from multiar.data.reference import read_reference
from multiar.domains.code.analysis import parses


def validation_functions(run: Path, limit: int) -> list[tuple[str, str]]:
    """(def line, the next top-level statement when under 8 lines) of top-level functions in the run's
    validation files."""
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
                found.append((head.rstrip(), following))
        if len(found) >= limit:
            break
    return found[:limit]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--functions", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    functions = validation_functions(args.run, args.functions)
    results: dict = {"run": str(args.run), "functions": len(functions)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "prompts.txt").write_text("\n".join(head for head, _ in functions) + "\n")
        for constrain in ("true", "false"):
            common = [f"run={args.run}", f"constrain={constrain}", "seed=1", "overwrite=true"]
            free = sample_to_files(load_config("generate", [*common, f"out={tmp}/u{constrain}", f"n={args.n}",
                                                            f"max_new_tokens={args.max_new_tokens}"]))  # fmt: skip
            block = sample_to_files(load_config("generate", [*common, f"out={tmp}/b{constrain}", "n=1",
                                                             f"prompt_file={tmp / 'prompts.txt'}", "stop_at=block",
                                                             f"max_new_tokens={args.max_new_tokens}"]))  # fmt: skip
            infilled = []
            for i, (head, after) in enumerate(functions):
                prefix, suffix = head + "\n    ", "\n\n" + after + "\n"
                report = sample_to_files(load_config("generate", [*common, f"out={tmp}/i{constrain}{i}", "n=1",
                                                                  f"prompt_prefix={prefix}", f"prompt_suffix={suffix}",
                                                                  "max_new_tokens=120"]))  # fmt: skip
                infilled.append(parses(prefix + report["middles"][0] + suffix))
            results[f"constrain={constrain}"] = {
                "unconditional_parse_rate": free["metrics"]["code/parse_rate"],
                "unconditional_compile_rate": free["metrics"]["code/compile_rate"],
                "copied_share": free["metrics"].get("code/copied_share"),
                "completion_block_parse_rate": block["metrics"]["code/parse_rate"],
                "infill_parse_rate": sum(infilled) / max(len(infilled), 1),
            }
            print(f"constrain={constrain}", json.dumps(results[f"constrain={constrain}"]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
