"""What every detector shares: the batch it observes, what it reports, and the interface."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from defense.state import State


@dataclass
class Observation:
    """One client's batch, as the victim's forward pass saw it."""

    images: np.ndarray  # uint8 (N, H, W, C), the model's input
    logits: np.ndarray  # float32 (N, K)
    probs: np.ndarray  # float32 (N, K)
    features: np.ndarray  # float32 (N, D)

    def __len__(self) -> int:
        return len(self.probs)


@dataclass
class DetectorResult:
    scores: np.ndarray  # per query; NaN where the detector has none yet
    statistic: float  # the decision statistic after the batch (the detector has the threshold)
    alarm_at: int | None  # index in the batch of the first query past the threshold
    path: np.ndarray  # per query, the decision statistic after it; NaN where none was taken


class Detector(ABC):
    name: ClassVar[str]
    needs_training: ClassVar[bool] = False
    direction: ClassVar[str] = "above"
    """The side of ``threshold`` on which the decision statistic alarms: above or below."""

    @property
    @abstractmethod
    def threshold(self) -> float:
        """What the decision statistic is compared with."""

    @abstractmethod
    def initial_state(self) -> State: ...

    @abstractmethod
    def observe(self, state: State, batch: Observation) -> DetectorResult:
        """Score ``batch`` and update ``state`` in place."""
