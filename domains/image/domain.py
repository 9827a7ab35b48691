"""Images as sequences of patches: each p x p patch becomes the index of its nearest code in a k-means
codebook learned on training patches, in raster order; decoding maps codes back to patches. Pillow reads
PNG/JPEG (greyscale or RGB, resized to `size`); the bundled corpus is the UCI handwritten digits, whose
label is a header field (`data.tags=header:label` trains a class-conditional model)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
import torch

from multiar.domain import DomainBase, GenerateOption
from multiar.domains.image import analysis, outputs, pixels_io, state
from multiar.engine.sampling import LogitsProcessor

SPECIALS = ("<pad>", "<bos>", "<eos>")
CORPORA = {"digits": "digits/digits.csv.gz"}


@dataclass
class Image:
    """A record and an artifact: pixels (H, W, C) in [0, 1], and the label where the source gives one."""

    pixels: np.ndarray
    label: str | None = None


class ImageDomain(DomainBase):
    name = "image"
    suffixes = (".png", ".jpg", ".jpeg", ".csv.gz")
    unit = "pixel"
    tokenizer_files = ("codebook.safetensors",)  # the codebook decides the ids
    filter_keys: tuple[str, ...] = ()  # assessed (labels, copies, grid.png), with no sample filters
    generate_options = {
        "prompt_rows": GenerateOption(
            int, None, "keep only the prompt image's first N pixel rows (whole patch rows) and complete it"
        )
    }

    def __init__(self, size: int = 8, patch: int = 2, codebook_size: int = 128, mode: str = "L") -> None:
        if mode not in ("L", "RGB"):
            raise ValueError(f"mode must be L (greyscale) or RGB, got {mode!r}")
        if size < 1 or patch < 1 or size % patch:
            raise ValueError(f"size ({size}) must be a positive multiple of patch ({patch})")
        if codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2, got {codebook_size}")
        self.size, self.patch, self.codebook_size, self.mode = size, patch, codebook_size, mode
        self.channels = 1 if mode == "L" else 3
        self.codebook: np.ndarray | None = None  # (K, p*p*C)
        self.labels: list[str] = []  # the classifier's classes, as the header field spells them
        self.classifier: analysis.Classifier | None = None
        self.training: np.ndarray | None = None  # (N, H, W, C) training images: the nearest-copy metric
        self.pad_id, self.bos_id, self.eos_id = range(len(SPECIALS))

    @property
    def vocab_size(self) -> int:
        return len(SPECIALS) + (len(self.codebook) if self.codebook is not None else self.codebook_size)

    @property
    def patches_per_image(self) -> int:
        return (self.size // self.patch) ** 2

    def default_paths(self, corpus: str | None = None) -> list[Path]:
        name = corpus or "digits"
        if name not in CORPORA:
            raise ValueError(f"unknown corpus {name!r}: choose {', '.join(CORPORA)}")
        return [Path(str(files("multiar.domains.image") / "assets" / CORPORA[name]))]

    def read(self, path: Path) -> Iterator[Image]:
        if path.name.lower().endswith(".csv.gz"):  # the digits table: 64 pixels of 0..16, then the label
            for pixels, label in pixels_io.read_digits(path):
                yield Image(pixels_io.fit_size(pixels, self.size, self.mode), label)
            return
        yield Image(pixels_io.from_bytes(path.read_bytes(), self.size, self.mode))

    def from_value(self, value: Any, key: str) -> Image:
        if isinstance(value, (bytes, bytearray)):
            return Image(pixels_io.from_bytes(bytes(value), self.size, self.mode))
        if isinstance(value, str) and Path(value).is_file():
            return Image(pixels_io.from_bytes(Path(value).read_bytes(), self.size, self.mode))
        raise ValueError(f"{key}: expected PNG/JPEG bytes or a path, got {type(value).__name__}")

    def fields(self, record: Image) -> dict[str, str]:
        return {"label": record.label} if record.label is not None else {}

    def content(self, record: Image) -> bytes:
        return (record.pixels * 255).round().astype(np.uint8).tobytes()

    def units(self, record: Image) -> int:
        return self.size * self.size

    def fit(self, records: Iterable[Image]) -> None:
        """The codebook (k-means on the training patches), the training images, and the classifier where
        the training images carry labels."""
        images = list(records)
        pixels = np.stack([r.pixels for r in images])
        self.codebook = analysis.kmeans(
            np.concatenate([analysis.patches(p, self.patch) for p in pixels]), self.codebook_size
        )
        self.training = np.round(pixels * 255) / 255  # as the run stores them (8 bits): equal figures
        labelled = [r.label for r in images if r.label is not None]
        if len(labelled) == len(images) and len(set(labelled)) > 1:
            self.labels = sorted(set(labelled), key=lambda t: (len(t), t))
            index = {t: i for i, t in enumerate(self.labels)}
            self.classifier = analysis.train_classifier(
                pixels, [index[t] for t in labelled], len(self.labels)
            )

    def _codes(self) -> np.ndarray:
        if self.codebook is None:
            raise RuntimeError("the image codebook is not learned yet: call fit() on training images first")
        return self.codebook

    def encode(self, record: Image) -> list[int]:
        codes = analysis.nearest(analysis.patches(record.pixels, self.patch), self._codes())
        return [len(SPECIALS) + int(c) for c in codes]

    def prompt_ids(self, prompt: str | None, prompt_rows: int | None = None) -> list[int]:
        """BOS, then the codes of an image file's patches in raster order; prompt_rows: only those of its
        first rows (rounded up to whole patch rows), so the model completes the rest."""
        if not prompt:
            return [self.bos_id]
        path = Path(prompt).expanduser()
        if not path.is_file():
            raise ValueError(f"{path}: no such image file")
        codes = self.encode(next(self.read(path)))
        if prompt_rows is not None:
            if not 1 <= prompt_rows < self.size:
                raise ValueError(f"prompt_rows={prompt_rows}: must be in 1..{self.size - 1}")
            codes = codes[: -(-prompt_rows // self.patch) * (self.size // self.patch)]
        return [self.bos_id, *codes]

    def decode(self, ids: list[int]) -> tuple[Image, int]:
        codes = self._codes()
        keep = [i - len(SPECIALS) for i in ids if len(SPECIALS) <= i < len(SPECIALS) + len(codes)]
        n = self.patches_per_image
        dropped = len(ids) - min(len(keep), n)  # specials and codes past the image; missing patches are blank
        keep = (keep + [int(analysis.nearest(np.zeros((1, codes.shape[1])), codes)[0])] * n)[:n]  # blank fill
        return Image(analysis.unpatch(codes[keep], self.size, self.patch, self.channels)), dropped

    def constraint(self) -> LogitsProcessor | None:
        """Exactly one image: codes until the image holds all its patches, then EOS only."""
        n, first, last = self.patches_per_image, len(SPECIALS), self.vocab_size

        def processor(ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
            done = ((ids >= first) & (ids < last)).sum(dim=1)  # codes so far per row
            full = done >= n
            logits[~full, self.eos_id] = float("-inf")
            logits[full, :] = logits[full, :].masked_fill(
                torch.arange(logits.size(-1), device=logits.device) != self.eos_id, float("-inf")
            )
            return logits

        return processor

    def write(
        self,
        artifacts: Sequence[Image],
        out_dir: Path,
        provenance: dict,
        overwrite: bool = False,
        start: int = 0,
        details: Sequence[dict] | None = None,
    ) -> list[Path]:
        """sample_NNN.png per sample (the run, seed and settings in a PNG text chunk)."""
        return outputs.write_pngs([a.pixels for a in artifacts], out_dir, provenance, overwrite, start)

    def metrics(self, artifacts: Sequence[Image]) -> dict[str, float]:
        out: dict[str, float] = {}
        if not artifacts:
            return out
        samples = np.stack([a.pixels for a in artifacts])
        out["image/mean_intensity"] = float(samples.mean())
        if self.training is not None:
            distance = analysis.nearest_distances(samples, self.training)
            out["image/nearest_distance_mean"] = float(distance.mean())
            out["image/copy_share"] = float((distance < analysis.COPY_DISTANCE).mean())
        if self.classifier is not None:
            _, confidence = analysis.classify(self.classifier, samples)
            out["image/confident_share"] = float((confidence >= analysis.CONFIDENT).mean())
        return out

    def metric_summary(self) -> outputs.ImageSummary:
        return outputs.ImageSummary()

    def assess(
        self, artifacts: Sequence[Image], details: list[dict], settings: dict, start: int = 0
    ) -> dict[str, float]:
        """Per sample: the classifier's label and confidence, the distance to the nearest training image;
        for samples asked for a label (tags=label=N): the share the classifier labels so."""
        if not artifacts:
            return {}
        samples = np.stack([a.pixels for a in artifacts])
        distance = analysis.nearest_distances(samples, self.training) if self.training is not None else None
        labels, confidence = (
            analysis.classify(self.classifier, samples) if self.classifier is not None else (None, None)
        )
        asked = []
        for i, d in enumerate(details):
            if distance is not None:
                d["nearest_distance"] = round(float(distance[i]), 4)
            if labels is not None:
                d["label"], d["confidence"] = self.labels[int(labels[i])], round(float(confidence[i]), 3)
                wanted = [
                    t.split("=", 1)[1] for t in str(d.get("tags", "")).split(",") if t.startswith("label=")
                ]
                if wanted:
                    asked.append(d["label"] == wanted[0] and confidence[i] >= analysis.CONFIDENT)
        return {"image/label_as_asked": sum(asked) / len(asked)} if asked else {}

    def report(
        self,
        artifacts: Sequence[Image],
        details: Sequence[dict],
        out_dir: Path,
        overwrite: bool,
        provenance: dict | None = None,
    ) -> list[Path]:
        """grid.png: every sample of the run side by side."""
        if not artifacts:
            return []
        return [analysis.write_grid([a.pixels for a in artifacts], Path(out_dir) / "grid.png", overwrite)]

    def save(self, directory: Path) -> None:
        settings = {
            "size": self.size,
            "patch": self.patch,
            "codebook_size": self.codebook_size,
            "mode": self.mode,
        }
        state.save(Path(directory), settings, self.labels, self._codes(), self.training, self.classifier)

    @classmethod
    def load(cls, directory: Path) -> ImageDomain:
        settings, labels, codebook, training, weights = state.load(Path(directory))
        domain = cls(**settings)
        domain.codebook, domain.training = codebook, training
        if weights and labels:
            domain.labels = labels
            domain.classifier = analysis.Classifier(domain.size * domain.size * domain.channels, len(labels))
            domain.classifier.load_state_dict(weights)
            domain.classifier.eval()
        return domain
