"""Fitting and calibrating the detectors that need it: what ``mlaas defense train`` runs.

Data, all of it the provider's own:
* in-distribution: a seeded sample of the victim's training split (what the classifier knows);
* out-of-distribution (``ood-binary`` only): a registered data set, by default crops of one
  half of the photographs (``natural-crops:photos-b``), the offline stand-in for the natural
  images Knockoff nets queries with. The other half (``photos-a``) is kept for judging, and
  for the attackers of the demo and the experiments;
* calibration: the victim's test split as benign users send it, under the benign-shift
  families named by ``calibrate_on`` (:mod:`mlaas.shifts`: by default mild variations, zoom,
  JPEG and sensor noise; rotation, contrast, blur and mixtures stay held out for judging).
  Each threshold is set so that a benign client of *any* calibration family who sends
  ``stream_length`` queries alarms with probability at most ``false_alarm_rate``.

``ood-binary`` learns from the same families: its in-distribution side holds the training
images both as they are and shifted, so that a benign user's zoomed or re-compressed photo
is not what it learns to call foreign (as it did when it only saw pristine images).

Artifacts are ``.npz`` files (arrays and a JSON header, no pickles) in
``<victim>/defense/``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from defense.detectors import (
    DETECTORS,
    Mahalanobis,
    MaxSoftmax,
    Observation,
    OodBinary,
    Prada,
    save_artifact,
)
from defense.sequential import calibrate_cusum
from mlaas.datasets import ImageSet, load_dataset
from mlaas.images import to_tensor
from mlaas.models import Classifier
from mlaas.modelstore import load_model
from mlaas.shifts import CALIBRATION_SHIFTS, compose_shifts, parse_shifts, shift_mixture

TRAINABLE = ("ood-binary", "msp", "mahalanobis", "prada")
DEFAULT_OUTLIERS = "natural-crops:photos-b"
HELD_OUT_OUTLIERS = "natural-crops:photos-a"
PRADA_STREAMS = 40
PRADA_MARGIN = 0.01
PRADA_PAPER_DELTA = 0.95


def calibrate_prada(
    images: np.ndarray,
    probs: np.ndarray,
    *,
    stream_length: int,
    streams: int = PRADA_STREAMS,
    batch: int = 10,
    groups: np.ndarray | None = None,
    seed: int = 0,
) -> tuple[float, list[float]]:
    """PRADA's delta for this victim: the paper's 0.95 where simulated benign streams never
    go below it, else below the lowest Shapiro-Wilk W they reach, less a margin. Juuti et al.
    tune delta per data set too. With ``groups`` (a family per image), each stream is drawn
    from one family, as a real client's queries all come from the same camera and habits.
    Fed ``batch`` = 10 queries at a time, the statistic after each batch is the W of every
    one of PRADA's tests (it tests after every tenth query), so no low W goes unseen."""
    rng = np.random.default_rng(seed)
    groups = np.zeros(len(images), dtype=int) if groups is None else np.asarray(groups)
    families = np.unique(groups)
    lowest = []
    prada = Prada(delta=0.5)
    for stream in range(streams):
        members = np.flatnonzero(groups == families[stream % len(families)])
        order = rng.choice(members, min(stream_length, len(members)), replace=False)
        state, seen = prada.initial_state(), []
        for start in range(0, len(order), batch):
            chunk = order[start : start + batch]
            observation = Observation(images[chunk], np.log(probs[chunk] + 1e-12), probs[chunk],
                                      np.zeros((len(chunk), 1), np.float32))  # fmt: skip
            statistic = prada.observe(state, observation).statistic
            if np.isfinite(statistic):
                seen.append(statistic)
        lowest.append(min(seen) if seen else 1.0)
    return min(PRADA_PAPER_DELTA, float(min(lowest)) - PRADA_MARGIN), lowest


def forward(model: Classifier, images: ImageSet | np.ndarray, batch: int = 512):
    """Probabilities and penultimate features, as the server computes them."""
    probs, features = [], []
    count = len(images)
    with torch.inference_mode():
        for start in range(0, count, batch):
            index = np.arange(start, min(start + batch, count))
            chunk = images.get_batch(index) if isinstance(images, ImageSet) else images[index]
            logits, feats = model.forward_with_features(to_tensor(chunk))
            probs.append(torch.softmax(logits, 1).numpy())
            features.append(feats.flatten(1).numpy())
    return np.concatenate(probs), np.concatenate(features)


def _indices(total: int, size: int, seed: int) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(total, min(size, total), replace=False))


def _sample(images: ImageSet, size: int, seed: int) -> np.ndarray:
    return images.get_batch(_indices(len(images), size, seed))


