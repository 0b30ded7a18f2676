"""Running a classifier over images: logits, probabilities, accuracy and loss, in batches.

The batch access here (:class:`ImageSource`, :func:`batch_slices`, :func:`prepare_targets`) is
also how :func:`mlaas.training.fit` reads its images and targets, so that its validation
figures and :func:`evaluate`'s come from the same checks and conversions.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from mlaas.images import as_nhwc, to_tensor
from mlaas.models import Classifier

if TYPE_CHECKING:
    from mlaas.datasets import ImageSet

__all__ = ["accuracy", "evaluate", "predict_logits", "predict_proba"]


class ImageSource:
    """Uniform ``uint8 (n, H, W, C)`` batches from an array or an :class:`ImageSet`."""

    def __init__(self, images: ImageSet | np.ndarray) -> None:
        if isinstance(images, np.ndarray):
            array = as_nhwc(images)
            if array.dtype != np.uint8:
                raise ValueError(f"images must be uint8 (N, H, W, C), not {array.dtype}")
            self._array: np.ndarray | None = array
            self._set = None
        else:
            # An in-memory set exposes its array: index it directly instead of per-batch calls.
            held = getattr(images, "images", None)
            self._array = as_nhwc(held) if isinstance(held, np.ndarray) else None
            self._set = images
        self.n = len(images)

    def batch(self, indices: np.ndarray) -> np.ndarray:
        if self._array is not None:
            return self._array[indices]
        assert self._set is not None
        return np.asarray(self._set.get_batch(indices))


def batch_slices(n: int, batch_size: int) -> Iterator[slice]:
    """Consecutive slices of at most ``batch_size`` covering ``range(n)``."""
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def prepare_targets(targets: np.ndarray, n: int, num_classes: int) -> torch.Tensor:
    """Hard labels as int64 ``(N,)``; soft labels as row-normalised float32 ``(N, K)``."""
    targets = np.asarray(targets)
    if len(targets) != n:
        raise ValueError(f"{n} images but {len(targets)} targets")
    if targets.ndim == 1:
        if not np.issubdtype(targets.dtype, np.integer):
            raise ValueError(f"hard labels must be integers, not {targets.dtype}")
        if n and (targets.min() < 0 or targets.max() >= num_classes):
            raise ValueError(
                f"labels must lie in [0, {num_classes}), got {targets.min()}..{targets.max()}"
            )
        return torch.from_numpy(targets.astype(np.int64))
    if targets.ndim == 2:
        if targets.shape[1] != num_classes:
            raise ValueError(
                f"soft labels have {targets.shape[1]} classes, the model has {num_classes}"
            )
        soft = targets.astype(np.float32)
        if not np.isfinite(soft).all() or (soft < 0).any():
            raise ValueError("soft labels must be finite and non-negative")
        sums = soft.sum(axis=1, keepdims=True)
        if (sums <= 0).any():
            raise ValueError("every soft-label row needs positive mass")
        # Truncated answers (top-k, rounded) need not sum to 1; cross-entropy wants distributions.
        return torch.from_numpy(soft / sums)
    raise ValueError(f"targets must be (N,) labels or (N, K) probabilities, got {targets.shape}")


def hard_labels(targets: torch.Tensor) -> torch.Tensor:
    """The class each target names: hard labels as they are, soft ones by their argmax."""
    return targets if targets.ndim == 1 else targets.argmax(dim=1)


@torch.no_grad()
def evaluate(
    model: Classifier,
    images: ImageSet | np.ndarray,
    targets: np.ndarray,
    *,
    indices: np.ndarray | None = None,
    batch_size: int = 512,
    device: torch.device | str | None = None,
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (agreement with the targets' argmax) in eval mode."""
    source = ImageSource(images)
    target_tensor = prepare_targets(targets, source.n, model.num_classes)
    idx = np.arange(source.n) if indices is None else np.asarray(indices)
    dev = _model_device(model) if device is None else torch.device(device)
    was_training = model.training
    model.eval()
    model.to(dev)
    total_loss, correct = 0.0, 0
    try:
        for part in batch_slices(len(idx), batch_size):
            batch_idx = idx[part]
            x = to_tensor(source.batch(batch_idx), dev)
            y = target_tensor[batch_idx].to(dev)
            logits = model(x)
            total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(dim=1) == hard_labels(y)).sum())
    finally:
        model.train(was_training)
    count = max(1, len(idx))
    return total_loss / count, correct / count


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def predict_logits(
    model: Classifier,
    images: ImageSet | np.ndarray,
    *,
    batch_size: int = 512,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """Raw logits, float32 ``(N, K)``, in eval mode (the model's training flag is restored)."""
    source = ImageSource(images)
    dev = _model_device(model) if device is None else torch.device(device)
    model.to(dev)
    was_training = model.training
    model.eval()
    out = np.empty((source.n, model.num_classes), dtype=np.float32)
    try:
        for part in batch_slices(source.n, batch_size):
            x = to_tensor(source.batch(np.arange(part.start, part.stop)), dev)
            out[part] = model(x).float().cpu().numpy()
    finally:
        model.train(was_training)
    return out


def predict_proba(
    model: Classifier,
    images: ImageSet | np.ndarray,
    *,
    batch_size: int = 512,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """Softmax probabilities, float32 ``(N, K)``."""
    logits = torch.from_numpy(predict_logits(model, images, batch_size=batch_size, device=device))
    return torch.softmax(logits, dim=1).numpy()


def accuracy(
    model: Classifier,
    images: ImageSet | np.ndarray,
    labels: np.ndarray,
    *,
    batch_size: int = 512,
    device: torch.device | str | None = None,
) -> float:
    """Share of ``images`` whose top-1 prediction equals ``labels`` (or their argmax if soft)."""
    labels = np.asarray(labels)
    if labels.ndim == 2:
        labels = labels.argmax(axis=1)
    logits = predict_logits(model, images, batch_size=batch_size, device=device)
    if len(labels) != len(logits):
        raise ValueError(f"{len(logits)} images but {len(labels)} labels")
    return float((logits.argmax(axis=1) == labels).mean()) if len(labels) else 0.0
