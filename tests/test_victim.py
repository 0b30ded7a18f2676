"""Victim training: the default meets its accuracy target; other data sets and shapes work."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mlaas.images import InputShape
from mlaas.modelstore import load_card, load_model
from mlaas.training import TrainConfig
from testbed.victim import default_shape, train_victim


@pytest.mark.slow
def test_default_victim_reaches_90_percent(tmp_path) -> None:
    """The README's command, as is: cnn-small, 3 epochs, on train[:50000]."""
    out = tmp_path / "fashion"
    result = subprocess.run(
        [sys.executable, "-m", "testbed", "victim", "train", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "MLAAS_VAR_DIR": str(tmp_path / "var")},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    card = load_card(out)
    assert card.test_accuracy is not None and card.test_accuracy >= 0.90
    assert (card.dataset, card.architecture, card.input_shape) == (
        "fashion-mnist",
        "cnn-small",
        "1x28x28",
    )
    assert card.classes[0] == "T-shirt/top" and card.num_classes == 10
    assert card.epochs == 3 and card.training_seconds > 0


def test_default_shape_enlarges_for_architectures_that_need_pixels() -> None:
    assert default_shape("fashion-mnist", "cnn-small") == InputShape(1, 28, 28)
    assert default_shape("fashion-mnist", "vgg16-bn") == InputShape(1, 32, 32)


def test_victim_from_an_image_folder(tmp_path) -> None:
    rng = np.random.default_rng(0)
    for name, level in (("dark", 40), ("light", 210)):
        folder = tmp_path / "images" / name
        folder.mkdir(parents=True)
        for i in range(20):
            noise = rng.integers(-20, 20, (16, 16, 3))
            Image.fromarray(np.clip(level + noise, 0, 255).astype(np.uint8)).save(
                folder / f"{i}.png"
            )
    card = train_victim(
        tmp_path / "victim",
        dataset=str(tmp_path / "images"),
        arch="cnn-small",
        shape=InputShape(3, 16, 16),
        config=TrainConfig(epochs=3, batch_size=8),
        progress=False,
    )
    assert card.classes == ["dark", "light"] and card.input_shape == "3x16x16"
    assert card.test_accuracy == 1.0  # trivially separable; a broken pipeline would not be
    model, loaded = load_model(tmp_path / "victim")
    assert loaded == card and model.num_classes == 2
