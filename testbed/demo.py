"""``mlaas demo``: the whole testbed, offline, on the embedded default, in a few minutes.

Train (or reuse) the default victim and its default detectors, serve it as a real
``mlaas serve`` process on loopback with detectors on (SQLite log, in-process state), then run
side by side, each under its own key: benign clients, a Knockoff nets adversary (natural
crops), the realistic adversary (in-domain pool) and a JBDA adversary. It ends with one table
(queries, substitute accuracy and fidelity, alerts and the query count at the first one) and a
report, Markdown plus PNG curves, under the work directory.

This module composes both halves, like the CLI: it is the one place, with ``cli``, that
reaches into ``server``, ``defense`` and ``attacker``.
"""

from __future__ import annotations

import io
import json
import secrets
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from defense.detectors import DEFAULT_DETECTORS
from mlaas.apiclient import AdminClient
from mlaas.datasets import load_dataset
from mlaas.modelstore import ModelCard, load_card
from mlaas.shifts import HELD_OUT_SHIFTS
from testbed.benign import benign_images, run_benign_client
from testbed.serverproc import ServerProcess

DETECTORS = DEFAULT_DETECTORS
KNOCKOFF_TRANSFER = "natural-crops:photos-a"
"""Crops of the photographs the detectors never trained on: the demo's alerts are out of
sample, as a real attacker's would be."""


@dataclass
class DemoPlan:
    benign_clients: int = 3
    benign_queries: int = 300
    knockoff_budget: int = 1000
    realistic_budget: int = 1000
    jbda_budget: int = 1200
    eval_size: int = 2000
    seed: int = 0


@dataclass
class ClientRun:
    name: str
    kind: str
    budget: int
    metrics: dict[str, Any] | None = None
    api_accuracy: float | None = None
    error: str | None = None
    alerts: dict[str, int] = field(default_factory=dict)
    queries: int = 0


def ensure_victim(victim_dir: Path, console: Console) -> ModelCard:
    try:
        card = load_card(victim_dir)
        console.print(
            f"[green]reusing victim[/] {victim_dir}: {card.architecture} on {card.dataset}, "
            f"test accuracy {card.test_accuracy:.2%}"
        )
        return card
    except (FileNotFoundError, ValueError):
        pass
    from testbed.victim import train_victim

    console.print(f"[bold]training the default victim[/] into {victim_dir} (1-2 minutes)")
    card = train_victim(victim_dir)
    console.print(
        f"[green]victim trained[/]: test accuracy {card.test_accuracy:.2%} "
        f"in {card.training_seconds:.0f} s"
    )
    return card


def ensure_detectors(victim_dir: Path, console: Console) -> None:
    """Train and calibrate the demo's detectors unless the victim already has them."""
    from defense.detectors import artifact_path, load_artifact
    from defense.training import train_detectors

    def current(name: str) -> bool:
        """Trained, and by this version's protocol (calibrated on benign-shift families)."""
        if not artifact_path(victim_dir / "defense", name).exists():
            return False
        return "calibration_shifts" in load_artifact(victim_dir / "defense", name)[1]

    missing = [d for d in DETECTORS if not current(d)]
    if not missing:
        console.print(f"[green]reusing[/] the {' and '.join(DETECTORS)} detectors")
        return
    with console.status(f"training and calibrating {', '.join(missing)} (about 20 s)"):
        reports = train_detectors(missing, victim_dir)
    for name, meta in reports.items():
        if "delta" in meta:
            detail = f"delta {meta['delta']:.3f}"
        else:
            detail = f"CUSUM threshold {meta['threshold']:.3g}"
            if "held_out_auc" in meta:
                detail += f", AUC {meta['held_out_auc']:.4f} against unseen photographs"
        console.print(f"[green]{name} ready[/]: {detail}")


def _benign(run: ClientRun, url: str, key: str, plan: DemoPlan, index: int, shape) -> None:
    pool = load_dataset("fashion-mnist:pool", shape)
    # Honest users whose habits the detectors were not calibrated on.
    shift = HELD_OUT_SHIFTS[index % len(HELD_OUT_SHIFTS)]
    images, labels = benign_images(
        pool, plan.benign_queries, np.random.default_rng([plan.seed, index]), shift
    )
    run.api_accuracy = run_benign_client(url, key, images, labels).accuracy


