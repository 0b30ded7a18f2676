"""Detectors: each scores every query of a client and decides, per client, when to alarm.

All detectors share one interface. They read what the victim's single forward pass already
computed (logits, probabilities, penultimate features) or the input itself, update the
client's state, and report per-query scores, their decision statistic and the query, if any,
at which the client crossed the line.

* ``ood-binary``   Atli et al.'s defense: a binary classifier on the victim's penultimate
                   features, in-distribution vs natural out-of-distribution images, whose
                   log-odds feed a per-client CUSUM.
* ``msp``          maximum softmax probability (Hendrycks & Gimpel), ``1 - max p``, + CUSUM.
* ``mahalanobis``  class-conditional Gaussians with a shared covariance on the features
                   (Lee et al.), the smallest Mahalanobis distance, + CUSUM.
* ``prada``        PRADA (Juuti et al.): per predicted class, a growing set of the client's
                   queries and each new query's minimum L2 distance to it; the Shapiro-Wilk
                   statistic of those distances below ``delta`` is an attack.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from scipy import stats

from defense.sequential import Cusum
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
    statistic: float  # the decision statistic after the batch
    threshold: float
    alarm_at: int | None  # index in the batch of the first query past the threshold


class Detector(ABC):
    name: ClassVar[str]
    needs_training: ClassVar[bool] = False

    @abstractmethod
    def initial_state(self) -> State: ...

    @abstractmethod
    def observe(self, state: State, batch: Observation) -> DetectorResult:
        """Score ``batch`` and update ``state`` in place."""


class CusumDetector(Detector):
    """A per-query out-of-distribution score accumulated by CUSUM per client."""

    def __init__(self, cusum: Cusum) -> None:
        self.cusum = cusum

    @abstractmethod
    def score(self, batch: Observation) -> np.ndarray: ...

    def initial_state(self) -> State:
        return {"statistic": np.zeros(())}

    def observe(self, state: State, batch: Observation) -> DetectorResult:
        scores = self.score(batch).astype(np.float64)
        path, alarm = self.cusum.run(float(state["statistic"]), scores)
        state["statistic"] = np.array(path[-1] if len(path) else state["statistic"])
        return DetectorResult(scores, float(state["statistic"]), self.cusum.threshold, alarm)


class MaxSoftmax(CusumDetector):
    name = "msp"
    needs_training = True  # nothing to fit, but its CUSUM is calibrated on benign queries

    @staticmethod
    def raw_score(probs: np.ndarray) -> np.ndarray:
        return 1.0 - probs.max(axis=1)

    def score(self, batch: Observation) -> np.ndarray:
        return self.raw_score(batch.probs)


class Mahalanobis(CusumDetector):
    name = "mahalanobis"
    needs_training = True

    def __init__(self, cusum: Cusum, means: np.ndarray, precision: np.ndarray) -> None:
        super().__init__(cusum)
        self.means = means.astype(np.float64)
        self.precision = precision.astype(np.float64)

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Class means and the precision of the shared (tied) covariance, as Lee et al."""
        features = features.astype(np.float64)
        classes = np.unique(labels)
        means = np.stack([features[labels == c].mean(axis=0) for c in classes])
        centred = features - means[np.searchsorted(classes, labels)]
        covariance = centred.T @ centred / len(features)
        # A little shrinkage: penultimate features are often rank-deficient (ReLU zeros).
        covariance += np.eye(len(covariance)) * 1e-3 * np.trace(covariance) / len(covariance)
        return means, np.linalg.inv(covariance)

    @staticmethod
    def distances(features: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
        # (f - m)' P (f - m) = f'Pf - 2 f'Pm + m'Pm: three matrix products instead of a
        # per-class quadratic form, which keeps this off the serving path's bill.
        f = features.astype(np.float64)
        precision_means = precision @ means.T
        squared = (
            ((f @ precision) * f).sum(axis=1)[:, None]
            - 2.0 * f @ precision_means
            + (means.T * precision_means).sum(axis=0)[None, :]
        )
        return np.sqrt(np.maximum(squared.min(axis=1), 0.0))

    def score(self, batch: Observation) -> np.ndarray:
        return self.distances(batch.features, self.means, self.precision)


class OodBinary(CusumDetector):
    name = "ood-binary"
    needs_training = True
    CLIP = 30.0

    def __init__(
        self, cusum: Cusum, mean: np.ndarray, scale: np.ndarray, coef: np.ndarray, bias: float
    ) -> None:
        super().__init__(cusum)
        self.mean, self.scale, self.coef, self.bias = mean, scale, coef, bias

    @staticmethod
    def log_odds(
        features: np.ndarray, mean: np.ndarray, scale: np.ndarray, coef: np.ndarray, bias: float
    ) -> np.ndarray:
        """Log-odds that each query is out of distribution, clipped: one absurd query must not
        outweigh a stream."""
        standardised = (features.astype(np.float64) - mean) / scale
        return np.clip(standardised @ coef + bias, -OodBinary.CLIP, OodBinary.CLIP)

    def score(self, batch: Observation) -> np.ndarray:
        return self.log_odds(batch.features, self.mean, self.scale, self.coef, self.bias)


class Prada(Detector):
    name = "prada"

    def __init__(self, delta: float = 0.95, min_distances: int = 100) -> None:
        if not 0 < delta < 1:
            raise ValueError("PRADA's delta is a Shapiro-Wilk statistic, in (0, 1)")
        self.delta = delta
        self.min_distances = min_distances

    def initial_state(self) -> State:
        # Per class c: "rows_c", its growing set (float32 pixels in [0, 1]) and "norms_c",
        # their squared norms; "added_stats" holds per class the count, sum and sum of squares
        # of the distances at which members were added (for the threshold, in O(1)).
        return {
            "class_threshold": np.zeros(0, dtype=np.float64),
            "added_stats": np.zeros((0, 3), dtype=np.float64),
            "distances": np.zeros(0, dtype=np.float64),  # every d_min: what is tested
            "alarmed": np.zeros((), dtype=bool),
        }

    def _nearest_stored(self, state: State, x: np.ndarray, label: int) -> np.ndarray:
        """Each query's distance to the nearest member of class ``label``'s growing set.

        A float32 product ranks the members (fast); the few nearest are then measured exactly
        in float64, because |a|^2 + |b|^2 - 2ab cancels badly for near-duplicates, and
        near-duplicates are exactly what PRADA looks for.
        """
        rows = state.get(f"rows_{label}")
        if rows is None or len(rows) == 0:
            return np.full(len(x), np.inf)
        approximate = state[f"norms_{label}"][None, :] - 2.0 * (x.astype(np.float32) @ rows.T)
        nearest = np.argsort(approximate, axis=1)[:, :3]
        exact = x[:, None, :] - rows[nearest].astype(np.float64)
        return np.sqrt((exact * exact).sum(axis=2)).min(axis=1)

    def observe(self, state: State, batch: Observation) -> DetectorResult:
        x = batch.images.reshape(len(batch), -1).astype(np.float64) / 255.0
        labels = batch.probs.argmax(axis=1)
        classes = batch.probs.shape[1]
        threshold = state["class_threshold"]
        added_stats = state["added_stats"]
        if len(threshold) < classes:
            threshold = np.concatenate([threshold, np.zeros(classes - len(threshold))])
            added_stats = np.vstack([added_stats, np.zeros((classes - len(added_stats), 3))])
        stored_min = np.full(len(batch), np.inf)
        for label in np.unique(labels):
            mine = labels == label
            stored_min[mine] = self._nearest_stored(state, x[mine], int(label))
        within = _pairwise(x, x)
        added: dict[int, list[int]] = {}
        new_distances = np.full(len(batch), np.nan)
        for i, label in enumerate(labels.tolist()):
            earlier = added.get(label, [])
            d_min = min(stored_min[i], within[i, earlier].min()) if earlier else stored_min[i]
            if not np.isfinite(d_min):  # the class's first query starts its growing set
                added.setdefault(label, []).append(i)
                continue
            new_distances[i] = d_min
            if d_min > threshold[label]:
                added.setdefault(label, []).append(i)
                count, total, squares = added_stats[label] + (1.0, d_min, d_min * d_min)
                added_stats[label] = (count, total, squares)
                mean = total / count
                std = np.sqrt(max(squares / count - mean * mean, 0.0))
                threshold[label] = max(threshold[label], mean - std)
        for label, members in added.items():
            rows = x[members].astype(np.float32)
            previous = state.get(f"rows_{label}", np.zeros((0, x.shape[1]), np.float32))
            state[f"rows_{label}"] = np.concatenate([previous, rows])
            norms = state.get(f"norms_{label}", np.zeros(0, np.float32))
            state[f"norms_{label}"] = np.concatenate([norms, (rows * rows).sum(axis=1)])
        state["class_threshold"] = threshold
        state["added_stats"] = added_stats
        before = len(state["distances"])
        distances = np.concatenate([state["distances"], new_distances[~np.isnan(new_distances)]])
        state["distances"] = distances
        statistic = self._shapiro(distances)
        alarm = None
        if statistic < self.delta and not bool(state["alarmed"]):
            state["alarmed"] = np.array(True)
            alarm = self._first_alarm(distances, before, new_distances)
        return DetectorResult(new_distances, statistic, self.delta, alarm)

    def _shapiro(self, distances: np.ndarray) -> float:
        if len(distances) < self.min_distances or np.ptp(distances) == 0:
            return float("nan") if len(distances) < self.min_distances else 0.0
        return float(stats.shapiro(distances).statistic)

    def _first_alarm(self, distances: np.ndarray, before: int, new: np.ndarray) -> int:
        """The query in this batch whose distance first took W under delta."""
        positions = np.flatnonzero(~np.isnan(new))
        for offset, index in enumerate(positions, start=1):
            if self._shapiro(distances[: before + offset]) < self.delta:
                return int(index)
        return int(positions[-1]) if len(positions) else 0


def _pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if len(b) == 0:
        return np.zeros((len(a), 0), dtype=a.dtype)
    squared = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.maximum(squared, 0.0))


