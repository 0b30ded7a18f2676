"""Output perturbations: defenses that need no detection, or the ``deceive`` action.

* reverse sigmoid (Lee et al., "Defending against NN model stealing attacks using deceptive
  perturbations"): ``y' = normalise(y - beta * (sigmoid(gamma * logit(y)) - 1/2))``; the
  top-1 class is kept for all but extreme settings while the vector's shape (what a
  distilling substitute learns from) is distorted;
* Gaussian noise on the probability vector, clipped at zero and renormalised.

Specs: ``none``, ``reverse-sigmoid:BETA:GAMMA`` (e.g. ``reverse-sigmoid:0.7:0.4``),
``noise:SIGMA``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_EPS = 1e-7


def reverse_sigmoid(probs: np.ndarray, beta: float, gamma: float) -> np.ndarray:
    y = np.clip(probs.astype(np.float64), _EPS, 1.0 - _EPS)
    inner = gamma * np.log(y / (1.0 - y))
    perturbation = beta * (1.0 / (1.0 + np.exp(-inner)) - 0.5)
    return _normalise(y - perturbation)


def noise(probs: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    return _normalise(probs + rng.normal(0.0, sigma, size=probs.shape))


def _normalise(values: np.ndarray) -> np.ndarray:
    values = np.clip(values, 0.0, None)
    totals = values.sum(axis=1, keepdims=True)
    uniform = np.full_like(values, 1.0 / values.shape[1])
    return np.where(totals > 0, values / np.where(totals > 0, totals, 1.0), uniform).astype(
        np.float32
    )


@dataclass(frozen=True)
class Perturbation:
    kind: str = "none"
    beta: float = 0.0
    gamma: float = 0.0
    sigma: float = 0.0

    @classmethod
    def parse(cls, spec: str) -> Perturbation:
        parts = spec.strip().lower().split(":")
        try:
            if parts == ["none"] or parts == [""]:
                return cls()
            if parts[0] == "reverse-sigmoid" and len(parts) == 3:
                beta, gamma = float(parts[1]), float(parts[2])
                if beta <= 0 or gamma <= 0:
                    raise ValueError
                return cls("reverse-sigmoid", beta=beta, gamma=gamma)
            if parts[0] == "noise" and len(parts) == 2:
                sigma = float(parts[1])
                if sigma <= 0:
                    raise ValueError
                return cls("noise", sigma=sigma)
        except ValueError:
            pass
        raise ValueError(
            f"perturbation {spec!r}: use none, reverse-sigmoid:BETA:GAMMA or noise:SIGMA "
            "with positive numbers"
        )

    def __str__(self) -> str:
        if self.kind == "reverse-sigmoid":
            return f"reverse-sigmoid:{self.beta:g}:{self.gamma:g}"
        if self.kind == "noise":
            return f"noise:{self.sigma:g}"
        return "none"

    def apply(self, probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.kind == "reverse-sigmoid":
            return reverse_sigmoid(probs, self.beta, self.gamma)
        if self.kind == "noise":
            return noise(probs, self.sigma, rng)
        return probs
