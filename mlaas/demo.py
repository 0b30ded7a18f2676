"""``mlaas demo``: the whole provider path, offline, on the embedded default.

Train (or reuse) the default victim, serve it as a real ``mlaas serve`` process on loopback
with a fresh SQLite log, query it over HTTP as a benign client with public in-domain images,
and show what the API answered and what the provider logged.
"""

from __future__ import annotations

import json
import secrets
import shutil
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mlaas.apiclient import AdminClient, PredictionClient
from mlaas.datasets import load_dataset
from mlaas.modelstore import ModelCard, load_card
from mlaas.serverproc import ServerProcess

BENIGN_CLIENT = "benign-1"
BATCH = 25


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
    from server.victim import train_victim  # the demo composes both halves, like the CLI

    console.print(f"[bold]training the default victim[/] into {victim_dir} (about 2 minutes)")
    card = train_victim(victim_dir)
    console.print(
        f"[green]victim trained[/]: test accuracy {card.test_accuracy:.2%} "
        f"in {card.training_seconds:.0f} s"
    )
    return card


def run_demo(
    *, victim_dir: Path, workdir: Path, queries: int, console: Console, out: Console
) -> dict[str, object]:
    card = ensure_victim(victim_dir, console)
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    database = workdir / "mlaas.db"
    admin_token = secrets.token_urlsafe(24)
    server = ServerProcess(
        victim_dir,
        env={
            "MLAAS_DATABASE_URL": f"sqlite:///{database}",
            "MLAAS_ADMIN_TOKEN": admin_token,
        },
        log_file=workdir / "server.log",
    )
    console.print(f"[bold]starting[/] mlaas serve on {server.url} (log: {server.log_file})")
    pool = load_dataset("fashion-mnist:pool", card.shape)
    rng = np.random.default_rng(0)
    picked = np.sort(rng.choice(len(pool), size=min(queries, len(pool)), replace=False))
    assert pool.labels is not None
    with server, AdminClient(server.url, admin_token) as admin:
        key = admin.create_key(BENIGN_CLIENT)
        correct = answered = 0
        started = time.perf_counter()
        with PredictionClient(server.url, key) as client, _progress(console) as progress:
            task = progress.add_task("benign queries", total=len(picked), rate=0.0)
            for start in range(0, len(picked), BATCH):
                chunk = picked[start : start + BATCH]
                response = client.predict(pool.get_batch(chunk))
                labels = np.array([p.label for p in response.predictions])
                correct += int((labels == pool.labels[chunk]).sum())
                answered += len(labels)
                rate = answered / max(time.perf_counter() - started, 1e-9)
                progress.update(task, advance=len(chunk), rate=rate)
        seconds = time.perf_counter() - started
        admin.wait_for_log(answered)
        tail = admin.queries(client=BENIGN_CLIENT, limit=1000)[-8:]
    exit_code = server.stop()
    from server.db import make_engine  # read the log as the provider left it
    from server.querylog import count_queries

    logged = count_queries(make_engine(f"sqlite:///{database}"))
    summary = {
        "victim": card.name,
        "victim_test_accuracy": card.test_accuracy,
        "queries_answered": answered,
        "api_accuracy": correct / answered if answered else None,
        "log_rows": logged,
        "server_exit_code": exit_code,
        "seconds": round(seconds, 2),
    }
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    _show(out, tail, summary, database)
    return summary


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:.0f} queries/s"),
        TimeElapsedColumn(),
        console=console,
    )


def _show(out: Console, tail: list[dict], summary: dict, database: Path) -> None:
    table = Table(title="tail of the query log", show_lines=False)
    for column in ("time", "client", "query id", "predicted", "top prob", "latency ms"):
        table.add_column(column)
    for row in tail:
        scores = row["payload"].get("scores") or []
        table.add_row(
            row["time"][11:23],
            row["client"],
            row["id"][:12],
            row["payload"]["label_name"],
            f"{scores[0]['prob']:.3f}" if scores else "",
            f"{row['latency_ms']:.1f}",
        )
    out.print(table)
    out.print(
        f"victim test accuracy {summary['victim_test_accuracy']:.2%}; "
        f"accuracy seen through the API on {summary['queries_answered']} public-pool queries: "
        f"{summary['api_accuracy']:.2%}"
    )
    out.print(
        f"query log: {summary['log_rows']} rows for {summary['queries_answered']} answered "
        f"queries after a graceful stop (exit code {summary['server_exit_code']})"
    )
    out.print(
        f"inspect it: MLAAS_DATABASE_URL=sqlite:///{database} mlaas logs --client {BENIGN_CLIENT}"
    )
