"""The data sets that come through torchvision: CIFAR-10/100, SVHN, GTSRB and Caltech-256,
downloaded into the data dir (or found there), and any ImageFolder directory.
"""

from __future__ import annotations

import contextlib
import functools
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mlaas.datasets.base import (
    ArrayImageSet,
    DatasetUnavailable,
    ImageSet,
    LoadRequest,
    as_indices,
    at_shape,
    first_line,
    pil_at_shape,
)
from mlaas.images import InputShape

CALTECH256_TEST_FRACTION = 0.2
CALTECH256_SPLIT_SEED = 0
"""Fixed, not the caller's seed: a victim trained with one seed must never see the test
images of a run with another."""

DOWNLOAD_SOCKET_TIMEOUT_S = 30.0
"""torchvision opens its URLs with no timeout; a network that drops packets would hang forever."""


@contextlib.contextmanager
def download_timeout() -> Iterator[None]:
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
        idx = as_indices(indices, len(self))
        out = self._empty() if len(idx) == 0 else np.empty((len(idx), *self.shape.hwc), np.uint8)
        for row, i in enumerate(self.index[idx]):
            image, _ = self.dataset[int(i)]
            out[row] = pil_at_shape(image, self.shape)
        return out


def _unavailable(req: LoadRequest, where: Path, exc: BaseException) -> DatasetUnavailable:
    return DatasetUnavailable(
        f"{req.label} is not under {where} and torchvision could not download it "
        f"({first_line(exc)}). It needs internet access once, or its files placed under the "
        f"data dir in torchvision's layout (the data dir is $MLAAS_DATA_DIR, now {req.data_dir})."
    )


@functools.lru_cache(maxsize=8)
def _torchvision_dataset(name: str, split: str, data_dir: Path) -> Any:
    """Open (downloading if needed) one torchvision data set, once per process."""
    from torchvision import datasets

    with download_timeout():
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


def load_torchvision(req: LoadRequest) -> ImageSet:
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
        return at_shape(ArrayImageSet(req.label, images, labels, classes), req.shape)

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


def load_imagefolder(req: LoadRequest) -> ImageSet:
    from torchvision.datasets import ImageFolder

    path = Path(req.split).expanduser()
    try:
        dataset = ImageFolder(str(path))
    except Exception as exc:
        raise DatasetUnavailable(
            f"cannot read an image folder at {path} ({first_line(exc)}): it must be a "
            "directory with one subdirectory of images per class (torchvision's ImageFolder)."
        ) from exc
    labels = np.asarray(dataset.targets, dtype=np.int64)
    return _VisionImageSet(f"imagefolder:{path}", dataset, req.shape, labels, dataset.classes)
