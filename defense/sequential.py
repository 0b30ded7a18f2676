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
    cap: float = float("inf")
    """Scores above this count as this: a robust CUSUM (Huber-style clipping), so that a few
    wild queries in a benign stream cannot raise an alarm that a stream of merely foreign
    ones would. Calibration sets it at the top of what benign clients ever sent."""

    def run(self, statistic: float, scores: np.ndarray) -> tuple[np.ndarray, int | None]:
        """The statistic after each score, and the index of the first alarm (if any)."""
        path = np.empty(len(scores), dtype=np.float64)
        alarm = None
        clipped = np.minimum(np.asarray(scores, dtype=np.float64), self.cap)
        for i, score in enumerate(clipped):
            statistic = max(0.0, statistic + float(score) - self.drift)
            path[i] = statistic
            if alarm is None and statistic > self.threshold:
                alarm = i
        return path, alarm


def calibrate_cusum(
    benign_scores: np.ndarray,
    *,
    groups: np.ndarray | None = None,
    false_alarm_rate: float = 0.001,
    stream_length: int = 1000,
    drift_quantile: float = 0.95,
    cap_quantile: float = 0.999,
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

    ``groups`` (one label per score: the benign-shift family it came from) makes each
    simulated stream draw from one group only, because a real client's queries share their
    camera and habits; drift and threshold then hold for the worst group, not the average.

    And the next user's habits are none of the groups. With three groups or more the
    threshold extrapolates, leave one family out: had the worst group been unseen, the others
    would have set a threshold too low by a factor; the threshold is widened by that factor
    (or by ``margin``, whichever is larger), so that an unseen family as much worse than the
    seen ones as the worst seen one was than the rest stays within the rate.
    """
    scores = np.asarray(benign_scores, dtype=np.float64)
    if scores.ndim != 1 or len(scores) < 50:
        raise ValueError("calibration needs at least 50 benign scores")
    if not 0 < false_alarm_rate < 1:
        raise ValueError("the false-alarm rate is a probability in (0, 1)")
    groups = np.zeros(len(scores), dtype=int) if groups is None else np.asarray(groups)
    if groups.shape != scores.shape:
        raise ValueError("groups needs one label per benign score")
    members = [scores[groups == g] for g in np.unique(groups)]
    if min(len(m) for m in members) < 50:
        raise ValueError("calibration needs at least 50 benign scores in every group")
    drift = max(float(np.quantile(m, drift_quantile)) for m in members)
    cap = max(float(np.quantile(m, cap_quantile)) for m in members)
    members = [np.minimum(m, cap) for m in members]
    rng = np.random.default_rng(seed)
    per_group = max(1, streams // len(members))
    needed = []  # per group, the threshold its own streams need
    for group_scores in members:
        bandwidth = 1.06 * float(np.std(group_scores)) * len(group_scores) ** -0.2
        statistic = np.zeros(per_group)
        peak = np.zeros(per_group)
        for _ in range(stream_length):
            draws = rng.choice(group_scores, per_group) + rng.normal(0.0, bandwidth, per_group)
            draws = np.minimum(draws, cap)
            statistic = np.maximum(0.0, statistic + draws - drift)
            np.maximum(peak, statistic, out=peak)
        needed.append(float(np.quantile(peak, 1.0 - false_alarm_rate)))
    ranked = sorted(needed, reverse=True)
    if len(ranked) >= 3 and ranked[1] > 0:
        margin = max(margin, ranked[0] / ranked[1])
    spread = float(np.std(scores)) or 1.0
    return Cusum(drift=drift, threshold=max(ranked[0] * margin, spread), cap=cap)
