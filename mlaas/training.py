"""The one training loop, shared by the provider's victims and the attacker's substitutes.

Victim and substitute are trained by the same code on purpose: a difference in accuracy between
them then measures the attack (its queries, its labels, its architecture), not two training
loops. Targets are either hard labels or the probability vectors an API returned, so Knockoff
nets' soft-label distillation and a label-only attack differ only in the targets they pass.

Everything is seeded (initialisation is the caller's: seed before :func:`mlaas.models.build_model`;
shuffling, dropout and augmentation are seeded here), so the same seed and data give the same
weights on CPU. On CUDA, cuDNN's kernel choice can still differ from run to run.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from mlaas.images import as_nhwc, to_tensor
from mlaas.models import Classifier

if TYPE_CHECKING:
    from mlaas.datasets import ImageSet

_DEFAULT_LR = {"adam": 2e-3, "sgd": 0.05}
# "adam" is AdamW: decoupled decay, since Adam's coupled L2 is scaled away by its normaliser.
_DEFAULT_WEIGHT_DECAY = {"adam": 1e-2, "sgd": 5e-4}


@dataclass
class TrainConfig:
    """How to train. The defaults train the Fashion-MNIST victim (``cnn-small``) to ~91 % in
    three CPU epochs."""

    epochs: int = 3
    batch_size: int = 128
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float | None = None
    """Peak learning rate; ``None``: 2e-3 for Adam(W), 0.05 for SGD."""
    weight_decay: float | None = None
    """``None``: 1e-2 for AdamW (decoupled), 5e-4 for SGD. Never applied to biases or norms."""
    momentum: float = 0.9
    schedule: Literal["none", "cosine", "onecycle", "step"] = "onecycle"
    """Stepped per batch; ``step`` divides the rate by 10 after each third of the epochs."""
    augment: bool = False
    """Random shifts of up to ``max_shift`` pixels and horizontal flips, per sample."""
    max_shift: int = 2
    seed: int = 0
    device: str = "auto"
    val_fraction: float = 0.0
    """Share of the data held out (seeded) for validation, reported per epoch."""
    patience: int | None = None
    """Stop after this many epochs without improvement on ``monitor``; restore the best weights.
    Needs ``val_fraction > 0``."""
    monitor: Literal["val_loss", "val_accuracy"] = "val_loss"

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, not {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {self.batch_size}")
        if self.optimizer not in _DEFAULT_LR:
            raise ValueError(
                f"optimizer must be one of {sorted(_DEFAULT_LR)}, not {self.optimizer!r}"
            )
        if self.schedule not in ("none", "cosine", "onecycle", "step"):
            raise ValueError(f"unknown schedule {self.schedule!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), not {self.val_fraction}")
        if self.patience is not None and (self.patience < 1 or self.val_fraction == 0.0):
            raise ValueError("early stopping needs patience >= 1 and val_fraction > 0")
        if self.monitor not in ("val_loss", "val_accuracy"):
            raise ValueError(f"monitor must be val_loss or val_accuracy, not {self.monitor!r}")

    @property
    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else _DEFAULT_LR[self.optimizer]

    @property
    def resolved_weight_decay(self) -> float:
        if self.weight_decay is not None:
            return self.weight_decay
        return _DEFAULT_WEIGHT_DECAY[self.optimizer]


@dataclass
class TrainHistory:
    """Per-epoch record of one :func:`fit` call (lists have one entry per epoch run)."""

    train_loss: list[float] = field(default_factory=list)
    train_accuracy: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    """Learning rate at the end of each epoch."""
    seconds: list[float] = field(default_factory=list)
    best_epoch: int | None = None
    """Index of the best epoch on the monitored validation metric (``None`` without validation)."""
    stopped_early: bool = False
    restored_best: bool = False
    device: str = "cpu"

    @property
    def epochs(self) -> int:
        return len(self.train_loss)

    @property
    def total_seconds(self) -> float:
        return float(sum(self.seconds))

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "epochs": self.epochs, "total_seconds": self.total_seconds}


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto``: CUDA when available, else Apple's MPS, else CPU; otherwise ``spec`` as given."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {spec!r} was asked for but CUDA is not available here")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def split_validation(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The seeded train/validation index split :func:`fit` uses (sorted index arrays)."""
    if fraction <= 0.0:
        return np.arange(n), np.arange(0)
    n_val = max(1, round(n * fraction))
    if n_val >= n:
        raise ValueError(f"val_fraction {fraction} leaves no training data out of {n} samples")
    perm = np.random.default_rng([seed, 0x5EED]).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


