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

from mlaas.images import to_tensor
from mlaas.models import Classifier

# Evaluation and prediction live in mlaas.predict; they stay importable from here, where
# callers have always found them next to fit.
from mlaas.predict import (
    ImageSource,
    accuracy,
    batch_slices,
    evaluate,
    hard_labels,
    predict_logits,
    predict_proba,
    prepare_targets,
)

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
    distill: Literal["probs", "logits"] = "probs"
    """What the model learns from probability targets: ``probs``, their cross-entropy (Knockoff
    nets' soft labels); ``logits``, the mean squared error between its centred logits and the
    targets' centred log-probabilities, which are the answering model's logits up to a constant
    per row. Unrounded answers carry those logits exactly, and matching them teaches the classes
    a confident answer gives almost no probability to. Hard labels always use cross-entropy."""

    unlabeled_weight: float = 0.0
    """Weight of the pseudo-label loss on the ``unlabeled`` images :func:`fit` is given (0: they
    are not used). Each step adds a batch of them: the model's own prediction on an image, where
    at least ``pseudo_threshold`` confident, becomes the target for a shifted and flipped view of
    it (FixMatch, Sohn et al. 2020, with this loop's augmentation as the strong view)."""
    pseudo_threshold: float = 0.95

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
        if self.distill not in ("probs", "logits"):
            raise ValueError(f"distill must be probs or logits, not {self.distill!r}")
        if self.unlabeled_weight < 0:
            raise ValueError(f"unlabeled_weight must be >= 0, not {self.unlabeled_weight}")
        if not 0.0 < self.pseudo_threshold <= 1.0:
            raise ValueError(f"pseudo_threshold must be in (0, 1], not {self.pseudo_threshold}")

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
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
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


# Answers of probability 0 (underflow, rounding) are taken as this: a logit about 16 below the
# top class's, beyond what float32 softmax answers resolve anyway.
_PROB_FLOOR = 1e-7


def training_loss(logits: torch.Tensor, targets: torch.Tensor, distill: str) -> torch.Tensor:
    """The loss of one batch: cross-entropy against hard labels or probability vectors, or with
    ``distill="logits"`` the squared error between centred logits and centred log-targets."""
    if targets.ndim == 1 or distill == "probs":
        return F.cross_entropy(logits, targets)  # probability targets: soft cross-entropy
    log_targets = torch.log(targets.clamp_min(_PROB_FLOOR))
    centred_targets = log_targets - log_targets.mean(dim=1, keepdim=True)
    centred_logits = logits - logits.mean(dim=1, keepdim=True)
    return F.mse_loss(centred_logits, centred_targets)


def pseudo_label_loss(
    model: Classifier,
    images: torch.Tensor,
    threshold: float,
    generator: torch.Generator,
    max_shift: int,
) -> torch.Tensor:
    """FixMatch's unlabeled loss: cross-entropy between the model's prediction on an augmented
    view and its own confident (``>= threshold``) prediction on the plain image, averaged over
    the whole batch (unconfident images add zero, as in FixMatch)."""
    was_training = model.training
    model.eval()  # the pseudo-label comes from the model as it would answer, not a train pass
    with torch.no_grad():
        confidence, pseudo = F.softmax(model(images), dim=1).max(dim=1)
    model.train(was_training)
    confident = (confidence >= threshold).float()
    if not confident.any():
        return images.new_zeros(())
    logits = model(augment_batch(images, generator, max_shift))
    return (F.cross_entropy(logits, pseudo, reduction="none") * confident).mean()


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
    unlabeled: ImageSet | np.ndarray | None = None,
) -> TrainHistory:
    """Train ``model`` in place on ``images`` (uint8 ``(N, H, W, C)`` or an ImageSet).

    ``targets``: int64 ``(N,)`` hard labels, or float ``(N, K)`` probability vectors (rows are
    normalised, so truncated top-k answers are fine). The model is left on the training device
    in eval mode; with ``patience`` it holds the best weights seen on the validation split.
    ``unlabeled``: images without targets, used when ``config.unlabeled_weight`` is positive.
    """
    seed_everything(config.seed)
    device = resolve_device(config.device)
    source = ImageSource(images)
    target_tensor = prepare_targets(targets, source.n, model.num_classes)
    train_idx, val_idx = split_validation(source.n, config.val_fraction, config.seed)
    if len(train_idx) == 0:
        raise ValueError("no training data")

    model.to(device)
    optimizer = _make_optimizer(model, config)
    steps_per_epoch = math.ceil(len(train_idx) / config.batch_size)
    scheduler = _make_scheduler(optimizer, config, steps_per_epoch)
    shuffle_rng = np.random.default_rng([config.seed, 1])
    augment_gen = torch.Generator().manual_seed(config.seed)
    extra = ImageSource(unlabeled) if unlabeled is not None and config.unlabeled_weight else None
    extra_rng = np.random.default_rng([config.seed, 2])
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
            for part in batch_slices(len(order), config.batch_size):
                # Sorted within the batch: same sample set, friendlier to disk-backed sets.
                batch_idx = np.sort(order[part])
                if len(batch_idx) == 1 and steps_per_epoch > 1:
                    continue  # BatchNorm cannot train on a single sample
                x = to_tensor(source.batch(batch_idx), device)
                y = target_tensor[batch_idx].to(device, non_blocking=True)
                if config.augment:
                    x = augment_batch(x, augment_gen, config.max_shift)
                logits = model(x)
                loss = training_loss(logits, y, config.distill)
                if extra is not None and extra.n:
                    drawn = np.sort(
                        extra_rng.choice(extra.n, min(extra.n, len(batch_idx)), replace=False)
                    )
                    unlabeled_x = to_tensor(extra.batch(drawn), device)
                    loss = loss + config.unlabeled_weight * pseudo_label_loss(
                        model, unlabeled_x, config.pseudo_threshold, augment_gen, config.max_shift
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                k = len(batch_idx)
                loss_sum += float(loss.detach()) * k
                correct += int((logits.detach().argmax(dim=1) == hard_labels(y)).sum())
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


__all__ = [
    "TrainConfig",
    "TrainHistory",
    "accuracy",
    "augment_batch",
    "evaluate",
    "fit",
    "predict_logits",
    "predict_proba",
    "pseudo_label_loss",
    "resolve_device",
    "seed_everything",
    "split_validation",
    "training_loss",
]
