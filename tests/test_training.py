"""The training loop and the model store, on small real Fashion-MNIST subsets."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mlaas.images import InputShape, to_tensor
from mlaas.models import Classifier, build_model
from mlaas.modelstore import ModelCard, load_card, load_model, save_model
from mlaas.training import (
    TrainConfig,
    accuracy,
    augment_batch,
    evaluate,
    fit,
    predict_proba,
    pseudo_label_loss,
    resolve_device,
    seed_everything,
    split_validation,
    training_loss,
)

SHAPE = InputShape(1, 28, 28)


class Data:
    def __init__(
        self,
        train_x: np.ndarray,
        train_y: np.ndarray,
        test_x: np.ndarray,
        test_y: np.ndarray,
        classes: list[str],
    ) -> None:
        self.train_x, self.train_y = train_x, train_y
        self.test_x, self.test_y = test_x, test_y
        self.classes = classes


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Data:
    """4,000 training and 1,000 test images of the real data set."""
    from mlaas.datasets import DatasetUnavailable, load_dataset

    data_dir = tmp_path_factory.mktemp("data")
    try:
        train = load_dataset("fashion-mnist:train", data_dir=data_dir)
        test = load_dataset("fashion-mnist:test", data_dir=data_dir)
    except DatasetUnavailable as exc:
        pytest.skip(str(exc))
    assert train.labels is not None and test.labels is not None and train.classes
    train_idx, test_idx = np.arange(4000), np.arange(1000)
    return Data(
        train.get_batch(train_idx),
        train.labels[train_idx],
        test.get_batch(test_idx),
        test.labels[test_idx],
        list(train.classes),
    )


def _model(seed: int = 0, arch: str = "cnn-small") -> Classifier:
    seed_everything(seed)
    return build_model(arch, 10, SHAPE)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def teacher(data: Data) -> Classifier:
    """cnn-small after one epoch on 2,000 images (a couple of seconds)."""
    model = _model()
    fit(
        model,
        data.train_x[:2000],
        data.train_y[:2000],
        TrainConfig(epochs=1, batch_size=64, device="cpu"),
        progress=False,
    )
    return model


def test_training_beats_chance_on_held_out_data(data: Data, teacher: Classifier) -> None:
    untrained = _model()
    before = accuracy(untrained, data.test_x, data.test_y)
    after = accuracy(teacher, data.test_x, data.test_y)
    assert before < 0.3
    assert after > 0.65, after  # chance is 0.10
    assert not teacher.training  # fit leaves the model ready for inference


def test_history_records_each_epoch(data: Data) -> None:
    model = _model()
    config = TrainConfig(epochs=2, batch_size=100, val_fraction=0.2, device="cpu")
    history = fit(model, data.train_x[:1000], data.train_y[:1000], config, progress=False)
    assert history.epochs == 2
    for series in (
        history.train_loss,
        history.train_accuracy,
        history.val_loss,
        history.val_accuracy,
        history.lr,
        history.seconds,
    ):
        assert len(series) == 2
    assert history.train_loss[1] < history.train_loss[0]
    assert history.lr[-1] < 1e-4  # OneCycle anneals to (almost) nothing
    assert history.best_epoch in (0, 1) and not history.stopped_early
    json.dumps(history.to_dict())  # serialisable for the results files


def test_soft_labels_distil_the_teacher(data: Data, teacher: Classifier) -> None:
    transfer = data.train_x[2000:4000]  # images the teacher never saw
    probs = predict_proba(teacher, transfer)
    assert probs.dtype == np.float32 and probs.shape == (2000, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    # A top-3 API: the rest is cut off, so rows no longer sum to one.
    top3 = np.where(probs >= np.sort(probs, axis=1)[:, -3:-2], probs, 0.0).astype(np.float32)
    assert (top3.sum(axis=1) < 0.9999).any()
    config = TrainConfig(epochs=1, batch_size=64, device="cpu")
    student = _model(seed=1)
    fit(student, transfer, top3, config, progress=False)
    teacher_labels = predict_proba(teacher, data.test_x).argmax(axis=1)
    agreement = accuracy(student, data.test_x, teacher_labels)
    assert agreement > 0.7, agreement
    # Rows are normalised for the loss (the same code path as fit's): rescaling changes nothing.
    scale = np.linspace(0.3, 3.0, len(top3), dtype=np.float32)[:, None]
    normalised = top3 / top3.sum(axis=1, keepdims=True)
    loss_rescaled, _ = evaluate(student, transfer, top3 * scale)
    loss_normalised, _ = evaluate(student, transfer, normalised)
    assert loss_rescaled == pytest.approx(loss_normalised, rel=1e-5)


def test_bad_targets_are_refused(data: Data) -> None:
    x = data.train_x[:10]
    config = TrainConfig(epochs=1, device="cpu")
    with pytest.raises(ValueError, match="soft labels have 3 classes"):
        fit(_model(), x, np.full((10, 3), 1 / 3, np.float32), config, progress=False)
    with pytest.raises(ValueError, match="non-negative"):
        fit(_model(), x, -np.ones((10, 10), np.float32), config, progress=False)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        fit(_model(), x, np.full(10, 10), config, progress=False)
    with pytest.raises(ValueError, match="10 images but 9 targets"):
        fit(_model(), x, np.zeros(9, np.int64), config, progress=False)


def test_same_seed_same_weights(data: Data) -> None:
    x, y = data.train_x[:600], data.train_y[:600]
    config = TrainConfig(
        epochs=1, batch_size=64, augment=True, val_fraction=0.1, seed=3, device="cpu"
    )

    def run(seed: int) -> dict[str, torch.Tensor]:
        model = _model(seed=seed)
        fit(model, x, y, replace(config, seed=seed), progress=False)
        return _state(model)

    first, second, other = run(3), run(3), run(4)
    assert _same_state(first, second)
    assert not _same_state(first, other)


class _LazySet:
    """An ImageSet without an ``images`` array: forces the ``get_batch`` path."""

    def __init__(self, images: np.ndarray) -> None:
        self._images = images
        self.shape = SHAPE
        self.calls = 0

    def __len__(self) -> int:
        return len(self._images)

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        self.calls += 1
        return self._images[np.asarray(indices)]


def test_image_sets_and_arrays_train_identically(data: Data) -> None:
    from mlaas.datasets import ArrayImageSet

    x, y = data.train_x[:300], data.train_y[:300]
    config = TrainConfig(epochs=1, batch_size=50, device="cpu")
    states = []
    lazy = _LazySet(x)
    for images in (x, ArrayImageSet("t", x, y, data.classes), lazy):
        model = _model()
        fit(model, images, y, config, progress=False)  # type: ignore[arg-type]
        states.append(_state(model))
    assert lazy.calls >= 6
    assert _same_state(states[0], states[1]) and _same_state(states[0], states[2])
    assert accuracy(model, lazy, y) == accuracy(model, x, y)  # type: ignore[arg-type]


def test_early_stopping_restores_the_best_weights(data: Data) -> None:
    # 300 training images and a high constant rate: the network memorises, validation loss turns up.
    x, y = data.train_x[:400], data.train_y[:400]
    config = TrainConfig(
        epochs=20,
        batch_size=50,
        lr=1e-2,
        schedule="none",
        val_fraction=0.25,
        patience=2,
        device="cpu",
        seed=0,
    )
    model = _model()
    history = fit(model, x, y, config, progress=False)
    assert history.stopped_early and history.restored_best
    assert history.epochs < 20
    assert history.best_epoch == int(np.argmin(history.val_loss))
    assert history.best_epoch == history.epochs - 1 - config.patience
    _, val_idx = split_validation(len(x), config.val_fraction, config.seed)
    val_loss, val_acc = evaluate(model, x, y, indices=val_idx)
    assert val_loss == pytest.approx(history.val_loss[history.best_epoch], rel=1e-5)
    assert val_loss < history.val_loss[-1]
    assert val_acc == pytest.approx(history.val_accuracy[history.best_epoch])


def test_augment_batch_shifts_and_flips_per_sample() -> None:
    x = torch.zeros(64, 1, 16, 16)
    x[:, 0, 7, 4] = 1.0  # one bright pixel, left of centre
    generator = torch.Generator().manual_seed(0)
    flipped_only = augment_batch(x, generator, max_shift=0)
    flips = flipped_only[:, 0, 7, 11] == 1.0  # mirrored column: 15 - 4
    assert torch.equal(flipped_only[~flips], x[~flips])
    assert 10 < int(flips.sum()) < 54
    shifted = augment_batch(x, generator, max_shift=2)
    assert torch.equal(shifted.sum(dim=(1, 2, 3)), torch.ones(64))  # moved, not blurred or lost
    where = shifted[:, 0].flatten(1).argmax(dim=1)
    rows, cols = where // 16, where % 16
    assert ((rows - 7).abs() <= 2).all()
    assert (((cols - 4).abs() <= 2) | ((cols - 11).abs() <= 2)).all()
    assert len(set(zip(rows.tolist(), cols.tolist(), strict=True))) > 10  # per sample


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="early stopping"):
        TrainConfig(patience=2)
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="rmsprop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="distill must be probs or logits, not 'soft'"):
        TrainConfig(distill="soft")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unlabeled_weight must be >= 0"):
        TrainConfig(unlabeled_weight=-0.5)
    with pytest.raises(ValueError, match=r"pseudo_threshold must be in \(0, 1\]"):
        TrainConfig(pseudo_threshold=0.0)
    assert TrainConfig().resolved_lr == 2e-3 and TrainConfig(optimizer="sgd").resolved_lr == 0.05
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")


def _answers(rows: int = 8, classes: int = 10) -> torch.Tensor:
    """Probability vectors as an API answers them: softmax of a model's logits."""
    generator = torch.Generator().manual_seed(0)
    return F.softmax(2.0 * torch.randn(rows, classes, generator=generator), dim=1)


