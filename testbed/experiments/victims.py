"""A server group's victim and its detectors: trained the first time, reused after.

A victim lives in ``OUT/victims/NAME-sSEED/`` unless its specification names a directory of
its own (``mlaas demo`` reuses ``var/victims/fashion``); its detectors live beside it, in
``defense/``, and are trained again only where a newer calibration protocol asks for it.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from mlaas.images import InputShape
from mlaas.modelstore import ModelCard, load_card
from testbed.experiments.config import VictimSpec


def ensure_victim(
    out: Path, spec: VictimSpec, seed: int, device: str, console: Console
) -> tuple[Path, ModelCard]:
    """The victim's directory and model card; trained into it first where it holds none."""
    from mlaas.training import TrainConfig
    from testbed.victim import train_victim

    directory = Path(spec.directory) if spec.directory else out / "victims" / f"{spec.name}-s{seed}"
    try:
        card = load_card(directory)
    except (FileNotFoundError, ValueError):
        pass
    else:
        console.print(
            f"[green]reusing victim[/] {directory}: {card.architecture} on {card.dataset}, "
            f"test accuracy {_pct(card.test_accuracy)}"
        )
        return directory, card
    console.print(f"[bold]training victim[/] {spec.name} into {directory}")
    shape = InputShape.parse(spec.input_shape) if spec.input_shape else None
    card = train_victim(
        directory,
        dataset=spec.dataset,
        arch=spec.arch,
        config=TrainConfig(epochs=spec.epochs, seed=seed, device=device),
        shape=shape,
        pretrained=spec.pretrained,
        name=spec.name,
        train_size=spec.train_size,
        progress=False,
    )
    console.print(
        f"[green]victim trained[/]: test accuracy {_pct(card.test_accuracy)} "
        f"in {card.training_seconds:.0f} s"
    )
    return directory, card


def ensure_detectors(victim_dir: Path, detectors: list[str], console: Console) -> None:
    """Train and calibrate the detectors the victim lacks, or has from an older protocol."""
    from defense.detectors import artifact_path, load_artifact
    from defense.training import train_detectors

    def current(name: str) -> bool:
        """Trained, and calibrated on benign-shift families (this version's protocol)."""
        if not artifact_path(victim_dir / "defense", name).exists():
            return False
        return "calibration_shifts" in load_artifact(victim_dir / "defense", name)[1]

    missing = [d for d in detectors if not current(d)]
    if not missing:
        console.print(f"[green]reusing[/] the {', '.join(detectors)} detectors")
        return
    with console.status(f"training and calibrating {', '.join(missing)}"):
        reports = train_detectors(missing, victim_dir)
    for name, meta in reports.items():
        if "delta" in meta:
            detail = f"delta {meta['delta']:.3f}"
        else:
            detail = f"CUSUM threshold {meta['threshold']:.3g}"
            if "held_out_auc" in meta:
                detail += f", AUC {meta['held_out_auc']:.4f} against unseen photographs"
        console.print(f"[green]{name} ready[/]: {detail}")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"
