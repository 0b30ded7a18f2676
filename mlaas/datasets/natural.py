"""``natural-crops``: seeded random crops of the photographs scikit-image and scikit-learn ship,
the offline stand-in for Knockoff Nets' ImageNet queries.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from mlaas.datasets.base import (
    DatasetUnavailable,
    ImageSet,
    LoadRequest,
    as_indices,
    pil_at_shape,
)
from mlaas.images import InputShape

NATURAL_CROPS_DEFAULT_SIZE = 20_000
NATURAL_CROPS_SCALE = (0.1, 1.0)
"""Crop side as a fraction of the photo's shorter side: from details to the whole scene."""
NATURAL_CROPS_ASPECT = (3 / 4, 4 / 3)
NATURAL_CROPS_MIN_SIDE = 8
"""No crop smaller than this many pixels, so that the smallest photos still give content."""


class _NaturalCrops(ImageSet):
    """Item ``i`` is a random crop of a photograph, computed from ``(seed, i)`` alone.

    Knockoff Nets query the victim with ImageNet images; offline, random crops at random
    scales of a few dozen photographs give a comparable spread of natural image statistics
    (textures, edges, objects, colour) without any download. Computing items on demand
    from their own generator makes the set reproducible, free of memory cost at any size,
    and means an item does not depend on which other items share its batch.
    """

    def __init__(self, seed: int, size: int, shape: InputShape, split: str = "all") -> None:
        self.seed = seed
        self.size = size
        self.name = "natural-crops" if split == "all" else f"natural-crops:{split}"
        self.shape = shape
        self.classes = None
        self.labels = None
        self.photos = [photo for _, photo in _natural_photos(split)]
        self.sizes = [(photo.height, photo.width) for photo in self.photos]

    def __len__(self) -> int:
        return self.size

    def crop_box(self, i: int) -> tuple[int, int, int, int, int, bool]:
        """``(photo, top, left, height, width, flip)`` of item ``i``: how it was made."""
        rng = np.random.default_rng([self.seed, i])
        photo = int(rng.integers(len(self.photos)))
        height, width = self.sizes[photo]
        side = rng.uniform(*NATURAL_CROPS_SCALE) * min(height, width)
        aspect = math.exp(rng.uniform(*np.log(NATURAL_CROPS_ASPECT)))
        crop_h = min(height, max(NATURAL_CROPS_MIN_SIDE, round(side / math.sqrt(aspect))))
        crop_w = min(width, max(NATURAL_CROPS_MIN_SIDE, round(side * math.sqrt(aspect))))
        top = int(rng.integers(height - crop_h + 1))
        left = int(rng.integers(width - crop_w + 1))
        flip = bool(rng.random() < 0.5)
        return photo, top, left, crop_h, crop_w, flip

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        idx = as_indices(indices, len(self))
        out = self._empty() if len(idx) == 0 else np.empty((len(idx), *self.shape.hwc), np.uint8)
        for row, i in enumerate(idx):
            photo, top, left, crop_h, crop_w, flip = self.crop_box(int(i))
            box = (left, top, left + crop_w, top + crop_h)
            crop = pil_at_shape(self.photos[photo], self.shape, box)
            out[row] = crop[:, ::-1] if flip else crop
        return out


# ----------------------------------------------------------------------------------------------
# The photographs


def _skimage_photo(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        image = getattr(skimage.data, name)()
        return image[0] if isinstance(image, tuple) else image  # stereo pairs: the left view

    return load


def _sklearn_photo(filename: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(filename)

    return load


# Photographs in the scikit-image wheel (no pooch download) and scikit-learn's two samples.
# Left out: cat (the same photo as chelsea), horse (a binary silhouette), logo and
# colorwheel (graphics), page (a document scan), microaneurysms (102 px, too small),
# and the sets that need a download (eagle, lily, kidney, skin, vortex, ...).
NATURAL_PHOTOS: tuple[tuple[str, Callable[[], np.ndarray]], ...] = (
    *(
        (name, _skimage_photo(name))
        for name in (
            "astronaut",
            "brick",
            "camera",
            "cell",
            "chelsea",
            "clock",
            "coffee",
            "coins",
            "grass",
            "gravel",
            "hubble_deep_field",
            "immunohistochemistry",
            "moon",
            "retina",
            "rocket",
            "stereo_motorcycle",
            "text",
        )
    ),
    ("china", _sklearn_photo("china.jpg")),
    ("flower", _sklearn_photo("flower.jpg")),
)


NATURAL_CROPS_SPLITS = ("all", "photos-a", "photos-b")
"""``photos-a`` and ``photos-b`` split the photographs in two, so that a detector trained on
crops of some photographs can be judged against an attacker who queries crops of the others.
Each half holds both kinds the set has, scenes of things (people, animals, objects) and
textures or microscopy, so that neither half is a different kind of data than the other."""

PHOTOS_A = frozenset(
    {"astronaut", "chelsea", "rocket", "clock", "flower", "brick", "coins", "gravel", "moon",
     "text"}
)  # fmt: skip
"""``photos-a``; ``photos-b`` is the rest."""


def _natural_photos(split: str = "all") -> tuple[tuple[str, Image.Image], ...]:
    photos = _all_natural_photos()
    if split == "all":
        return photos
    if split not in NATURAL_CROPS_SPLITS:
        raise ValueError(f"natural-crops has no split {split!r}")
    # By name, so that a photo that fails to load on one machine moves no other between halves.
    return tuple(
        (name, photo) for name, photo in photos if (name in PHOTOS_A) == (split == "photos-a")
    )


@functools.lru_cache(maxsize=1)
def _all_natural_photos() -> tuple[tuple[str, Image.Image], ...]:
    """Load the photographs once per process as PIL images, grey kept grey.

    Kept as PIL images because making one from an RGB array copies it, and crops of the
    largest photo would otherwise copy its 6 MB for every item.

    A photo that fails to load is skipped rather than failing the set: crops then differ
    from other machines', which is better than no out-of-domain queries at all.
    """
    photos = []
    failures = []
    for name, load in NATURAL_PHOTOS:
        try:
            image = np.asarray(load())
        except Exception as exc:  # a broken optional photo should not sink the whole set
            failures.append(f"{name}: {exc}")
            continue
        if image.dtype != np.uint8:
            failures.append(f"{name}: dtype {image.dtype}")
            continue
        if image.ndim == 3:  # (H, W, 1) to grey, RGBA to RGB
            image = image[..., 0] if image.shape[2] == 1 else image[..., :3]
        photos.append((name, Image.fromarray(np.ascontiguousarray(image))))
    if not photos:
        raise DatasetUnavailable(
            "natural-crops found none of its photographs (they ship with scikit-image and "
            "scikit-learn; reinstall them): " + "; ".join(failures)
        )
    return tuple(photos)


def natural_photo_names(split: str = "all") -> list[str]:
    """Names of the photographs natural-crops (or one of its splits) draws from, in the order
    ``crop_box`` uses."""
    return [name for name, _ in _natural_photos(split)]


def load_natural_crops(req: LoadRequest) -> ImageSet:
    size = NATURAL_CROPS_DEFAULT_SIZE if req.size is None else req.size
    return _NaturalCrops(req.seed, size, req.shape, req.split)