def test_logit_distillation_matches_logits_up_to_a_constant_per_row() -> None:
    targets = _answers()
    per_row = 50.0 * torch.arange(-4, 4, dtype=torch.float32)[:, None]
    logits = torch.log(targets) + per_row  # the answering model's logits, each row shifted
    assert training_loss(logits, targets, "logits").item() == pytest.approx(0.0, abs=1e-8)
    # Rows rescaled (a top-k answer renormalised) are the same log-probabilities, shifted.
    rescaled = targets * torch.linspace(0.2, 5.0, len(targets))[:, None]
    assert training_loss(logits, rescaled, "logits").item() == pytest.approx(0.0, abs=1e-8)
    # Soft cross-entropy cannot reach zero on uncertain answers: its minimum is their entropy.
    entropy = -(targets * torch.log(targets)).sum(dim=1).mean()
    soft = training_loss(logits, targets, "probs")
    assert soft.item() > 0.1 and soft.item() == pytest.approx(entropy.item(), rel=1e-5)
    # One class off by a logit is no per-row constant: the squared error sees it.
    off = logits.clone()
    off[:, 3] += 1.0
    assert training_loss(off, targets, "logits").item() > 0.05


def test_hard_labels_are_plain_cross_entropy_whatever_distill_is() -> None:
    logits = 3.0 * _answers(rows=6, classes=4) - 1.0
    labels = torch.tensor([0, 3, 1, 1, 2, 0])
    expected = F.cross_entropy(logits, labels)
    for distill in ("probs", "logits"):
        assert torch.equal(training_loss(logits, labels, distill), expected)


