"""The built wheel carries the Hydra configs and the bundled data, so a regular (non-editable) install works."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).parents[1]

PROBE = """
import json
from multiar.config import config_dir, load_config
from multiar.domains import build_domain
from multiar.domain import find_files
cfg = load_config("train", ["domain=music", "model=small", "trainer=ddp"])
out = {"conf": str(config_dir()), "model": cfg.model.name}
for name in ("music", "protein"):
    d = build_domain(name)
    out[name] = [str(f) for f in find_files(d.default_paths(), d.suffixes)]
print(json.dumps(out))
"""


def test_wheel_installs_configs_and_bundled_data(tmp_path):
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
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
        "multiar/domains/assets/protein/LICENSE.md",
        "multiar/domains/assets/music/bach_chorales/LICENSE.md",
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
    assert len(found["music"]) == 349 and all(p.startswith(str(site)) for p in found["music"])
    assert found["protein"][0].startswith(str(site)) and found["protein"][0].endswith(".fasta.gz")
