"""Detector artifacts (what ``mlaas defense train`` fits, one ``.npz`` per detector) and the
ready detectors made from them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from defense.detectors.base import Detector
from defense.detectors.cusum import Mahalanobis, MaxSoftmax, OodBinary
from defense.detectors.prada import Prada
from defense.options import DETECTORS
from defense.sequential import Cusum


def artifact_path(directory: Path, name: str) -> Path:
    return Path(directory) / f"{name}.npz"


def save_artifact(directory: Path, name: str, arrays: dict[str, np.ndarray], meta: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = artifact_path(directory, name)
    with path.open("wb") as handle:
        # numpy's stub lets mypy match the arrays against savez's own allow_pickle flag; no
        # artifact has an array of that name, so every one is saved as an array.
        np.savez(handle, meta=np.array(json.dumps(meta)), **arrays)  # type: ignore[arg-type]
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


def load_detector(
    name: str,
    directory: Path,
    *,
    prada_delta: float | None = None,
    prada_state_bytes: int | None = None,
) -> Detector:
    """A ready detector; those that need training read their artifact from ``directory``.

    PRADA runs untrained too: with ``prada_delta``, else its calibrated delta if there is an
    artifact, else the paper's 0.95; ``prada_state_bytes`` bounds its growing sets.
    """
    if name == "prada":
        if prada_delta is None and artifact_path(directory, name).exists():
            prada_delta = float(load_artifact(directory, name)[1]["delta"])
        bounds = {} if prada_state_bytes is None else {"growing_set_bytes": prada_state_bytes}
        return Prada(delta=prada_delta if prada_delta is not None else 0.95, **bounds)
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; choose from {', '.join(DETECTORS)}")
    arrays, meta = load_artifact(directory, name)
    cusum = Cusum(
        drift=meta["drift"], threshold=meta["threshold"], cap=meta.get("cap", float("inf"))
    )
    if name == "msp":
        return MaxSoftmax(cusum)
    if name == "mahalanobis":
        return Mahalanobis(cusum, arrays["means"], arrays["precision"])
    return OodBinary(cusum, arrays["mean"], arrays["scale"], arrays["coef"], float(arrays["bias"]))