def test_zero_probability_answers_keep_the_logit_loss_finite() -> None:
    targets = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    logits = torch.zeros(3, 3, requires_grad=True)
    loss = training_loss(logits, targets, "logits")
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    # Pushed towards the answer: the classes answered 0 get the lower logits.
    assert (logits.grad[0, 1:] > 0).all() and (logits.grad[0, 0] < 0).all()


def test_pseudo_labels_come_only_from_confident_predictions(data: Data) -> None:
    model = _model()
    images = to_tensor(data.train_x[:64])
    generator = torch.Generator().manual_seed(0)
    model.train()
    # Ten untrained classes: no prediction is certain, so nothing is taught.
    assert pseudo_label_loss(model, images, 1.0, generator, max_shift=2).item() == 0.0
    loss = pseudo_label_loss(model, images, 1e-3, generator, max_shift=2)  # all confident
    assert loss.item() > 0 and loss.requires_grad
    assert model.training  # the pseudo-labelling pass in eval mode leaves the mode as it was


def test_unlabeled_images_change_training_only_with_a_weight(data: Data) -> None:
    x, y = data.train_x[:300], data.train_y[:300]
    unlabeled = data.train_x[300:600]
    base = TrainConfig(epochs=1, batch_size=50, augment=True, device="cpu", seed=0)

    def trained(config: TrainConfig, extra: np.ndarray | None) -> dict[str, torch.Tensor]:
        model = _model()
        fit(model, x, y, config, progress=False, unlabeled=extra)
        return _state(model)

    plain = trained(base, None)
    assert _same_state(plain, trained(base, unlabeled))  # weight 0: the images are not used
    weighted = replace(base, unlabeled_weight=1.0, pseudo_threshold=0.2)  # reached in an epoch
    assert not _same_state(plain, trained(weighted, unlabeled))


