"""How good is the stolen copy? Accuracy on the victim's test split, and fidelity to the victim.

Fidelity needs the victim's own top-1 labels on that split. They come from the API under a
separate experimenter key (cached in the run directory, never counted in the attack's budget)
or from an oracle file the provider wrote with ``mlaas victim oracle``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from attacker.client import ExtractionClient
from mlaas.datasets import ImageSet, load_dataset
from mlaas.images import InputShape
from mlaas.models import Classifier
from mlaas.training import predict_proba

EVAL_CHUNK = 2048


@dataclass
class Evaluator:
    test: ImageSet
    labels: np.ndarray
    victim_labels: np.ndarray | None

    def evaluate(self, model: Classifier) -> dict[str, float | None]:
        predicted = predict_proba(model, self.test).argmax(axis=1)
        fidelity = None
        if self.victim_labels is not None:
            fidelity = float((predicted == self.victim_labels).mean())
        return {"accuracy": float((predicted == self.labels).mean()), "fidelity": fidelity}

    @property
    def victim_accuracy(self) -> float | None:
        if self.victim_labels is None:
            return None
        return float((self.victim_labels == self.labels).mean())


def make_evaluator(
    test_spec: str,
    shape: InputShape,
    *,
    size: int | None = None,
    seed: int = 0,
    eval_client: ExtractionClient | None = None,
    oracle: Path | None = None,
) -> Evaluator:
    """An evaluator on ``test_spec`` (a seeded subset of ``size`` images if given)."""
    full = load_dataset(test_spec, shape)
    if full.labels is None:
        raise ValueError(f"{test_spec} has no labels: it cannot measure accuracy")
    indices = np.arange(len(full))
    if size is not None and size < len(full):
        indices = np.sort(np.random.default_rng(seed).choice(len(full), size, replace=False))
    test = full.subset(indices)
    victim_labels = None
    if oracle is not None:
        labels = np.load(oracle, allow_pickle=False)
        if labels.ndim != 1 or len(labels) != len(full):
            raise ValueError(
                f"{oracle}: an oracle file holds one label per image of {test_spec} "
                f"({len(full)}), not an array shaped {labels.shape}"
            )
        victim_labels = labels[indices].astype(np.int64)
    elif eval_client is not None:
        parts = []
        for start in range(0, len(test), EVAL_CHUNK):
            chunk = np.arange(start, min(start + EVAL_CHUNK, len(test)))
            parts.append(eval_client.query(test.get_batch(chunk)).labels)
        victim_labels = np.concatenate(parts)
    return Evaluator(test, np.asarray(full.labels)[indices], victim_labels)
