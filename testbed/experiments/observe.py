"""What the provider saw of an experiment's clients, read through its admin API.

The harness judges a client by the server's account, not the client's own: the queries the
log holds for its key and the alerts raised against it. Side by side, a progress bar per
client shows the queries answered and the detectors that flagged it as they happen.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from mlaas.apiclient import AdminClient


def settle(admin: AdminClient, timeout: float = 30.0) -> None:
    """Wait until every query answered so far is in the log: standings are read from it."""
    stats = admin.stats()
    admin.wait_for_log(stats["log_rows_written"] + stats["log_rows_pending"], timeout)
    time.sleep(0.3)  # and a margin for requests in flight when the counters were read


def standing(admin: AdminClient, name: str) -> dict[str, Any]:
    """A client's queries in the log, and its alerts: detector -> the query count at the alert."""
    client = admin.client(name)
    return {
        "queries_logged": client["queries_logged"],
        "alerts": {a["detector"]: a["query_count"] for a in client["alerts"]},
    }


def watch(
    admin: AdminClient,
    clients: Sequence[threading.Thread],
    totals: dict[str, int],
    console: Console,
) -> None:
    """A bar per client (by thread name) until every client's thread has ended, then the log
    settled and the bars' last state."""
    progress = Progress(
        TextColumn("{task.description:<11}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[alerts]}"),
        TimeElapsedColumn(),
        console=console,
    )
    tasks = {c.name: progress.add_task(c.name, total=totals[c.name], alerts="") for c in clients}
    with progress:
        while any(c.is_alive() for c in clients):
            _refresh(admin, progress, tasks)
            time.sleep(0.5)
        settle(admin)
        _refresh(admin, progress, tasks)


def _refresh(admin: AdminClient, progress: Progress, tasks: dict[str, TaskID]) -> None:
    for name, task in tasks.items():
        client = admin.client(name)
        monitor = client["monitor"]
        # The monitor counts as it answers; the log, written off the request path, lags.
        answered = monitor["queries"] if monitor else client["queries_logged"]
        flagged = monitor["flagged_by"] if monitor else []
        alerts = f"[red]alert: {', '.join(flagged)}[/]" if flagged else ""
        progress.update(task, completed=answered, alerts=alerts)