def _attack(run: ClientRun, url: str, key: str, experimenter: str, workdir: Path, plan: DemoPlan):
    from attacker.attacks import AttackConfig
    from attacker.runner import run_attack

    options: dict[str, Any] = {"budget": run.budget, "eval_size": plan.eval_size, "seed": plan.seed}
    if run.kind == "knockoff":
        options.update(checkpoints=[250, 500], transfer=KNOCKOFF_TRANSFER)
    elif run.kind == "realistic":
        options.update(checkpoints=[250, 500], epochs=30, patience=5)
    else:
        options["seed_size"] = 75
    config = AttackConfig.for_attack(run.kind, **options)
    run.metrics = run_attack(
        config,
        url=url,
        keys=[key],
        out=workdir / "runs" / run.name,
        eval_key=experimenter,
        progress=False,
        console=Console(file=io.StringIO()),
    )


def _guarded(target, run: ClientRun, *args: Any) -> None:
    try:
        target(run, *args)
    except Exception as exc:  # one failing client must not sink the demo
        run.error = f"{type(exc).__name__}: {exc}"


def run_demo(
    *,
    victim_dir: Path,
    workdir: Path,
    console: Console,
    out: Console,
    plan: DemoPlan | None = None,
) -> dict[str, Any]:
    plan = plan or DemoPlan()
    started = time.perf_counter()
    card = ensure_victim(victim_dir, console)
    ensure_detectors(victim_dir, console)
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    database = workdir / "mlaas.db"
    token = secrets.token_urlsafe(32)
    server = ServerProcess(
        victim_dir,
        env={
            "MLAAS_DATABASE_URL": f"sqlite:///{database}",
            "MLAAS_ADMIN_TOKEN": token,
            "MLAAS_DETECTORS": ",".join(DETECTORS),
            "MLAAS_POLICY": "monitor",
        },
        log_file=workdir / "server.log",
    )
    console.print(
        f"[bold]serving[/] {card.name} on {server.url} with detectors {', '.join(DETECTORS)} "
        f"(log: {server.log_file})"
    )
    runs = [
        ClientRun(f"benign-{i + 1}", "benign", plan.benign_queries)
        for i in range(plan.benign_clients)
    ] + [
        ClientRun("knockoff", "knockoff", plan.knockoff_budget),
        ClientRun("realistic", "realistic", plan.realistic_budget),
        ClientRun("jbda", "jbda", plan.jbda_budget),
    ]
    with server, AdminClient(server.url, token) as admin:
        experimenter = admin.create_key("experimenter")
        threads = []
        for index, run in enumerate(runs):
            key = admin.create_key(run.name)
            if run.kind == "benign":
                args = (_benign, run, server.url, key, plan, index, card.shape)
            else:
                args = (_attack, run, server.url, key, experimenter, workdir, plan)
            threads.append(threading.Thread(target=_guarded, args=args, name=run.name))
        for thread in threads:
            thread.start()
        _watch(admin, runs, threads, console)
        for run in runs:
            standing = admin.client(run.name)
            run.queries = standing["queries_logged"]
            run.alerts = {a["detector"]: a["query_count"] for a in standing["alerts"]}
        experimenter_queries = admin.client("experimenter")["queries_logged"]
    exit_code = server.stop()
    summary = _summarise(card, runs, exit_code, time.perf_counter() - started, database)
    summary["experimenter_queries"] = experimenter_queries
    report = write_report(workdir, card, runs, summary)
    _show(out, runs, summary, report)
    return summary


def _watch(admin: AdminClient, runs: list[ClientRun], threads: list, console: Console) -> None:
    """One progress bar per client: queries the provider answered, alerts as they happen."""
    progress = Progress(
        TextColumn("{task.description:<11}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[alerts]}"),
        TimeElapsedColumn(),
        console=console,
    )
    tasks = {r.name: progress.add_task(r.name, total=r.budget, alerts="") for r in runs}
    with progress:
        while any(t.is_alive() for t in threads):
            _refresh(admin, runs, progress, tasks)
            time.sleep(0.5)
        admin.wait_for_log(sum(r.budget for r in runs), timeout=5)
        _refresh(admin, runs, progress, tasks)


