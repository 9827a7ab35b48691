"""Pixels from files: Pillow for PNG/JPEG (greyscale or RGB, resized to the domain's size), and the
bundled UCI digits table (64 pixels of 0..16 per line, then the label)."""

from __future__ import annotations

import csv
import gzip
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from multiar.domains.image.analysis import to_png_array

DIGIT_LEVELS = 16  # the digits' pixels count 0..16 on pixels of a 4 x 4 block


def read_digits(path: Path) -> Iterator[tuple[np.ndarray, str]]:
    """(8, 8, 1) pixels in [0, 1] and the label of each line of the digits table."""
    with gzip.open(path, "rt") as f:
        rows = list(csv.reader(f))
    for n, row in enumerate(rows, start=1):
        if len(row) != 65:
            raise ValueError(f"line {n}: expected 64 pixels and a label, got {len(row)} values")
        yield np.asarray(row[:64], dtype=np.float32).reshape(8, 8, 1) / DIGIT_LEVELS, row[64]


def from_bytes(data: bytes, size: int, mode: str) -> np.ndarray:
    """PNG/JPEG bytes as (size, size, C) pixels in [0, 1] (C: 1 for mode L, 3 for RGB)."""
    from PIL import Image as PILImage
    from PIL import UnidentifiedImageError

    try:
        img = PILImage.open(io.BytesIO(data)).convert(mode).resize((size, size))
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"not a readable image ({err})") from None
    return _as_pixels(img, size, mode)


def fit_size(pixels: np.ndarray, size: int, mode: str) -> np.ndarray:
    """Pixels resized to size x size and converted to mode (the bundled digits are 8 x 8 greyscale)."""
    channels = 1 if mode == "L" else 3
    if pixels.shape[:2] == (size, size) and pixels.shape[2] == channels:
        return pixels
    from PIL import Image as PILImage

    img = PILImage.fromarray(to_png_array(pixels)).convert(mode).resize((size, size))
    return _as_pixels(img, size, mode)


def _as_pixels(img, size: int, mode: str) -> np.ndarray:  # noqa: ANN001 (a PIL image, imported lazily)
    channels = 1 if mode == "L" else 3
    return np.asarray(img, dtype=np.float32).reshape(size, size, channels) / 255
