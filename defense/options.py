"""The defense's options as a deployment names them: the detectors and the alert policies.

Free of heavy imports (no SciPy, no NumPy): settings validate against these names without
loading the detectors.
"""

from __future__ import annotations

from enum import StrEnum

DETECTORS = ("ood-binary", "msp", "mahalanobis", "prada")
DEFAULT_DETECTORS = ("ood-binary", "mahalanobis")
"""What the demo serves: chosen by the held-out measurement of ``bench/detection.py`` (README)."""


class Policy(StrEnum):
    """What follows a client's alert (``defense.monitor``'s doc)."""

    monitor = "monitor"
    block = "block"
    deceive = "deceive"
