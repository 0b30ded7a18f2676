"""Training the provider's victim model: what ``mlaas victim train`` runs."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from mlaas.datasets import ImageSet, dataset_splits, load_dataset, native_shape
from mlaas.images import InputShape
from mlaas.models import build_model, min_input_size
from mlaas.modelstore import ModelCard, save_model
from mlaas.training import TrainConfig, accuracy, fit, resolve_device, seed_everything


def default_shape(dataset: str, arch: str) -> InputShape:
    """The data set's own shape, enlarged where the architecture needs more pixels."""
    shape = native_shape(dataset)
    smallest = min_input_size(arch)
    if shape.height >= smallest and shape.width >= smallest:
        return shape
    return InputShape(shape.channels, max(shape.height, smallest), max(shape.width, smallest))


def channel_stats(
    images: ImageSet, sample: int = 5000, seed: int = 0
) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of (a seeded sample of) the training images, in [0, 1]."""
    rng = np.random.default_rng(seed)
    indices = rng.permutation(len(images))[:sample]
    pixels = images.get_batch(np.sort(indices)).astype(np.float64) / 255.0
    flat = pixels.reshape(-1, pixels.shape[-1])
    return flat.mean(axis=0).tolist(), np.maximum(flat.std(axis=0), 1e-3).tolist()


def split_train_test(dataset: str, shape: InputShape, seed: int) -> tuple[ImageSet, ImageSet]:
    """The data set's train and test splits, or a seeded 85/15 split where it has none."""
    if ":" not in dataset and {"train", "test"} <= set(dataset_splits(dataset)):
        return (
            load_dataset(f"{dataset}:train", shape, seed=seed),
            load_dataset(f"{dataset}:test", shape, seed=seed),
        )
    whole = load_dataset(dataset, shape, seed=seed)
    if whole.labels is None:
        raise ValueError(f"{dataset} has no labels: a victim cannot be trained on it")
    order = np.random.default_rng(seed).permutation(len(whole))
    cut = int(len(whole) * 0.85)
    return whole.subset(np.sort(order[:cut])), whole.subset(np.sort(order[cut:]))


def train_victim(
    out: Path,
    *,
    dataset: str = "fashion-mnist",
    arch: str = "cnn-small",
    config: TrainConfig | None = None,
    shape: InputShape | None = None,
    pretrained: str | None = None,
    name: str | None = None,
    train_size: int | None = None,
    progress: bool = True,
) -> ModelCard:
    """Train a victim and save it with its model card into ``out``.

    ``train_size`` trains on a seeded subset (for quick trials); the test split stays whole.
    """
    config = config or TrainConfig()
    device = resolve_device(config.device)
    seed_everything(config.seed)
    shape = shape or default_shape(dataset, arch)
    train_set, test_set = split_train_test(dataset, shape, config.seed)
    if train_size is not None and train_size < len(train_set):
        chosen = np.random.default_rng(config.seed).choice(
            len(train_set), train_size, replace=False
        )
        train_set = train_set.subset(np.sort(chosen))
    if train_set.classes is None or train_set.labels is None or test_set.labels is None:
        raise ValueError(f"{dataset} has no class labels: a victim cannot be trained on it")
    mean = std = None
    if pretrained is None:
        mean, std = channel_stats(train_set, seed=config.seed)
    model = build_model(
        arch, len(train_set.classes), shape, pretrained=pretrained, mean=mean, std=std
    )
    started = time.perf_counter()
    fit(
        model,
        train_set,
        train_set.labels,
        replace(config, device=str(device)),
        progress=progress,
        description=f"victim {arch} on {dataset}",
    )
    seconds = time.perf_counter() - started
    test_accuracy = accuracy(model, test_set, test_set.labels, device=device)
    card = ModelCard(
        name=name or f"{dataset.split(':')[0]}-{arch}",
        architecture=arch,
        dataset=dataset,
        num_classes=len(train_set.classes),
        classes=list(train_set.classes),
        input_shape=str(shape),
        mean=model.mean.flatten().tolist(),
        std=model.std.flatten().tolist(),
        pretrained=pretrained,
        test_accuracy=test_accuracy,
        seed=config.seed,
        epochs=config.epochs,
        training_seconds=round(seconds, 2),
        num_parameters=sum(p.numel() for p in model.parameters()),
        torch_version=torch.__version__,
    )
    save_model(out, model.cpu(), card)
    return card