def _card(model: Classifier, data: Data, **overrides: object) -> ModelCard:
    fields: dict[str, object] = dict(
        name="tiny",
        architecture="cnn-small",
        dataset="fashion-mnist",
        num_classes=10,
        classes=data.classes,
        input_shape=str(SHAPE),
        mean=model.mean.flatten().tolist(),
        std=model.std.flatten().tolist(),
        pretrained=None,
        test_accuracy=0.8,
        seed=0,
        epochs=1,
        training_seconds=1.5,
        num_parameters=sum(p.numel() for p in model.parameters()),
        extra={"note": "test"},
    )
    fields.update(overrides)
    return ModelCard(**fields)  # type: ignore[arg-type]


def test_save_load_round_trip(tmp_path: Path, data: Data, teacher: Classifier) -> None:
    card = _card(teacher, data)
    directory = save_model(tmp_path / "nested" / "victim", teacher, card)
    assert sorted(p.name for p in directory.iterdir()) == ["card.json", "model.pt"]
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in directory.iterdir())  # readable
    loaded, loaded_card = load_model(directory)
    assert loaded_card == card and load_card(directory) == card
    assert loaded_card.shape == SHAPE
    assert json.loads((directory / "card.json").read_text())["input_shape"] == "1x28x28"
    assert not loaded.training
    np.testing.assert_array_equal(
        predict_proba(loaded, data.test_x[:256]), predict_proba(teacher, data.test_x[:256])
    )


def test_pretrained_layout_reloads_offline(tmp_path: Path, data: Data) -> None:
    # A fine-tuned pretrained ResNet keeps its ImageNet stem on 28 px; loading must rebuild
    # that layout (not the from-scratch CIFAR stem) and must not need the network.
    torch.manual_seed(0)
    model = build_model("resnet18", 10, SHAPE, pretrained="imagenet", fetch_weights=False).eval()
    card = _card(model, data, architecture="resnet18", pretrained="imagenet")
    loaded, _ = load_model(save_model(tmp_path, model, card))
    np.testing.assert_array_equal(
        predict_proba(loaded, data.test_x[:32]), predict_proba(model, data.test_x[:32])
    )


def test_model_directory_errors(tmp_path: Path, data: Data, teacher: Classifier) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        load_model(tmp_path)
    save_model(tmp_path / "v", teacher, _card(teacher, data))
    (tmp_path / "v" / "model.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"no model\.pt"):
        load_model(tmp_path / "v")
    save_model(tmp_path / "w", teacher, _card(teacher, data, architecture="cnn-medium"))
    with pytest.raises(ValueError, match="does not match the card's architecture cnn-medium"):
        load_model(tmp_path / "w")
    (tmp_path / "w" / "card.json").write_text("{}")
    with pytest.raises(ValueError, match="not a valid model card"):
        load_card(tmp_path / "w")
    with pytest.raises(ValueError, match="class names"):
        _card(teacher, data, classes=["a", "b"])
    with pytest.raises(ValueError, match="card says 5 classes"):
        save_model(tmp_path / "x", teacher, _card(teacher, data, num_classes=5, classes=[]))
