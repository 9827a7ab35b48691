"""Matplotlib without a display: figures drawn off-screen and returned as PNG bytes, for the reports
that eval and the domains write beside their outputs."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from multiar.files import write_new_file


def new_figure(width: float = 6.0, height: float = 3.5, ncols: int = 1) -> tuple[Any, Any]:
    """(figure, axes) on the off-screen Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(width, height), dpi=100)


def png_bytes(fig: Any) -> bytes:
    """The figure as PNG bytes; the figure is closed (pyplot keeps open figures alive)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write_png(path: Path, fig: Any, overwrite: bool = False) -> Path:
    """The figure written atomically as a PNG at path (refusing to replace a file unless overwrite)."""
    png = png_bytes(fig)
    return write_new_file(path, lambda tmp: tmp.write_bytes(png), overwrite)
