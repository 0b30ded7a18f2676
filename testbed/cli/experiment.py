"""Experiments and the demo: `mlaas experiment run|report`, `mlaas demo`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from testbed.cli.common import (
    app,
    err,
    experiment_app,
    fail,
    out,
)


@experiment_app.command("run")
def experiment_run(
    config: Annotated[Path, typer.Argument(help="Experiment YAML (see experiments/)")],
    out: Annotated[
        Path | None, typer.Option("--out", help="Run directory; default var/experiments/NAME")
    ] = None,
    report: Annotated[bool, typer.Option(help="Write the report at the end")] = True,
) -> None:
    """Run every cell of the matrix (resumable: finished cells are skipped)."""
    from pydantic import ValidationError

    from testbed.experiments.config import ExperimentConfig
    from testbed.experiments.report import write_report
    from testbed.experiments.runner import run_experiment

    try:
        parsed = ExperimentConfig.load(config)
    except (ValidationError, ValueError, FileNotFoundError) as exc:
        raise fail(f"{config}: {exc}") from exc
    directory = out or Path("var/experiments") / parsed.name

    def show(cell, record):
        if record["status"] == "ok":
            final = record["metrics"]["final"]
            err.print(
                f"  [green]ok[/] {cell.attacker.name} ({cell.granularity}, {cell.defense.name}): "
                f"accuracy {final['accuracy']:.2%}, alerts {record['alerts'] or '-'}"
            )
        else:
            err.print(f"  [red]failed[/] {cell.id}: {record['error']}")

    counts = run_experiment(
        parsed, directory, console=err, config_text=config.read_text(), on_cell=show
    )
    err.print(
        f"{counts['cells']} cells: {counts['ok']} run, {counts['skipped']} already done, "
        f"{counts['failed']} failed; results in {directory}"
    )
    if report:
        print(write_report(directory))


@experiment_app.command("report")
def experiment_report(
    directory: Annotated[Path, typer.Argument(help="A directory `mlaas experiment run` wrote")],
) -> None:
    """Write report.md and figures/ from an experiment's records."""
    from testbed.experiments.report import write_report

    if not (directory / "cells").is_dir():
        raise fail(f"{directory} holds no experiment records (no cells/ directory)")
    print(write_report(directory))


@app.command("demo")
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the demo writes")] = Path("var/demo"),
    victim: Annotated[Path, typer.Option(help="Victim directory; trained if missing")] = Path(
        "var/victims/fashion"
    ),
    benign_clients: Annotated[int, typer.Option(help="Benign clients")] = 3,
    benign_queries: Annotated[int, typer.Option(help="Queries per benign client")] = 300,
    budget: Annotated[int, typer.Option(help="Queries per attacker")] = 1000,
    eval_size: Annotated[int, typer.Option(help="Test images for accuracy/fidelity")] = 2000,
) -> None:
    """The testbed in one command: serve the victim with detectors, let benign clients and
    three attackers at it side by side, and report who stole what and who was caught."""
    from testbed.demo import DemoError, demo_config, run_demo

    try:
        config = demo_config(
            victim_dir=victim,
            benign_clients=benign_clients,
            benign_queries=benign_queries,
            budget=budget,
            eval_size=eval_size,
        )
        run_demo(config, workdir, console=err, out=out)
    except (ValueError, DemoError) as exc:  # options out of range, or no victim to serve
        raise fail(str(exc)) from exc
