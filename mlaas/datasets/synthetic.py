"""``synthetic``: seeded generated images that no camera took (textures and pixel noise)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from mlaas.datasets.base import ImageSet, LoadRequest, as_indices
from mlaas.images import InputShape

SYNTHETIC_DEFAULT_SIZE = 20_000
SYNTHETIC_SPLITS = ("textures", "noise")


class _Synthetic(ImageSet):
    """Item ``i`` is generated from ``(seed, i)`` alone: images no camera took.

    ``textures``: a sine grating at a random angle and frequency, a checkerboard, smooth
    (low-pass) noise at a random scale, or a few Gaussian blobs, in random colours;
    ``noise``: independent uniform pixels. Out-of-distribution queries of another kind than
    photographs, so that a detector trained against photographs is judged on them too.
    """

    def __init__(self, split: str, seed: int, size: int, shape: InputShape) -> None:
        if split not in SYNTHETIC_SPLITS:
            raise ValueError(f"synthetic has no split {split!r}")
        self.split, self.seed, self.size, self.shape = split, seed, size, shape
        self.name = f"synthetic:{split}"
        self.classes = None
        self.labels = None

    def __len__(self) -> int:
        return self.size

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        idx = as_indices(indices, len(self))
        out = self._empty() if len(idx) == 0 else np.empty((len(idx), *self.shape.hwc), np.uint8)
        for row, i in enumerate(idx):
            rng = np.random.default_rng([self.seed, int(i), SYNTHETIC_SPLITS.index(self.split)])
            out[row] = self._make(rng)
        return out

    def _make(self, rng: np.random.Generator) -> np.ndarray:
        height, width, channels = self.shape.hwc
        if self.split == "noise":
            return rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        y, x = y / height, x / width
        kind = int(rng.integers(4))
        if kind == 0:  # a sine grating
            angle, cycles = rng.uniform(0, np.pi), rng.uniform(1.5, 12.0)
            pattern = 0.5 + 0.5 * np.sin(
                2 * np.pi * cycles * (x * np.cos(angle) + y * np.sin(angle)) + rng.uniform(0, 6.3)
            )
        elif kind == 1:  # a checkerboard
            cells = rng.integers(2, 10)
            pattern = ((np.floor(x * cells) + np.floor(y * cells)) % 2).astype(np.float32)
        elif kind == 2:  # smooth noise: a coarse random grid, bicubically enlarged
            grid = int(rng.integers(3, 12))
            coarse = Image.fromarray(rng.uniform(0, 255, (grid, grid)).astype(np.uint8))
            pattern = (
                np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), np.float32)
                / 255
            )
        else:  # a few Gaussian blobs
            pattern = np.zeros((height, width), np.float32)
            for _ in range(int(rng.integers(1, 6))):
                cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
                pattern += np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * r * r))
            pattern = np.clip(pattern, 0, 1)
        low, high = rng.uniform(0, 255, size=(2, channels)).astype(np.float32)
        image = low + pattern[..., None] * (high - low)
        return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def load_synthetic(req: LoadRequest) -> ImageSet:
    size = SYNTHETIC_DEFAULT_SIZE if req.size is None else req.size
    return _Synthetic(req.split, req.seed, size, req.shape)
