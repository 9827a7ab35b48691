"""What the image domain learns and reports beside its tokens: the k-means codebook of patches, a small
classifier trained on the training split (in torch), the distance of a sample to its nearest training
image (copies), and the grid of samples."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from multiar.files import write_new_file

COPY_DISTANCE = 0.05  # RMS pixel distance (pixels in [0, 1]) under which a sample is a copy
CONFIDENT = 0.9  # classifier probability above which a sample "looks like" a digit of its label


def patches(pixels: np.ndarray, patch: int) -> np.ndarray:
    """(H, W, C) pixels -> (H/p * W/p, p*p*C) patches in raster order."""
    h, w, c = pixels.shape
    grid = pixels.reshape(h // patch, patch, w // patch, patch, c).transpose(0, 2, 1, 3, 4)
    return grid.reshape(-1, patch * patch * c)


def unpatch(rows: np.ndarray, size: int, patch: int, channels: int) -> np.ndarray:
    """(n, p*p*C) patches in raster order -> (size, size, C) pixels."""
    n = size // patch
    grid = rows.reshape(n, n, patch, patch, channels).transpose(0, 2, 1, 3, 4)
    return grid.reshape(size, size, channels)


def kmeans(points: np.ndarray, k: int, iterations: int = 25, seed: int = 0) -> np.ndarray:
    """k centres of points (N, D) by Lloyd's algorithm from a k-means++ start (fixed seed: the same
    codebook from the same patches); fewer distinct points than k keeps them all."""
    x = torch.as_tensor(np.unique(points, axis=0), dtype=torch.float32)
    if len(x) <= k:
        return x.numpy()
    g = torch.Generator().manual_seed(seed)
    centres = x[torch.randint(len(x), (1,), generator=g)]
    for _ in range(k - 1):  # k-means++: the next centre far from the chosen ones
        d = torch.cdist(x, centres).min(dim=1).values ** 2
        centres = torch.cat([centres, x[torch.multinomial(d / d.sum(), 1, generator=g)]])
    weights = torch.as_tensor(points, dtype=torch.float32)
    for _ in range(iterations):
        nearest = torch.cdist(weights, centres).argmin(dim=1)
        sums = torch.zeros_like(centres).index_add_(0, nearest, weights)
        counts = torch.bincount(nearest, minlength=k).float()[:, None]
        centres = torch.where(counts > 0, sums / counts.clamp(min=1), centres)  # an empty code stays
    return centres.numpy()


def nearest(points: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Index of the nearest centre of each point."""
    return (
        torch.cdist(torch.as_tensor(points, dtype=torch.float32), torch.as_tensor(centres)).argmin(1).numpy()
    )


class Classifier(nn.Module):
    """A small MLP over flattened pixels: what a user would trust to say which digit a sample shows."""

    def __init__(self, inputs: int, classes: int, hidden: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


def train_classifier(images: np.ndarray, labels: Sequence[int], classes: int, steps: int = 200) -> Classifier:
    """The classifier fitted on training images (N, H, W, C) and their labels (full batch Adam, seed 0)."""
    torch.manual_seed(0)
    model = Classifier(int(np.prod(images.shape[1:])), classes)
    x, y = torch.as_tensor(images, dtype=torch.float32), torch.as_tensor(list(labels))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def classify(model: Classifier, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(label index, probability) per image."""
    probs = model(torch.as_tensor(images, dtype=torch.float32)).softmax(-1)
    best = probs.max(dim=-1)
    return best.indices.numpy(), best.values.numpy()


def nearest_distances(samples: np.ndarray, training: np.ndarray) -> np.ndarray:
    """RMS pixel distance of each sample (N, H, W, C) to its nearest training image (M, H, W, C)."""
    a = torch.as_tensor(samples, dtype=torch.float32).flatten(1)
    b = torch.as_tensor(training, dtype=torch.float32).flatten(1)
    return (torch.cdist(a, b).min(dim=1).values / a.size(1) ** 0.5).numpy()


def to_png_array(pixels: np.ndarray, scale: int = 1) -> np.ndarray:
    """(H, W, C) floats in [0, 1] -> uint8 (H*scale, W*scale[, 3]) for Pillow."""
    img = (np.clip(pixels, 0, 1) * 255).round().astype(np.uint8)
    img = img.repeat(scale, axis=0).repeat(scale, axis=1)
    return img[..., 0] if img.shape[-1] == 1 else img


def write_grid(images: Sequence[np.ndarray], path: Path, overwrite: bool, scale: int = 4) -> Path:
    """grid.png: every sample side by side, rows of up to 8, a 1-pixel gap between them."""
    from PIL import Image as PILImage

    cols = min(8, len(images))
    rows = -(-len(images) // cols)
    h, w, c = images[0].shape
    canvas = np.ones(((h + 1) * rows - 1, (w + 1) * cols - 1, c), dtype=np.float32)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        canvas[r * (h + 1) : r * (h + 1) + h, q * (w + 1) : q * (w + 1) + w] = img
    array = to_png_array(canvas, scale)
    return write_new_file(path, lambda tmp: PILImage.fromarray(array).save(tmp, format="PNG"), overwrite)
