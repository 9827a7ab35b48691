"""Test-side hooks for subprocesses: this folder goes on their PYTHONPATH, where Python imports its
sitecustomize.py at start-up (see that file for the variables each hook reads)."""

from __future__ import annotations

import os
from pathlib import Path

HOOKS = Path(__file__).parent


def hooked_env(**variables: str) -> dict[str, str]:
    """os.environ with this folder first on PYTHONPATH, unbuffered output, and the given variables."""
    path = os.pathsep.join(p for p in (str(HOOKS), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path, **variables}
