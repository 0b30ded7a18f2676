"""Judging detectors out of sample: false alarms and queries to detection, per family.

A detector's figures count only on data that neither trained nor calibrated it. So streams
come from named families, each marked *held out* or not relative to the detectors' training:

* benign streams: distinct public in-domain images (the victim's ``pool`` split, which no
  detector saw), each stream under one benign-shift family (:mod:`mlaas.shifts`), as an
  honest user whose photos all come from the same camera and habits;
* attack streams: Knockoff nets with random sampling, that is distinct images of one
  out-of-distribution family in a random order (crops of photographs the detector never saw,
  MNIST digits, synthetic textures, pixel noise, any registered set or ImageFolder).

Each stream is one client's first ``length`` queries. Every detector runs on every stream
from a fresh state, as the server runs it (same forward pass, same detector code), and
leaves its *decision path*: the statistic it compares with its threshold after each query
(CUSUM's sum; PRADA's Shapiro-Wilk W at each of its tests, NaN in between). From the paths
follow, for the deployed threshold or any other, which benign streams alarm (false alarms)
and after how many queries each attack stream alarms (detection delay): hence the trade-off
curves, at no extra cost.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from defense.detectors import CusumDetector, Detector, Observation, Prada
from mlaas.datasets import ImageSet
from mlaas.shifts import apply_shift


@dataclass(frozen=True)
class Family:
    """A kind of client: ``benign`` with a shift, or ``attack`` from a data set."""

    kind: str  # "benign" or "attack"
    name: str  # the shift (benign) or the data set spec (attack)
    held_out: bool

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.name}"


def benign_streams(
    pool: ImageSet, shift: str, count: int, length: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """``count`` honest clients, each sending ``length`` distinct pool images under ``shift``."""
    streams = []
    for _ in range(count):
        chosen = rng.choice(len(pool), min(length, len(pool)), replace=False)
        streams.append(apply_shift(shift, pool.get_batch(chosen), rng))
    return streams


def attack_streams(
    source: ImageSet, count: int, length: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """``count`` Knockoff clients (random strategy), each querying ``length`` distinct images
    of ``source`` in a random order."""
    return [
        source.get_batch(rng.choice(len(source), min(length, len(source)), replace=False))
        for _ in range(count)
    ]


def decision_paths(
    detectors: Sequence[Detector], victim_forward, streams: list[np.ndarray]
) -> dict[str, np.ndarray]:
    """Per detector, a ``(streams, length)`` array of its decision statistic after each query.

    ``victim_forward(images) -> (probs, features)`` is the victim's one forward pass.
    """
    length = max(len(s) for s in streams)
    paths = {d.name: np.full((len(streams), length), np.nan) for d in detectors}
    for row, images in enumerate(streams):
        probs, features = victim_forward(images)
        logits = np.log(np.maximum(probs, 1e-12)).astype(np.float32)
        batch = Observation(images, logits, probs, features)
        for detector in detectors:
            paths[detector.name][row, : len(images)] = _path(detector, batch)
    return paths


def _path(detector: Detector, batch: Observation) -> np.ndarray:
    if isinstance(detector, CusumDetector):
        return detector.observe(detector.initial_state(), batch).path
    # PRADA (or any other): fed a test's worth of queries at a time, its statistic recorded
    # after the query that closed each test. In one batch it would skip, after its first
    # alarm, the tests a lower threshold would still need for the trade-off curves.
    step = detector.TEST_EVERY if isinstance(detector, Prada) else 1
    state = detector.initial_state()
    path = np.full(len(batch), np.nan)
    for start in range(0, len(batch), step):
        end = min(start + step, len(batch))
        part = Observation(
            batch.images[start:end],
            batch.logits[start:end],
            batch.probs[start:end],
            batch.features[start:end],
        )
        path[start] = detector.observe(state, part).statistic
    return path


def alarms_below(detector: Detector) -> bool:
    """PRADA alarms when W falls below delta; the CUSUM detectors when the sum rises above."""
    return detector.direction == "below"


def first_alarm(paths: np.ndarray, threshold: float, below: bool) -> np.ndarray:
    """Per stream, the 1-based query count at the first alarm, or 0 where none."""
    with np.errstate(invalid="ignore"):
        crossed = paths < threshold if below else paths > threshold
    crossed &= ~np.isnan(paths)
    hit = crossed.any(axis=1)
    return np.where(hit, crossed.argmax(axis=1) + 1, 0)


def tradeoff(
    paths_benign: np.ndarray,
    paths_attack: np.ndarray,
    below: bool,
    points: int = 60,
    include: Sequence[float] = (),
) -> list[tuple[float, float, float]]:
    """``(threshold, false-alarm rate, median queries to detection)`` as the threshold sweeps
    from where every benign stream alarms to where no attack stream does, plus the thresholds
    in ``include`` (the deployed one, say). A median of ``inf`` means that at most half of
    the attack streams were caught."""
    benign = _extreme(paths_benign, below)
    benign = benign[np.isfinite(benign)]
    extremes = np.concatenate([benign, _extreme(paths_attack, below)])
    extremes = extremes[np.isfinite(extremes)]
    if len(extremes) == 0:
        return []
    # Each benign stream's extreme is where it stops alarming, so each is a step of the
    # false-alarm rate; quantiles of all extremes fill in the delays beyond; a step past the
    # lowest and the highest makes the sweep reach both ends (everyone alarms, no one does).
    ends = [np.nextafter(extremes.min(), -np.inf), np.nextafter(extremes.max(), np.inf)]
    candidates = np.unique(
        np.r_[
            np.quantile(extremes, np.linspace(0, 1, points)),
            np.nextafter(benign, -np.inf if below else np.inf),
            ends,
            np.asarray(include, float),
        ]
    )
    if below:
        candidates = candidates[::-1]  # from everyone alarming to no one, as for the others
    curve = []
    for threshold in candidates:
        false_alarms = float((first_alarm(paths_benign, threshold, below) > 0).mean())
        delays = first_alarm(paths_attack, threshold, below).astype(float)
        delays[delays == 0] = np.inf
        curve.append((float(threshold), false_alarms, float(np.median(delays))))
    return curve


def _extreme(paths: np.ndarray, below: bool) -> np.ndarray:
    """The threshold just past which each stream would never alarm."""
    valid = ~np.isnan(paths).all(axis=1)
    values = np.full(len(paths), np.nan)
    if valid.any():
        rows = paths[valid]
        values[valid] = np.nanmin(rows, axis=1) if below else np.nanmax(rows, axis=1)
    return values
