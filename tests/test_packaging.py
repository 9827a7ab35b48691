"""The built wheel carries the Hydra configs and the bundled data, so a regular (non-editable) install works."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).parents[1]

PROBE = """
import json
from multiar.config import config_dir, load_config
from multiar.domains import build_domain
from multiar.files import find_files
cfg = load_config("train", ["domain=music", "model=small", "trainer=ddp"])
out = {"conf": str(config_dir()), "model": cfg.model.name, "lr": cfg.optim.lr}
out["generate"] = load_config("generate", ["run=x"]).n  # the schema's default, from the ConfigStore
for name in ("music", "protein", "image"):
    d = build_domain(name)
    out[name] = [str(f) for f in find_files(d.default_paths(), d.suffixes)]
print(json.dumps(out))
"""


def test_wheel_installs_configs_and_bundled_data(tmp_path):
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    # setuptools builds in the tree and reuses build/lib: files of an older layout left there would
    # pass this test with paths the package no longer has (seen after the move to packages by layer)
    shutil.rmtree(ROOT / "build", ignore_errors=True)
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(ROOT)],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    wheel = next((tmp_path / "dist").glob("multiar-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {
        "multiar/conf/train.yaml",
        "multiar/conf/domain/music.yaml",
        "multiar/conf/trainer/ddp.yaml",
        "multiar/domains/protein/assets/LICENSE.md",
        "multiar/domains/music/assets/bach_chorales/LICENSE.md",
        "multiar/domains/image/assets/digits/LICENSE.md",
        "multiar/domains/image/assets/digits/digits.csv.gz",
        "multiar/engine/rows.py",  # every package of the house
        "multiar/engine/cpu_kernels.c",  # the fused kernels' source, compiled on first use
        "multiar/commands/generate.py",
        "multiar/commands/static/index.html",  # the serve page
        "multiar/commands/static/page.js",
        "multiar/training/run.py",
        "multiar/data/corpus.py",
    } <= names
    # the registry installs inside multiar's namespace, never as a top-level `domains` module
    assert not any(n.startswith("domains/") for n in names)
    site = tmp_path / "site"
    subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, capture_output=True
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    probe = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert probe.returncode == 0, probe.stderr[-2000:]
    found = json.loads(probe.stdout.strip().splitlines()[-1])
    assert found["conf"].startswith(str(site)) and found["model"] == "small"
    assert found["lr"] == 1e-3 and found["generate"] == 8  # the preset's lr, the schema's default
    assert len(found["music"]) == 349 and all(p.startswith(str(site)) for p in found["music"])
    assert found["protein"][0].startswith(str(site)) and found["protein"][0].endswith(".fasta.gz")
    assert found["image"][0].startswith(str(site)) and found["image"][0].endswith("digits.csv.gz")


TIERS = """
import pytest

def test_plain():
    pass

@pytest.mark.slow
def test_slow():
    pass

@pytest.mark.gpu
def test_gpu():
    pass

@pytest.mark.browser
def test_browser():
    pass
"""


def _collect(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """pytest --collect-only under the project's own pytest settings (pyproject.toml)."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-c",
            str(ROOT / "pyproject.toml"),
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            *args,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_test_tiers_default_leaves_out_slow_and_gpu(tmp_path):
    (tmp_path / "test_tiers.py").write_text(TIERS)
    default = _collect(tmp_path, str(tmp_path / "test_tiers.py"))
    assert default.returncode == 0, default.stdout + default.stderr
    assert "test_plain" in default.stdout
    assert not any(f"test_{t}" in default.stdout for t in ("slow", "gpu"))
    assert "test_browser" in default.stdout  # in make test: it skips, saying why, without Chromium
    everything = _collect(tmp_path, "-m", "", str(tmp_path / "test_tiers.py"))  # what make test-all runs
    assert all(f"test_{t}" in everything.stdout for t in ("plain", "slow", "gpu", "browser"))
    # --strict-markers: a misspelt marker is an error, not a silently default-tier test
    (tmp_path / "test_typo.py").write_text("import pytest\n\n@pytest.mark.sloww\ndef test_x():\n    pass\n")
    typo = _collect(tmp_path, str(tmp_path / "test_typo.py"))
    assert typo.returncode != 0 and "'sloww' not found in `markers`" in typo.stdout + typo.stderr
    make = subprocess.run(["make", "-n", "test-all"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert make.returncode == 0 and 'pytest -q -m ""' in make.stdout