# ------------------------------------------------------------------------- artifacts
DETECTORS = ("ood-binary", "msp", "mahalanobis", "prada")


def artifact_path(directory: Path, name: str) -> Path:
    return Path(directory) / f"{name}.npz"


def save_artifact(directory: Path, name: str, arrays: dict[str, np.ndarray], meta: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = artifact_path(directory, name)
    with path.open("wb") as handle:
        np.savez(handle, meta=np.array(json.dumps(meta)), **arrays)
    return path


def load_artifact(directory: Path, name: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    path = artifact_path(directory, name)
    if not path.is_file():
        raise FileNotFoundError(
            f"detector {name!r} has no artifact at {path}: run `mlaas defense train {name} "
            f"--victim <victim dir>` first"
        )
    with np.load(path, allow_pickle=False) as archive:
        arrays = {k: archive[k] for k in archive.files if k != "meta"}
        meta = json.loads(str(archive["meta"]))
    return arrays, meta


def load_detector(name: str, directory: Path, *, prada_delta: float | None = None) -> Detector:
    """A ready detector; those that need training read their artifact from ``directory``.

    PRADA runs untrained too: with ``prada_delta``, else its calibrated delta if there is an
    artifact, else the paper's 0.95.
    """
    if name == "prada":
        if prada_delta is None and artifact_path(directory, name).exists():
            prada_delta = float(load_artifact(directory, name)[1]["delta"])
        return Prada(delta=prada_delta if prada_delta is not None else 0.95)
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; choose from {', '.join(DETECTORS)}")
    arrays, meta = load_artifact(directory, name)
    cusum = Cusum(drift=meta["drift"], threshold=meta["threshold"])
    if name == "msp":
        return MaxSoftmax(cusum)
    if name == "mahalanobis":
        return Mahalanobis(cusum, arrays["means"], arrays["precision"])
    return OodBinary(cusum, arrays["mean"], arrays["scale"], arrays["coef"], float(arrays["bias"]))
