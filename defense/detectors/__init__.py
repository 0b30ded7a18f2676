"""Detectors: each scores every query of a client and decides, per client, when to alarm.

All detectors share one interface. They read what the victim's single forward pass already
computed (logits, probabilities, penultimate features) or the input itself, update the
client's state, and report per-query scores, their decision statistic (after the batch, and
after each query where it has one) and the query, if any, at which the client crossed the
line: the statistic went past ``threshold``, above it or below it as ``direction`` says.

* ``ood-binary``   Atli et al.'s defense: a binary classifier on the victim's penultimate
                   features, in-distribution vs natural out-of-distribution images, whose
                   log-odds feed a per-client CUSUM.
* ``msp``          maximum softmax probability (Hendrycks & Gimpel), ``1 - max p``, + CUSUM.
* ``mahalanobis``  class-conditional Gaussians with a shared covariance on the features
                   (Lee et al.), the smallest Mahalanobis distance, + CUSUM.
* ``prada``        PRADA (Juuti et al.): per predicted class, a growing set of the client's
                   queries and each new query's minimum L2 distance to it; the Shapiro-Wilk
                   statistic of those distances below ``delta`` is an attack. As the authors'
                   reference implementation runs it, with the per-client state bounded.

Modules: ``base`` (the interface), ``cusum`` (the first three), ``prada``, ``artifacts``
(what training saves, and :func:`load_detector`). The package re-exports their names, and the
names the single module it replaced offered, so that ``from defense.detectors import X``
keeps working.
"""

from defense.detectors.artifacts import (
    artifact_path,
    load_artifact,
    load_detector,
    save_artifact,
)
from defense.detectors.base import Detector, DetectorResult, Observation
from defense.detectors.cusum import CusumDetector, Mahalanobis, MaxSoftmax, OodBinary
from defense.detectors.prada import Prada
from defense.options import DEFAULT_DETECTORS, DETECTORS
from defense.sequential import Cusum

__all__ = [
    "DEFAULT_DETECTORS",
    "DETECTORS",
    "Cusum",
    "CusumDetector",
    "Detector",
    "DetectorResult",
    "Mahalanobis",
    "MaxSoftmax",
    "Observation",
    "OodBinary",
    "Prada",
    "artifact_path",
    "load_artifact",
    "load_detector",
    "save_artifact",
]
