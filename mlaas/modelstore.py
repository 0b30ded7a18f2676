"""Model directories: ``model.pt`` (a state dict) next to ``card.json`` (a model card).

A checkpoint is only a state dict, never a pickled module: loading it runs no code
(``weights_only=True``), and the card says how to rebuild the architecture, so a checkpoint
outlives refactors of the model classes. The card also records what the experiments report
about a victim (data set, accuracy, training cost, parameters), so a results table can be made
from the directory alone.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydantic
import torch

from mlaas.images import InputShape
from mlaas.models import Classifier, build_model

WEIGHTS_FILE = "model.pt"
CARD_FILE = "card.json"


class ModelCard(pydantic.BaseModel):
    """What a trained model is, how it was made and how to rebuild it."""

    # Fields a newer version adds are ignored, so older code can still read its cards.
    model_config = pydantic.ConfigDict(extra="ignore")

    name: str
    architecture: str
    dataset: str
    num_classes: int
    classes: list[str]
    input_shape: str
    """:class:`InputShape` as text, e.g. ``1x28x28``."""
    mean: list[float]
    std: list[float]
    pretrained: str | None = None
    test_accuracy: float | None = None
    seed: int = 0
    epochs: int = 0
    training_seconds: float = 0.0
    num_parameters: int = 0
    created_at: datetime = pydantic.Field(default_factory=lambda: datetime.now(UTC))
    torch_version: str = pydantic.Field(default_factory=lambda: torch.__version__)
    extra: dict[str, Any] = pydantic.Field(default_factory=dict)

    @pydantic.field_validator("input_shape")
    @classmethod
    def _valid_shape(cls, value: str) -> str:
        return str(InputShape.parse(value))

    @pydantic.model_validator(mode="after")
    def _consistent(self) -> ModelCard:
        if self.classes and len(self.classes) != self.num_classes:
            raise ValueError(f"{len(self.classes)} class names for {self.num_classes} classes")
        channels = self.shape.channels
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"mean and std need {channels} values for {self.input_shape} inputs")
        return self

    @property
    def shape(self) -> InputShape:
        return InputShape.parse(self.input_shape)


def write_json_atomic(path: Path, data: Any) -> None:
    """JSON through :func:`_atomic_write`: readers see the old document or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=2, default=str) + "\n"
    _atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def _atomic_write(path: Path, write: Any) -> None:
    """Write through a temporary file in the same directory, then rename over ``path``.

    A reader (a server restarting, a second replica) then sees the old file or the new one,
    never half of one.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a server running as another user must read it
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_model(directory: Path | str, model: Classifier, card: ModelCard) -> Path:
    """Write ``model.pt`` and ``card.json`` into ``directory`` (created if needed).

    The weights are written first, so a directory whose card exists always has its weights.
    Returns the directory.
    """
    directory = Path(directory)
    if card.num_classes != model.num_classes:
        raise ValueError(f"card says {card.num_classes} classes, the model has {model.num_classes}")
    directory.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    _atomic_write(directory / WEIGHTS_FILE, lambda handle: torch.save(state, handle))
    text = card.model_dump_json(indent=2) + "\n"
    _atomic_write(directory / CARD_FILE, lambda handle: handle.write(text.encode("utf-8")))
    return directory


def load_card(directory: Path | str) -> ModelCard:
    """Read and validate ``directory/card.json``."""
    directory = Path(directory)
    path = directory / CARD_FILE
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory {directory} does not exist")
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory} is not a model directory: it has no {CARD_FILE} (train a model with "
            "`mlaas victim train` or save one with mlaas.modelstore.save_model)"
        )
    try:
        return ModelCard.model_validate_json(path.read_text(encoding="utf-8"))
    except (pydantic.ValidationError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not a valid model card: {exc}") from exc


def load_model(
    directory: Path | str, device: torch.device | str = "cpu"
) -> tuple[Classifier, ModelCard]:
    """Rebuild the card's architecture and load the saved state dict.

    Pretrained weights are never fetched here (the checkpoint holds the trained ones), so a
    model directory loads offline. The model is returned in eval mode on ``device``."""
    directory = Path(directory)
    card = load_card(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{directory} has a {CARD_FILE} but no {WEIGHTS_FILE}")
    # The pretrained flag shapes the layout (a pretrained ResNet keeps its ImageNet stem on small
    # inputs), so pass it on, but never fetch weights only to overwrite them.
    model = build_model(
        card.architecture,
        card.num_classes,
        card.shape,
        pretrained=card.pretrained,
        fetch_weights=False,
        mean=card.mean,
        std=card.std,
    )
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except (RuntimeError, KeyError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise ValueError(
            f"{weights} does not match the card's architecture {card.architecture} "
            f"({card.input_shape}, {card.num_classes} classes): {exc}"
        ) from exc
    return model.to(device).eval(), card


__all__ = ["CARD_FILE", "WEIGHTS_FILE", "ModelCard", "load_card", "load_model", "save_model"]
