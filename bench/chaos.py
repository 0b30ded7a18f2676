"""Chaos benchmark: retrying clients against two API processes while their parts fail.

    .venv/bin/python -m bench.chaos                          # 64 clients x 30 requests
    .venv/bin/python -m bench.chaos --quick                  # 16 clients x 12 requests
    .venv/bin/python -m bench.chaos --json var/chaos.json    # the figures as JSON too

Run it from the project root with ``-m``: it reuses the private servers of ``tests/services.py``.

It starts a PostgreSQL and a Redis of its own (Redis with an append-only file, so a restart
keeps its state, as a deployed one would) and two ``mlaas serve`` processes, replicas A and B,
on both: the durable query log in PostgreSQL, PRADA's per-client state and the rate limiter in
Redis. ``--clients`` clients, each under its own key, send ``--requests`` requests of 1 to
``--max-images`` images each, alternating between the replicas and paced over about
``--duration`` seconds (at full speed the load would be over before a replica has restarted
once). Every logical request has a fresh ``Idempotency-Key``; after a connection error, a
timeout (``--attempt-timeout``), a 429 or a 5xx it is resent with the same key and body, to
the other replica, with backoff (full jitter, honouring ``Retry-After``), until it is answered
or its ``--deadline`` passes. A ``--hang-up-rate`` share of first attempts stop waiting after a
few milliseconds, as a dropped connection would: a replica that had read the body answers and
logs it into the void, and only the retry's key keeps the log to one copy (a replay from the
log, or a race between the replicas on the same key).

Meanwhile the chaos schedule (``--events``), one event at a time as the load progresses (event
i of k once i/(k+2) of the requests are answered, so that every one lands under load), at
least ``--min-gap`` seconds after the previous one came back: ``kill-a`` (replica A SIGKILLed
and started again on its port), ``kill-b``, ``redis`` (SIGKILLed and started again),
``postgres-fast`` and ``postgres-immediate`` (``pg_ctl stop -m fast|immediate``, the latter as
a crash, then started again) and ``stall-postgres`` (the database frozen with SIGSTOP for
``--stall`` seconds, longer than an attempt's timeout: commits hang, clients give up and
resend to the other replica, and both replicas race on the same keys once it thaws).

Once every client is done and the replicas have stopped, it reads the query log and counts,
against what the clients were answered: requests answered; rows logged; rows duplicated (a
request's image logged twice, or rows beyond its images); rows lost (an answered image whose
row is not in the log); answers whose query ids or input digests differ from the logged rows;
stray rows (logged for no request a client sent); and clients that did not finish (a request
never answered, or refused with a 4xx). Exits 1 when any of those is not zero, or when the load
ended before an event could run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bench.chaoslib.audit import logged_rows, tally
from bench.chaoslib.clients import RequestOutcome, run_client
from bench.chaoslib.cluster import Cluster, random_victim
from bench.chaoslib.plan import DEFAULT_EVENTS, EVENTS, ChaosPlan
from bench.chaoslib.schedule import EventRecord, run_schedule
from mlaas.apiclient import AdminClient
from mlaas.modelstore import load_card

# What tests/test_chaos.py imports from here (ChaosPlan, RequestOutcome and tally live in
# bench.chaoslib).
__all__ = ["ChaosPlan", "RequestOutcome", "main", "run_chaos", "tally"]

IMAGE_SET = 64
"""Distinct images the requests draw from: a fixed set, as a client re-sending its data would."""


@dataclass
class ChaosResult:
    figures: dict[str, int]
    events: list[EventRecord]
    skipped_events: list[str]
    statuses: dict[str, int]
    wall_s: float
    plan: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        f = self.figures
        bad = ("duplicated_rows", "lost_rows", "mismatched_requests", "stray_rows")
        return (
            all(f[name] == 0 for name in bad)
            and f["unfinished_clients"] == 0
            and not self.skipped_events
            and not any(event.error for event in self.events)
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "figures": self.figures,
            "events": [
                {k: round(v, 2) if isinstance(v, float) else v for k, v in asdict(e).items()}
                for e in self.events
            ],
            "skipped_events": self.skipped_events,
            "statuses": self.statuses,
            "wall_s": round(self.wall_s, 1),
            "plan": self.plan,
        }


async def _load_and_chaos(
    cluster: Cluster,
    plan: ChaosPlan,
    keys: list[str],
    images: np.ndarray,
    say: Callable[[str], None],
    on_answer: Callable[[], None],
) -> tuple[list[RequestOutcome], Counter[str], list[EventRecord], list[str]]:
    outcomes: list[RequestOutcome] = []
    statuses: Counter[str] = Counter()
    answered = 0

    def count_answer() -> None:
        nonlocal answered
        answered += 1
        on_answer()

    load_done = asyncio.Event()
    started = time.monotonic()
    urls = cluster.urls
    schedule = asyncio.create_task(
        run_schedule(
            cluster,
            plan,
            started,
            lambda: answered,
            plan.clients * plan.requests,
            load_done,
            say,
        )
    )
    clients = [
        run_client(i, key, plan, urls, images, outcomes, statuses, count_answer)
        for i, key in enumerate(keys)
    ]
    try:
        await asyncio.wait_for(asyncio.gather(*clients), plan.max_seconds)
    except TimeoutError:
        say(f"the load ran past {plan.max_seconds:.0f} s: what is unanswered is unfinished")
    load_done.set()
    events, skipped = await schedule
    return outcomes, statuses, events, skipped


def run_chaos(plan: ChaosPlan, console: Console | None = None) -> ChaosResult:
    """Run the whole benchmark: servers up, load and chaos, servers down, then the count."""
    console = console or Console(quiet=not plan.progress)
    started = time.monotonic()
    with ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mlaas-chaos-")))
        log_dir = plan.log_dir or scratch
        log_dir.mkdir(parents=True, exist_ok=True)
        victim = plan.victim or random_victim(scratch, plan.seed)
        shape = load_card(victim).shape
        cluster = Cluster(stack, victim, plan, log_dir)
        with AdminClient(cluster.urls[0], cluster.admin_token) as admin:
            keys = [admin.create_key(f"chaos-{i}") for i in range(plan.clients)]
        images = np.random.default_rng(plan.seed).integers(
            0, 256, size=(IMAGE_SET, *shape.hwc), dtype=np.uint8
        )
        progress = Progress(
            TextColumn("answered requests"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            disable=not plan.progress,
        )
        with progress:
            task = progress.add_task("load", total=plan.clients * plan.requests)
            outcomes, statuses, events, skipped = asyncio.run(
                _load_and_chaos(
                    cluster,
                    plan,
                    keys,
                    images,
                    progress.console.print,
                    lambda: progress.advance(task),
                )
            )
        cluster.stop_replicas()
        rows = logged_rows(cluster.postgres.url)
    plan_json = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(plan).items()}
    return ChaosResult(
        figures=tally(outcomes, rows),
        events=events,
        skipped_events=skipped,
        statuses=dict(statuses.most_common()),
        wall_s=time.monotonic() - started,
        plan=plan_json,
    )


def report(result: ChaosResult, console: Console) -> None:
    f = result.figures
    table = Table(title="chaos: two replicas, PostgreSQL and Redis, retrying clients")
    table.add_column("figure")
    table.add_column("value", justify="right")
    must_be_zero = {
        "duplicated_rows",
        "lost_rows",
        "lost_requests",
        "mismatched_requests",
        "stray_rows",
        "unfinished_clients",
    }
    for name, value in f.items():
        shown = f"{value:,}"
        if name in must_be_zero:
            shown = f"[{'green' if value == 0 else 'bold red'}]{shown}[/]"
        table.add_row(name.replace("_", " "), shown)
    table.add_row("wall time", f"{result.wall_s:.1f} s")
    console.print(table)

    events = Table(title="chaos events")
    for column in ("event", "at", "answered before", "back after", "both ready after", "error"):
        events.add_column(column, justify="left" if column in ("event", "error") else "right")
    for event in result.events:
        events.add_row(
            event.name,
            f"{event.at_s:.1f} s",
            f"{event.answered_before:,}",
            f"{event.took_s:.1f} s",
            f"{event.ready_s:.1f} s",
            event.error or "",
        )
    for name in result.skipped_events:
        events.add_row(name, "-", "-", "-", "-", "[bold red]skipped: the load ended first[/]")
    console.print(events)
    console.print(
        "attempts by outcome: "
        + ", ".join(f"{name} {count:,}" for name, count in result.statuses.items())
    )
    verdict = "[green]PASS[/]" if result.ok else "[bold red]FAIL[/]"
    console.print(
        f"{verdict}: {f['answered_requests']:,} of {f['requests']:,} requests answered, "
        f"{f['logged_rows']:,} rows logged for {f['answered_images']:,} answered images, "
        f"{f['duplicated_rows']} duplicated, {f['lost_rows']} lost, "
        f"{f['unfinished_clients']} clients unfinished, in {result.wall_s:.0f} s"
    )


def parse_args(argv: list[str] | None) -> tuple[ChaosPlan, Path | None]:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--clients", type=int, default=None, help="default 64, --quick 16")
    parser.add_argument("--requests", type=int, default=None, help="per client; default 30")
    parser.add_argument("--max-images", type=int, default=4, help="per request (1 to this)")
    parser.add_argument(
        "--events",
        default=",".join(DEFAULT_EVENTS),
        help=f"comma-separated, in order, from: {', '.join(EVENTS)}",
    )
    parser.add_argument(
        "--duration", type=float, default=None, help="the load's length, s; default 90, --quick 60"
    )
    parser.add_argument("--min-gap", type=float, default=3.0, help="seconds between events")
    parser.add_argument("--attempt-timeout", type=float, default=10.0)
    parser.add_argument(
        "--hang-up-rate",
        type=float,
        default=0.05,
        help="share of requests whose first attempt hangs up after --hang-up s",
    )
    parser.add_argument("--hang-up", type=float, default=0.02, help="at most, s")
    parser.add_argument("--stall", type=float, default=12.0, help="stall-postgres, s")
    parser.add_argument("--deadline", type=float, default=90.0, help="per logical request, s")
    parser.add_argument("--max-seconds", type=float, default=600.0, help="the whole load, s")
    parser.add_argument(
        "--victim", type=Path, default=None, help="a victim dir (default: random-init cnn-small)"
    )
    parser.add_argument("--detectors", default="prada")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--logs", type=Path, default=Path("var/bench-chaos"), help="server logs go here"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--quick", action="store_true", help="16 clients x 12 requests")
    args = parser.parse_args(argv)
    events = tuple(e.strip() for e in args.events.split(",") if e.strip())
    unknown = [e for e in events if e not in EVENTS]
    if unknown:
        parser.error(f"unknown event {unknown[0]!r}; choose from {', '.join(EVENTS)}")
    plan = ChaosPlan(
        clients=args.clients or (16 if args.quick else 64),
        requests=args.requests or (12 if args.quick else 30),
        max_images=args.max_images,
        events=events,
        duration_s=args.duration or (60.0 if args.quick else 90.0),
        min_gap_s=args.min_gap,
        attempt_timeout_s=args.attempt_timeout,
        stall_s=args.stall,
        hang_up_rate=args.hang_up_rate,
        hang_up_s=args.hang_up,
        deadline_s=args.deadline,
        max_seconds=args.max_seconds,
        victim=args.victim,
        detectors=args.detectors,
        seed=args.seed,
        log_dir=args.logs,
    )
    return plan, args.json


def main(argv: list[str] | None = None) -> int:
    plan, json_path = parse_args(argv)
    console = Console()
    console.print(
        f"[bold]mlaas chaos benchmark[/]: {plan.clients} clients x {plan.requests} requests "
        f"(1-{plan.max_images} images each) on 2 replicas; events: {', '.join(plan.events)}; "
        f"server logs in {plan.log_dir}"
    )
    result = run_chaos(plan, console)
    report(result, console)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
