"""A benign user of the prediction API: public in-domain images, as people photograph them.

The demo, the experiment harness and the detection benchmark all need honest traffic to
measure false alarms and what a defense costs honest users; this is that traffic, sent
through the plain client (benign users have no budget, cache or retries to speak of).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mlaas.apiclient import PredictionClient
from mlaas.datasets import ImageSet
from mlaas.shifts import apply_shift


@dataclass
class BenignResult:
    queries: int
    accuracy: float  # of the API's labels against the images' true labels


def benign_images(
    pool: ImageSet, count: int, rng: np.random.Generator, shift: str = "mild"
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` distinct pool images as a user of the benign-shift family ``shift`` sends
    them (:mod:`mlaas.shifts`; default: mild variations), and their true labels."""
    if pool.labels is None:
        raise ValueError(f"{pool.name} has no labels: benign accuracy cannot be measured")
    chosen = np.sort(rng.choice(len(pool), min(count, len(pool)), replace=False))
    return apply_shift(shift, pool.get_batch(chosen), rng), np.asarray(pool.labels)[chosen]


def run_benign_client(
    url: str, key: str, images: np.ndarray, labels: np.ndarray, batch: int = 20
) -> BenignResult:
    correct = 0
    with PredictionClient(url, key) as client:
        for start in range(0, len(images), batch):
            answer = client.predict(images[start : start + batch])
            predicted = np.array([p.label for p in answer.predictions])
            correct += int((predicted == labels[start : start + batch]).sum())
    return BenignResult(len(images), correct / max(1, len(images)))
