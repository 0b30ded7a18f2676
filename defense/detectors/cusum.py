"""The detectors that accumulate a per-query out-of-distribution score by CUSUM per client:
``msp``, ``mahalanobis`` and ``ood-binary``."""

from __future__ import annotations

from abc import abstractmethod

import numpy as np

from defense.detectors.base import Detector, DetectorResult, Observation
from defense.sequential import Cusum
from defense.state import State


class CusumDetector(Detector):
    """A per-query out-of-distribution score accumulated by CUSUM per client."""

    def __init__(self, cusum: Cusum) -> None:
        self.cusum = cusum

    @property
    def threshold(self) -> float:
        return self.cusum.threshold

    @abstractmethod
    def score(self, batch: Observation) -> np.ndarray: ...

    def initial_state(self) -> State:
        return {"statistic": np.zeros(())}

    def observe(self, state: State, batch: Observation) -> DetectorResult:
        scores = self.score(batch).astype(np.float64)
        path, alarm = self.cusum.run(float(state["statistic"]), scores)
        state["statistic"] = np.array(path[-1] if len(path) else state["statistic"])
        return DetectorResult(scores, float(state["statistic"]), alarm, path)


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
