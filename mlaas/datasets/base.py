"""What every data set shares: the :class:`ImageSet` interface and its generic forms (held in
memory, a subset, converted to another shape), the error for data that is not here, and the
request each data set's loader is handed by :func:`mlaas.datasets.load_dataset`.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mlaas.images import InputShape, as_nhwc, to_shape


class DatasetUnavailable(RuntimeError):
    """A known data set whose files are not here and could not be fetched.

    Distinct from ``ValueError`` (a name that does not exist) so that the CLI can print the
    message, which says what is missing and how to get it, instead of a traceback.
    """


def first_line(exc: BaseException) -> str:
    """``Type: first line``: a failure's cause, short enough to quote in an error message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


@dataclass(frozen=True)
class LoadRequest:
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


# ----------------------------------------------------------------------------------------------
# Image sets


def as_indices(indices: Sequence[int] | np.ndarray, length: int) -> np.ndarray:
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
        return _SubsetImageSet(self, as_indices(indices, len(self)))

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
        return self.images[as_indices(indices, len(self))]

    def subset(self, indices: Sequence[int] | np.ndarray) -> ArrayImageSet:
        """Stays an :class:`ArrayImageSet` so that callers keep direct access to ``images``."""
        idx = as_indices(indices, len(self))
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
        return self.parent.get_batch(self.index[as_indices(indices, len(self))])

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageSet:
        return _SubsetImageSet(self.parent, self.index[as_indices(indices, len(self))])


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


def at_shape(base: ImageSet, shape: InputShape) -> ImageSet:
    """``base`` itself if it already comes at ``shape``, else converted batch by batch."""
    return base if base.shape == shape else _ReshapedImageSet(base, shape)


def pil_at_shape(
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