# --------------------------------------------------------------------------- data access


class _Source:
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
            array = getattr(images, "images", None)
            self._array = as_nhwc(array) if isinstance(array, np.ndarray) else None
            self._set = images
        self.n = len(images)

    def batch(self, indices: np.ndarray) -> np.ndarray:
        if self._array is not None:
            return self._array[indices]
        assert self._set is not None
        return np.asarray(self._set.get_batch(indices))


def _batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def _prepare_targets(targets: np.ndarray, n: int, num_classes: int) -> torch.Tensor:
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


def _hard(targets: torch.Tensor) -> torch.Tensor:
    return targets if targets.ndim == 1 else targets.argmax(dim=1)


# --------------------------------------------------------------------------- augmentation


def augment_batch(x: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Per-sample random integer shift (up to ``max_shift`` px, zero fill) and horizontal flip.

    One ``affine_grid``/``grid_sample`` call for the whole batch; parameters come from a CPU
    ``generator`` so the result is seeded on any device. Integer shifts with
    ``align_corners=False`` land on pixel centres, so no blur is introduced.
    """
    n, _, h, w = x.shape
    shifts = torch.randint(-max_shift, max_shift + 1, (n, 2), generator=generator).float()
    flips = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = flips
    theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = shifts[:, 0] * 2.0 / w
    theta[:, 1, 2] = shifts[:, 1] * 2.0 / h
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


# --------------------------------------------------------------------------- optimisation


def _make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": config.resolved_weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if config.optimizer == "adam":
        return torch.optim.AdamW(groups, lr=config.resolved_lr)
    return torch.optim.SGD(groups, lr=config.resolved_lr, momentum=config.momentum, nesterov=True)


def _make_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    total = config.epochs * steps_per_epoch
    # One-cycle needs a few steps per phase; tiny runs (a checkpoint of 100 answers) anneal.
    if config.schedule == "onecycle" and total >= 8:
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.resolved_lr, total_steps=total, pct_start=0.25
        )
    if config.schedule in ("cosine", "onecycle"):
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total))
    if config.schedule == "step":
        step = max(1, math.ceil(config.epochs / 3)) * steps_per_epoch
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=step, gamma=0.1)
    return None


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
    source = _Source(images)
    target_tensor = _prepare_targets(targets, source.n, model.num_classes)
    idx = np.arange(source.n) if indices is None else np.asarray(indices)
    dev = _model_device(model) if device is None else torch.device(device)
    was_training = model.training
    model.eval()
    model.to(dev)
    total_loss, correct = 0.0, 0
    try:
        for part in _batches(len(idx), batch_size):
            batch_idx = idx[part]
            x = to_tensor(source.batch(batch_idx), dev)
            y = target_tensor[batch_idx].to(dev)
            logits = model(x)
            total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(dim=1) == _hard(y)).sum())
    finally:
        model.train(was_training)
    count = max(1, len(idx))
    return total_loss / count, correct / count


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
    )


def _improved(value: float, best: float | None, monitor: str) -> bool:
    if best is None:
        return True
    return value < best if monitor == "val_loss" else value > best


def fit(
    model: Classifier,
    images: ImageSet | np.ndarray,
    targets: np.ndarray,
    config: TrainConfig,
    *,
    progress: bool = True,
    description: str = "training",
) -> TrainHistory:
    """Train ``model`` in place on ``images`` (uint8 ``(N, H, W, C)`` or an ImageSet).

    ``targets``: int64 ``(N,)`` hard labels, or float ``(N, K)`` probability vectors (rows are
    normalised, so truncated top-k answers are fine). The model is left on the training device
    in eval mode; with ``patience`` it holds the best weights seen on the validation split.
    """
    seed_everything(config.seed)
    device = resolve_device(config.device)
    source = _Source(images)
    target_tensor = _prepare_targets(targets, source.n, model.num_classes)
    train_idx, val_idx = split_validation(source.n, config.val_fraction, config.seed)
    if len(train_idx) == 0:
        raise ValueError("no training data")

    model.to(device)
    optimizer = _make_optimizer(model, config)
    steps_per_epoch = math.ceil(len(train_idx) / config.batch_size)
    scheduler = _make_scheduler(optimizer, config, steps_per_epoch)
    shuffle_rng = np.random.default_rng([config.seed, 1])
    augment_gen = torch.Generator().manual_seed(config.seed)
    history = TrainHistory(device=str(device))
    best_score: float | None = None
    best_state: dict[str, torch.Tensor] | None = None
    epochs_since_best = 0

    with _progress_bar(progress) as bar:
        for epoch in range(config.epochs):
            started = time.perf_counter()
            model.train()
            task = bar.add_task(
                f"{description} {epoch + 1}/{config.epochs}", total=steps_per_epoch, stats=""
            )
            order = train_idx[shuffle_rng.permutation(len(train_idx))]
            loss_sum, correct, seen = 0.0, 0, 0
            for part in _batches(len(order), config.batch_size):
                # Sorted within the batch: same sample set, friendlier to disk-backed sets.
                batch_idx = np.sort(order[part])
                if len(batch_idx) == 1 and steps_per_epoch > 1:
                    continue  # BatchNorm cannot train on a single sample
                x = to_tensor(source.batch(batch_idx), device)
                y = target_tensor[batch_idx].to(device, non_blocking=True)
                if config.augment:
                    x = augment_batch(x, augment_gen, config.max_shift)
                logits = model(x)
                loss = F.cross_entropy(logits, y)  # probability targets: soft cross-entropy
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                k = len(batch_idx)
                loss_sum += float(loss.detach()) * k
                correct += int((logits.detach().argmax(dim=1) == _hard(y)).sum())
                seen += k
                bar.update(
                    task, advance=1, stats=f"loss {loss_sum / seen:.4f} acc {correct / seen:.3f}"
                )
            history.train_loss.append(loss_sum / max(1, seen))
            history.train_accuracy.append(correct / max(1, seen))
            history.lr.append(float(optimizer.param_groups[0]["lr"]))

            if len(val_idx):
                val_loss, val_acc = evaluate(
                    model, images, targets, indices=val_idx, batch_size=max(512, config.batch_size)
                )
                history.val_loss.append(val_loss)
                history.val_accuracy.append(val_acc)
                score = val_loss if config.monitor == "val_loss" else val_acc
                if _improved(score, best_score, config.monitor):
                    best_score, history.best_epoch, epochs_since_best = score, epoch, 0
                    if config.patience is not None:
                        best_state = copy.deepcopy(model.state_dict())
                else:
                    epochs_since_best += 1
                bar.update(
                    task,
                    stats=f"loss {history.train_loss[-1]:.4f} acc {history.train_accuracy[-1]:.3f}"
                    f" | val loss {val_loss:.4f} acc {val_acc:.3f}",
                )
            history.seconds.append(time.perf_counter() - started)
            if config.patience is not None and epochs_since_best >= config.patience:
                history.stopped_early = epoch < config.epochs - 1
                break

    if best_state is not None and history.best_epoch != history.epochs - 1:
        model.load_state_dict(best_state)
        history.restored_best = True
    model.eval()
    return history


@torch.no_grad()
def predict_logits(
    model: Classifier,
    images: ImageSet | np.ndarray,
    *,
    batch_size: int = 512,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """Raw logits, float32 ``(N, K)``, in eval mode (the model's training flag is restored)."""
    source = _Source(images)
    dev = _model_device(model) if device is None else torch.device(device)
    model.to(dev)
    was_training = model.training
    model.eval()
    out = np.empty((source.n, model.num_classes), dtype=np.float32)
    try:
        for part in _batches(source.n, batch_size):
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


__all__ = [
    "TrainConfig",
    "TrainHistory",
    "accuracy",
    "augment_batch",
    "evaluate",
    "fit",
    "predict_logits",
    "predict_proba",
    "resolve_device",
    "seed_everything",
    "split_validation",
]
