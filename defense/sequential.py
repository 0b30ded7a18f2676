"""Per-client sequential decisions over a stream of per-query scores.

One out-of-distribution query proves nothing; a client whose queries keep looking foreign
does. CUSUM (Page, 1954) accumulates ``score - drift`` and alarms when the sum passes a
threshold. The drift sits just above typical benign scores, so benign streams hover at zero;
the threshold is calibrated by simulating benign streams until the chance that one of a given
length ever alarms is the stated false-alarm rate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Cusum:
    drift: float
    threshold: float

    def run(self, statistic: float, scores: np.ndarray) -> tuple[np.ndarray, int | None]:
        """The statistic after each score, and the index of the first alarm (if any)."""
        path = np.empty(len(scores), dtype=np.float64)
        alarm = None
        for i, score in enumerate(np.asarray(scores, dtype=np.float64)):
            statistic = max(0.0, statistic + float(score) - self.drift)
            path[i] = statistic
            if alarm is None and statistic > self.threshold:
                alarm = i
        return path, alarm


def calibrate_cusum(
    benign_scores: np.ndarray,
    *,
    false_alarm_rate: float = 0.001,
    stream_length: int = 1000,
    drift_quantile: float = 0.95,
    streams: int = 20_000,
    margin: float = 1.25,
    seed: int = 0,
) -> Cusum:
    """Drift and threshold such that a benign stream of ``stream_length`` queries alarms with
    probability about ``false_alarm_rate``.

    Benign streams are drawn by a smoothed bootstrap of ``benign_scores`` (held-out
    in-distribution queries, each jittered by a Gaussian kernel of Silverman's bandwidth), so
    that streams can hold values beyond the sample's extremes, which is where CUSUM's false
    alarms come from. Even so a finite sample has a lighter tail than the truth, and real
    benign clients vary more than a held-out set: ``margin`` widens the threshold for both.
    """
    scores = np.asarray(benign_scores, dtype=np.float64)
    if scores.ndim != 1 or len(scores) < 50:
        raise ValueError("calibration needs at least 50 benign scores")
    if not 0 < false_alarm_rate < 1:
        raise ValueError("the false-alarm rate is a probability in (0, 1)")
    drift = float(np.quantile(scores, drift_quantile))
    rng = np.random.default_rng(seed)
    bandwidth = 1.06 * float(np.std(scores)) * len(scores) ** -0.2
    statistic = np.zeros(streams)
    peak = np.zeros(streams)
    for _ in range(stream_length):
        draws = rng.choice(scores, streams) + rng.normal(0.0, bandwidth, streams)
        statistic = np.maximum(0.0, statistic + draws - drift)
        np.maximum(peak, statistic, out=peak)
    threshold = float(np.quantile(peak, 1.0 - false_alarm_rate)) * margin
    spread = float(np.std(scores)) or 1.0
    return Cusum(drift=drift, threshold=max(threshold, spread))