def _refresh(admin: AdminClient, runs: list[ClientRun], progress: Progress, tasks: dict) -> None:
    for run in runs:
        standing = admin.client(run.name)
        flagged = standing["monitor"]["flagged_by"] if standing["monitor"] else []
        progress.update(
            tasks[run.name],
            completed=standing["monitor"]["queries"] if standing["monitor"] else 0,
            alerts=f"[red]alert: {', '.join(flagged)}[/]" if flagged else "",
        )


def _summarise(
    card: ModelCard, runs: list[ClientRun], exit_code: int | None, seconds: float, database: Path
) -> dict[str, Any]:
    from server.db import make_engine
    from server.querylog import count_queries

    rows = []
    for run in runs:
        final = (run.metrics or {}).get("final") or {}
        rows.append(
            {
                "client": run.name,
                "kind": run.kind,
                "queries": run.queries,
                "accuracy": final.get("accuracy"),
                "fidelity": final.get("fidelity"),
                "api_accuracy": run.api_accuracy,
                "alerts": run.alerts,
                "first_alert_at": min(run.alerts.values()) if run.alerts else None,
                "error": run.error,
            }
        )
    benign = [r for r in rows if r["kind"] == "benign"]
    return {
        "victim": card.name,
        "victim_test_accuracy": card.test_accuracy,
        "clients": rows,
        "benign_false_alarms": sum(1 for r in benign if r["alerts"]),
        "benign_clients": len(benign),
        "log_rows": count_queries(make_engine(f"sqlite:///{database}")),
        "queries_answered": sum(r["queries"] for r in rows),
        "server_exit_code": exit_code,
        "seconds": round(seconds, 1),
    }


def _alerts_text(alerts: dict[str, int]) -> str:
    return ", ".join(f"{d} @ {q}" for d, q in sorted(alerts.items(), key=lambda a: a[1])) or "-"


def _pct(value: float | None) -> str:
    return f"{value:.1%}" if value is not None else "-"


def write_report(workdir: Path, card: ModelCard, runs: list[ClientRun], summary: dict) -> Path:
    attackers = [r for r in runs if r.metrics]
    figure_rows = []
    for run in attackers:
        # Each attack's run directory drew its own curve: the report links it.
        curve = Path("runs") / run.name / "curve.png"
        figure_rows.append(f"![{run.name}]({curve})")
    lines = [
        f"# mlaas demo: {card.name}",
        "",
        f"Victim test accuracy {_pct(card.test_accuracy)}; detectors {', '.join(DETECTORS)} "
        f"(policy monitor); {summary['queries_answered']:,} client queries and "
        f"{summary['experimenter_queries']:,} experimenter queries answered, "
        f"{summary['log_rows']:,} log rows; {summary['seconds']:.0f} s.",
        "",
        "| client | queries | substitute accuracy | fidelity | accuracy through the API "
        "| alerts (detector @ query) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for row in summary["clients"]:
        lines.append(
            f"| {row['client']} | {row['queries']:,} | {_pct(row['accuracy'])} | "
            f"{_pct(row['fidelity'])} | {_pct(row['api_accuracy'])} | "
            f"{_alerts_text(row['alerts'])} |"
        )
    lines += [
        "",
        f"Benign false alarms: {summary['benign_false_alarms']} of {summary['benign_clients']} "
        "clients.",
        "",
        *figure_rows,
        "",
    ]
    report = workdir / "report.md"
    report.write_text("\n".join(lines))
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return report


def _show(out: Console, runs: list[ClientRun], summary: dict, report: Path) -> None:
    table = Table(title=f"mlaas demo against {summary['victim']}")
    for column in ("client", "queries", "substitute acc.", "fidelity", "API acc.", "alerts"):
        table.add_column(column, justify="left" if column in ("client", "alerts") else "right")
    for row in summary["clients"]:
        alerts = _alerts_text(row["alerts"])
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