def train_detectors(
    names: list[str],
    victim_dir: Path,
    *,
    outliers: str = DEFAULT_OUTLIERS,
    held_out_outliers: str | None = HELD_OUT_OUTLIERS,
    calibrate_on: str | Sequence[str] = CALIBRATION_SHIFTS,
    size: int = 10_000,
    false_alarm_rate: float = 0.001,
    stream_length: int = 1000,
    out_dir: Path | None = None,
    seed: int = 0,
) -> dict[str, dict]:
    for name in names:
        if name not in TRAINABLE:
            raise ValueError(
                f"{name!r} needs no training"
                if name in DETECTORS
                else f"unknown detector {name!r}; trainable: {', '.join(TRAINABLE)}"
            )
    families = parse_shifts(calibrate_on)
    out_dir = out_dir or Path(victim_dir) / "defense"
    model, card = load_model(victim_dir)
    dataset = card.dataset.split(":")[0]
    shape = card.shape
    train_set = load_dataset(f"{dataset}:train", shape)
    in_index = _indices(len(train_set), size, seed)
    in_images = train_set.get_batch(in_index)
    in_labels = np.asarray(train_set.labels)[in_index]
    _, in_features = forward(model, in_images)
    # One group per calibration family, and one of them combined: users combine habits.
    calibration, cal_family = shift_mixture(
        families,
        _sample(load_dataset(f"{dataset}:test", shape), size, seed + 1),
        np.random.default_rng(seed + 2),
        composed=True,
    )
    cal_probs, cal_features = forward(model, calibration)
    reports = {}
    for name in names:
        started = time.perf_counter()
        meta: dict = {
            "detector": name,
            "victim": card.name,
            "in_distribution": f"{dataset}:train ({len(in_images)})",
            "calibration": (
                f"{dataset}:test under {', '.join(families)}, alone and combined "
                f"({len(calibration)})"
            ),
            "calibration_shifts": families,
            "false_alarm_rate": false_alarm_rate,
            "stream_length": stream_length,
        }
        arrays: dict[str, np.ndarray] = {}
        if name == "prada":
            delta, lowest = calibrate_prada(
                calibration, cal_probs, stream_length=stream_length, groups=cal_family, seed=seed
            )
            meta.update(
                delta=delta,
                benign_streams=len(lowest),
                benign_lowest_w=[round(w, 4) for w in sorted(lowest)[:5]],
                seconds=round(time.perf_counter() - started, 2),
            )
            save_artifact(out_dir, name, {}, meta)
            reports[name] = meta
            continue
        if name == "msp":
            benign = MaxSoftmax.raw_score(cal_probs)
        elif name == "mahalanobis":
            means, precision = Mahalanobis.fit(in_features, in_labels)
            arrays = {"means": means, "precision": precision}
            benign = Mahalanobis.distances(cal_features, means, precision)
        else:
            out_images = _sample(load_dataset(outliers, shape, seed=seed), size, seed)
            _, out_features = forward(model, out_images)
            # The training images again, as benign users of the calibration families send
            # them, alone and combined: the in-distribution side, so that a shift is not what
            # makes "foreign".
            rng = np.random.default_rng(seed + 4)
            _, shifted_features = forward(model, compose_shifts(families, in_images, rng))
            benign_side = np.concatenate([in_features, shifted_features])
            both = np.concatenate([benign_side, out_features])
            scaler = StandardScaler().fit(both)
            classifier = LogisticRegression(max_iter=2000, C=1.0)
            classifier.fit(
                scaler.transform(both),
                np.r_[np.zeros(len(benign_side)), np.ones(len(out_features))],
            )
            arrays = {
                "mean": scaler.mean_,
                "scale": scaler.scale_,
                "coef": classifier.coef_[0],
                "bias": np.array(classifier.intercept_[0]),
            }
            benign = OodBinary.log_odds(cal_features, **_args(arrays))
            meta["outliers"] = outliers
            if held_out_outliers == outliers:  # trained on the usual held-out half
                held_out_outliers = DEFAULT_OUTLIERS if outliers != DEFAULT_OUTLIERS else None
            if held_out_outliers:
                held_out = load_dataset(held_out_outliers, shape, seed=seed + 1000)
                _, held_features = forward(model, _sample(held_out, 2000, seed + 3))
                foreign = OodBinary.log_odds(held_features, **_args(arrays))
                meta["held_out_outliers"] = held_out_outliers
                meta["held_out_auc"] = float(
                    roc_auc_score(
                        np.r_[np.zeros(len(benign)), np.ones(len(foreign))],
                        np.r_[benign, foreign],
                    )
                )
        cusum = calibrate_cusum(
            benign,
            groups=cal_family,
            false_alarm_rate=false_alarm_rate,
            stream_length=stream_length,
            seed=seed,
        )
        meta.update(drift=cusum.drift, threshold=cusum.threshold, cap=cusum.cap)
        meta["seconds"] = round(time.perf_counter() - started, 2)
        save_artifact(out_dir, name, arrays, meta)
        reports[name] = meta
    return reports


def _args(arrays: dict[str, np.ndarray]) -> dict:
    return {
        "mean": arrays["mean"],
        "scale": arrays["scale"],
        "coef": arrays["coef"],
        "bias": float(arrays["bias"]),
    }
