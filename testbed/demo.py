"""``mlaas demo``: the whole testbed, offline, on the embedded default, in a few minutes.

The demo is an experiment preset, ``testbed/presets/demo.yaml`` (``experiments/demo.yaml``
links to it), that the harness runs side by side: the default victim, trained or reused, with
its default detectors on, one ``mlaas serve`` process, and at it at once, each under its own
key, benign clients, a Knockoff nets adversary (natural crops), the realistic adversary
(in-domain pool) and a JBDA adversary. This module fits the preset to the command's options
and shows the outcome as one table (queries, substitute accuracy and fidelity, alerts and the
query count at the first one, benign false alarms); the harness writes the report.
"""

from __future__ import annotations

import json
import shutil
import time
from importlib.resources import files
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from testbed.experiments.config import ExperimentConfig, parse_yaml
from testbed.experiments.report import alerts_text, load_records, write_report
from testbed.experiments.runner import run_experiment

PRESET = files("testbed").joinpath("presets", "demo.yaml")


class DemoError(RuntimeError):
    """The demo's server never started: its victim or detectors could not be made."""


def demo_config(
    *,
    victim_dir: Path,
    benign_clients: int = 3,
    benign_queries: int = 300,
    budget: int = 1000,
    eval_size: int = 2000,
) -> ExperimentConfig:
    """The preset with the command's options: where the victim lives, the benign traffic,
    every attacker's budget (the preset's checkpoints below it kept) and the test images."""
    data = parse_yaml(PRESET.read_text(), str(PRESET))
    (victim,) = data["victims"]
    victim["directory"] = str(victim_dir)
    data["benign"].update(clients=benign_clients, queries=benign_queries)
    data["eval_size"] = eval_size
    for attacker in data["attackers"]:
        top = _budget(attacker, budget)
        attacker["budgets"] = sorted({b for b in attacker["budgets"] if b < top} | {top})
    return ExperimentConfig.model_validate(data)


def _budget(attacker: dict[str, Any], budget: int) -> int:
    """``budget``, but room enough for JBDA's seed set and two rounds, each doubling its
    images: with fewer, JBDA would not have augmented anything."""
    if attacker["attack"] == "jbda":
        return max(budget, 4 * attacker["seed_size"])
    return budget


def run_demo(
    config: ExperimentConfig, workdir: Path, *, console: Console, out: Console
) -> dict[str, Any]:
    """Run the demo into ``workdir`` afresh (the victim and its detectors live elsewhere),
    write ``summary.json`` and the report, and print the table."""
    started = time.perf_counter()
    if workdir.exists():
        shutil.rmtree(workdir)
    run_experiment(config, workdir, console=console)
    summary = summarise(config, workdir, time.perf_counter() - started)
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    report = write_report(workdir)
    show(out, summary, report)
    return summary


def summarise(config: ExperimentConfig, workdir: Path, seconds: float) -> dict[str, Any]:
    """Every client of the demo's one server group, benign first, as the provider saw it."""
    ok, failed, groups = load_records(workdir)
    if not groups:  # the group never served: its victim or detectors failed
        errors = sorted({r["error"] for r in failed})
        raise DemoError(f"the demo could not start: {'; '.join(errors)}")
    (group,) = groups.values()
    records = {r["id"]: r for r in ok + failed}
    rows = [
        _row(c["client"], "benign", c, api_accuracy=c["accuracy"])
        for c in group["benign"]["clients"]
    ]
    for cell in config.cells():
        record = records[cell.id]
        final = record["metrics"]["final"] if record["status"] == "ok" else {}
        rows.append(
            _row(
                cell.attacker.name,
                cell.attacker.attack,
                record,
                accuracy=final.get("accuracy"),
                fidelity=final.get("fidelity"),
            )
        )
    benign = [r for r in rows if r["kind"] == "benign"]
    return {
        "victim": group["victim"]["name"],
        "victim_test_accuracy": group["victim"]["test_accuracy"],
        "clients": rows,
        "benign_false_alarms": sum(1 for r in benign if r["alerts"]),
        "benign_clients": len(benign),
        "log_rows": group["log_rows"],
        "queries_answered": sum(r["queries"] for r in rows),
        "experimenter_queries": group["experimenter_queries"],
        "server_exit_code": group["server_exit_code"],
        "seconds": round(seconds, 1),
    }


def _row(name: str, kind: str, seen: dict[str, Any], **scores: float | None) -> dict[str, Any]:
    alerts = seen.get("alerts") or {}
    return {
        "client": name,
        "kind": kind,
        "queries": seen.get("queries_logged", 0),
        "accuracy": scores.get("accuracy"),
        "fidelity": scores.get("fidelity"),
        "api_accuracy": scores.get("api_accuracy"),
        "alerts": alerts,
        "first_alert_at": min(alerts.values()) if alerts else None,
        "error": seen.get("error"),
    }


def _pct(value: float | None) -> str:
    return f"{value:.1%}" if value is not None else "-"


def show(out: Console, summary: dict[str, Any], report: Path) -> None:
    table = Table(title=f"mlaas demo against {summary['victim']}")
    for column in ("client", "queries", "substitute acc.", "fidelity", "API acc.", "alerts"):
        table.add_column(column, justify="left" if column in ("client", "alerts") else "right")
    for row in summary["clients"]:
        alerts = alerts_text(row["alerts"])
        if row["kind"] != "benign" and row["alerts"]:
            alerts = f"[red]{alerts}[/]"
        elif row["kind"] == "benign" and row["alerts"]:
            alerts = f"[yellow]false alarm: {alerts}[/]"
        table.add_row(
            row["client"] + (f" [red]({row['error']})[/]" if row["error"] else ""),
            f"{row['queries']:,}",
            _pct(row["accuracy"]),
            _pct(row["fidelity"]),
            _pct(row["api_accuracy"]),
            alerts,
        )
    out.print(table)
    out.print(
        f"victim test accuracy {_pct(summary['victim_test_accuracy'])}; benign false alarms "
        f"{summary['benign_false_alarms']} of {summary['benign_clients']}; "
        f"{summary['log_rows']:,} log rows = {summary['queries_answered']:,} client queries + "
        f"{summary['experimenter_queries']:,} the experimenter's (fidelity on the test split)"
    )
    out.print(f"report: {report}")
