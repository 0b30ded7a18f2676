"""The provider's detectors: `mlaas defense train`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mlaas.shifts import CALIBRATION_SHIFTS
from testbed.cli.common import (
    defense_app,
    err,
    fail,
)


@defense_app.command("train")
def defense_train(
    names: Annotated[
        list[str],
        typer.Argument(
            help="Detectors: ood-binary, msp, mahalanobis, prada, all, or default (the set "
            "`mlaas serve --detector default` serves)"
        ),
    ],
    victim: Annotated[Path, typer.Option(help="Victim directory")] = Path("var/victims/fashion"),
    outliers: Annotated[
        str,
        typer.Option(
            help="Out-of-distribution images for ood-binary (default: crops of half of the "
            "photographs; the other half, natural-crops:photos-a, stays held out)"
        ),
    ] = "natural-crops:photos-b",
    calibrate_on: Annotated[
        str,
        typer.Option(
            help="Benign-shift families to calibrate on (comma-separated, or all); "
            "see mlaas.shifts. The rest stay held out for bench/detection.py"
        ),
    ] = ",".join(CALIBRATION_SHIFTS),
    size: Annotated[int, typer.Option(help="Images per training and calibration set")] = 10_000,
    false_alarm_rate: Annotated[
        float, typer.Option(help="Chance that a benign client of --stream-length queries alarms")
    ] = 0.001,
    stream_length: int = 1000,
    out: Annotated[
        Path | None, typer.Option(help="Artifact directory; default <victim>/defense")
    ] = None,
    seed: int = 0,
) -> None:
    """Fit and calibrate detectors; `mlaas serve --detector NAME` finds them."""
    from defense.detectors import DEFAULT_DETECTORS
    from defense.training import TRAINABLE, train_detectors
    from mlaas.datasets import DatasetUnavailable

    chosen = {"all": list(TRAINABLE), "default": list(DEFAULT_DETECTORS)}.get(
        ",".join(names), names
    )
    try:
        with err.status(f"training {', '.join(chosen)}"):
            reports = train_detectors(
                chosen,
                victim,
                outliers=outliers,
                calibrate_on=calibrate_on,
                size=size,
                false_alarm_rate=false_alarm_rate,
                stream_length=stream_length,
                out_dir=out,
                seed=seed,
            )
    except (DatasetUnavailable, FileNotFoundError, ValueError) as exc:
        raise fail(str(exc)) from exc
    for name, meta in reports.items():
        if name == "prada":
            err.print(
                f"[green]prada[/]: delta {meta['delta']:.4f}, below the lowest W of "
                f"{meta['benign_streams']} benign streams of {meta['stream_length']} queries"
            )
            continue
        auc = f", held-out AUC {meta['held_out_auc']:.4f}" if "held_out_auc" in meta else ""
        err.print(
            f"[green]{name}[/]: CUSUM drift {meta['drift']:.4g}, threshold "
            f"{meta['threshold']:.4g} (false-alarm rate {meta['false_alarm_rate']} per "
            f"{meta['stream_length']} queries){auc}"
        )
