"""The house's layering (pyproject [tool.importlinter]): checked by import-linter on the package as it
installs (domains/ becomes multiar/domains/), so a lower layer importing a higher one fails the test run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint(tree: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(tree)}  # this tree's multiar, before the editable install's
    return subprocess.run(
        [str(LINT_IMPORTS), str(ROOT / "pyproject.toml")], cwd=tree, env=env, capture_output=True, text=True
    )


def installed_layout(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "multiar", tree / "multiar", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(
        ROOT / "domains", tree / "multiar" / "domains", ignore=shutil.ignore_patterns("__pycache__")
    )
    return tree


def test_the_layering_contract_holds(tmp_path):
    out = lint(installed_layout(tmp_path))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "Contracts: 3 kept, 0 broken." in out.stdout


def test_the_contract_catches_a_lower_layer_importing_a_higher_one(tmp_path):
    tree = installed_layout(tmp_path)
    with open(tree / "multiar" / "engine" / "scoring.py", "a") as f:
        f.write("\nimport multiar.training.run  # noqa: E402,F401\n")
    with open(tree / "multiar" / "domains" / "code" / "analysis.py", "a") as f:
        f.write("\nimport multiar.domains.music.grammar  # noqa: E402,F401\n")
    out = lint(tree)
    assert out.returncode != 0
    assert "layers: a lower layer never imports a higher one BROKEN" in out.stdout
    assert "the engine imports no Lightning, Hydra or domain code BROKEN" in out.stdout
    assert "no domain imports another BROKEN" in out.stdout
