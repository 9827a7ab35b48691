"""What a run of image samples writes: sample_NNN.png per sample (provenance in a PNG text chunk), and
grid.png of the first samples, drawn once at the end from the running summary."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from multiar.domain import Domain, MetricSummary
from multiar.domains.image.analysis import to_png_array, write_grid
from multiar.files import safe_child, write_new_file


def write_pngs(
    images: Sequence[np.ndarray], out_dir: Path, provenance: dict, overwrite: bool, start: int
) -> list[Path]:
    """sample_NNN.png for each (H, W, C) image from number `start` on, each written once, atomically."""
    from PIL import Image as PILImage
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("multiar", json.dumps(provenance, default=str))
    paths = []
    for i, pixels in enumerate(images):
        array = to_png_array(pixels)
        path = safe_child(Path(out_dir), f"sample_{start + i:03d}.png")
        save = lambda tmp, a=array: PILImage.fromarray(a).save(tmp, "PNG", pnginfo=info)  # noqa: E731
        paths.append(write_new_file(path, save, overwrite))
    return paths


class ImageSummary(MetricSummary):
    """The image metrics (means over samples: batch means are exact) and the grid of the first
    GRID samples, drawn once at the end."""

    GRID = 64

    def __init__(self) -> None:
        super().__init__()
        self.first: list[np.ndarray] = []

    def add(self, domain: Domain, artifacts: Sequence, details: Sequence[dict]) -> None:
        self.first += [a.pixels for a in artifacts[: self.GRID - len(self.first)]]
        super().add(domain, artifacts, details)

    def files(self, domain: Domain, out_dir: Path, overwrite: bool, provenance: dict) -> list[Path]:
        """grid.png: the first GRID samples side by side (every sample of a run of up to GRID)."""
        return [write_grid(self.first, Path(out_dir) / "grid.png", overwrite)] if self.first else []
