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
import contextlib
import json
import os
import random
import secrets
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import select
from sqlalchemy.orm import Session

from bench.serve import save_victim
from mlaas.apiclient import AdminClient
from mlaas.images import InputShape
from mlaas.modelstore import load_card
from mlaas.wire import NPY_MEDIA_TYPE, encode_npy
from server.db import QueryRecord, make_engine
from server.querylog import image_sha256
from testbed.serverproc import ServerProcess
from tests.services import PrivatePostgres, PrivateRedis

EVENTS = (
    "kill-a", "kill-b", "stall-a", "stall-b",
    "redis", "postgres-fast", "postgres-immediate", "stall-postgres",
)  # fmt: skip
DEFAULT_EVENTS = ("kill-a", "redis", "postgres-fast", "postgres-immediate", "stall-postgres")
REPLICAS = ("a", "b")
IMAGE_SET = 64
"""Distinct images the requests draw from: a fixed set, as a client re-sending its data would."""
BACKOFF_BASE_S = 0.05
BACKOFF_CAP_S = 1.0
READY_TIMEOUT_S = 60.0
FIGURES = (
    "clients", "requests", "images", "answered_requests", "answered_images", "logged_rows",
    "duplicated_rows", "lost_rows", "lost_requests", "mismatched_requests", "stray_rows",
    "logged_unanswered_rows", "unfinished_requests", "refused_requests", "unfinished_clients",
    "attempts", "retries", "replayed_answers",
)  # fmt: skip


@dataclass
class ChaosPlan:
    clients: int = 64
    requests: int = 30
    max_images: int = 4
    events: tuple[str, ...] = DEFAULT_EVENTS
    duration_s: float = 90.0
    """How long the load lasts, chaos aside: each client waits about this over its requests."""
    min_gap_s: float = 3.0
    attempt_timeout_s: float = 10.0
    stall_s: float = 12.0
    """How long ``stall-postgres`` freezes the database: longer than an attempt's timeout, so
    that clients give up on a hung replica and resend to the other one."""
    hang_up_rate: float = 0.05
    hang_up_s: float = 0.02
    """A ``hang_up_rate`` share of requests stop waiting for their first answer after up to
    ``hang_up_s`` (drawn at random): before the replica has read the body (then it drops the
    request) or after (then it answers and logs it, and the answer is lost on the way, which
    only the retry's idempotency key can put right: a replay, or a race between replicas)."""
    deadline_s: float = 90.0
    """Per logical request: past it, the request is given up as unfinished."""
    max_seconds: float = 600.0
    """The whole load phase: past it, whatever is still unanswered is unfinished."""
    victim: Path | None = None
    """None: a random-init cnn-small (answers need not be right, only logged once)."""
    detectors: str = "prada"
    rate_limit: float = 1000.0
    """Images/s per key: high enough never to refuse, set so the limiter runs in Redis."""
    seed: int = 0
    log_dir: Path | None = None
    progress: bool = True


@dataclass
class RequestOutcome:
    client: str
    request_key: str
    hashes: list[str]
    query_ids: list[str] | None = None
    """The answer's ids, in order; None when the request was never answered with 200."""
    refused: str | None = None
    """A non-retryable refusal (4xx other than 429), which this load should never get."""
    attempts: int = 0
    replayed: bool = False


@dataclass
class EventRecord:
    name: str
    at_s: float
    took_s: float = 0.0
    """From the fault to the part it broke answering again."""
    ready_s: float = 0.0
    """From the fault to both replicas' /readyz answering 200."""
    answered_before: int = 0
    error: str | None = None


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


class Cluster:
    """Private PostgreSQL and Redis, and two replicas of the API on them."""

    def __init__(self, stack: ExitStack, victim: Path, plan: ChaosPlan, log_dir: Path) -> None:
        self.postgres = stack.enter_context(PrivatePostgres())
        self.redis = stack.enter_context(PrivateRedis(appendonly=True))
        self.admin_token = secrets.token_urlsafe(32)
        self.victim = victim
        self.log_dir = log_dir
        self.stall_s = plan.stall_s
        self.env = {
            "MLAAS_DATABASE_URL": self.postgres.url,
            "MLAAS_REDIS_URL": self.redis.url,
            "MLAAS_REDIS_PREFIX": "chaos",
            "MLAAS_ADMIN_TOKEN": self.admin_token,
            "MLAAS_LOG_MODE": "durable",
            "MLAAS_DETECTORS": plan.detectors,
            # PRADA's threshold given, so the random-init victim needs no calibration.
            "MLAAS_PRADA_DELTA": "0.95",
            "MLAAS_RATE_LIMIT": str(plan.rate_limit),
        }
        self.replicas: dict[str, ServerProcess] = {}
        for name in REPLICAS:  # a new run's logs, not appended to the last one's
            (log_dir / f"server-{name}.log").unlink(missing_ok=True)
        stack.callback(self.stop_replicas)
        # One after the other: both would create the tables at once otherwise.
        for name in REPLICAS:
            self.replicas[name] = self._replica(name).start()

    def _replica(self, name: str, port: int | None = None) -> ServerProcess:
        return ServerProcess(
            self.victim,
            port=port,
            env={**self.env, "MLAAS_VAR_DIR": str(self.log_dir / f"var-{name}")},
            log_file=self.log_dir / f"server-{name}.log",
        )

    @property
    def urls(self) -> list[str]:
        return [self.replicas[name].url for name in REPLICAS]

    def stop_replicas(self) -> None:
        for replica in self.replicas.values():
            replica.stop()  # graceful: a durable log has nothing pending, but say so anyway

    def kill_replica(self, name: str) -> None:
        old = self.replicas[name]
        old.kill()
        old.stop()  # reaps it and closes its log file
        self.replicas[name] = self._replica(name, port=old.port).start()

    def stall_replica(self, name: str, seconds: float) -> None:
        """Freeze a replica (SIGSTOP), as a long pause would: clients time out and resend to
        the other one; thawed, it finishes what it had started (and drops requests it had not
        read yet, their clients having gone)."""
        process = self.replicas[name].process
        if process is None or process.poll() is not None:
            raise RuntimeError(f"replica {name} is not running")
        _freeze([process.pid], seconds)

    def stall_postgres(self, seconds: float) -> None:
        """Freeze the whole cluster (SIGSTOP), as a stalled disk or a partition would: its
        sockets stay open and nothing answers, so commits hang instead of failing."""
        postmaster = self.postgres.pid
        if postmaster is None:
            raise RuntimeError("PostgreSQL is not running")
        _freeze([postmaster, *_children(postmaster)], seconds)

    def run_event(self, name: str) -> None:
        if name.startswith("kill-"):
            self.kill_replica(name.removeprefix("kill-"))
        elif name == "redis":
            self.redis.restart()
        elif name.startswith("postgres-"):
            self.postgres.restart(name.removeprefix("postgres-"))  # type: ignore[arg-type]
        elif name == "stall-postgres":
            self.stall_postgres(self.stall_s)
        elif name.startswith("stall-"):
            self.stall_replica(name.removeprefix("stall-"), self.stall_s)
        else:
            raise ValueError(f"unknown event {name!r}")

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        for url in self.urls:
            while True:
                try:
                    if httpx.get(f"{url}/readyz", timeout=2.0).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{url} not ready {timeout:.0f} s after the event")
                time.sleep(0.05)


def _freeze(pids: list[int], seconds: float) -> None:
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (PostgreSQL's backends), from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            # The command name in parentheses may hold spaces: the fields after it do not.
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def random_victim(root: Path, seed: int) -> Path:
    return save_victim(root, "cnn-small", InputShape(1, 28, 28), seed)


def _error_code(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return "?"


def _backoff(attempt: int, retry_after: float) -> float:
    jitter = random.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**attempt))
    return max(jitter, min(retry_after, BACKOFF_CAP_S))


async def send_until_answered(
    http: httpx.AsyncClient,
    urls: list[str],
    first: int,
    key: str,
    body: bytes,
    outcome: RequestOutcome,
    statuses: Counter[str],
    deadline: float,
    hang_up_s: float | None = None,
) -> None:
    """Send one logical request, resending it (same key, same body) until it is answered.

    ``hang_up_s``: the first attempt stops waiting for its answer after that long, as a client
    whose connection drops would, usually while the replica is still computing or committing.
    """
    headers = {
        "Authorization": f"Bearer {key}",
        "Content-Type": NPY_MEDIA_TYPE,
        "Idempotency-Key": outcome.request_key,
    }
    while True:
        url = urls[(first + outcome.attempts) % len(urls)]  # a retry goes to the other one
        outcome.attempts += 1
        retry_after = 0.0
        timeout = http.timeout
        if hang_up_s is not None and outcome.attempts == 1:
            timeout = httpx.Timeout(timeout.read, read=hang_up_s)
        try:
            response = await http.post(
                f"{url}/v1/predict", content=body, headers=headers, timeout=timeout
            )
        except httpx.TimeoutException:
            statuses["hang-up" if timeout is not http.timeout else "timeout"] += 1
        except httpx.TransportError as exc:
            statuses[type(exc).__name__] += 1
        else:
            status = response.status_code
            if status == 200:
                statuses["200"] += 1
                outcome.query_ids = [p["query_id"] for p in response.json()["predictions"]]
                outcome.replayed = response.headers.get("idempotent-replayed") == "true"
                return
            statuses[f"{status} {_error_code(response)}"] += 1
            if status != 429 and status < 500:
                outcome.refused = f"{status} {_error_code(response)}"
                return
            try:
                retry_after = float(response.headers.get("retry-after", 0))
            except ValueError:
                retry_after = 0.0
        left = deadline - time.monotonic()
        if left <= 0:
            return
        await asyncio.sleep(min(_backoff(outcome.attempts, retry_after), left))


async def run_client(
    index: int,
    key: str,
    plan: ChaosPlan,
    urls: list[str],
    images: np.ndarray,
    outcomes: list[RequestOutcome],
    statuses: Counter[str],
    answered: Callable[[], None],
) -> None:
    name = f"chaos-{index}"
    rng = np.random.default_rng([plan.seed, index])
    timeout = httpx.Timeout(plan.attempt_timeout_s, connect=2.0)
    think_s = plan.duration_s / plan.requests
    async with httpx.AsyncClient(timeout=timeout) as http:
        for n in range(plan.requests):
            count = int(rng.integers(1, plan.max_images + 1))
            batch = images[rng.choice(len(images), size=count, replace=False)]
            outcome = RequestOutcome(
                client=name,
                request_key=f"{name}-{n}-{uuid.uuid4().hex}",
                hashes=[image_sha256(image) for image in batch],
            )
            outcomes.append(outcome)
            deadline = time.monotonic() + plan.deadline_s
            hang_up = rng.random() < plan.hang_up_rate
            await send_until_answered(
                http,
                urls,
                index + n,
                key,
                encode_npy(batch),
                outcome,
                statuses,
                deadline,
                plan.hang_up_s * rng.uniform(0.05, 1.0) if hang_up else None,
            )
            if outcome.query_ids is not None:
                answered()
            # Paced, so that the load lasts through the whole chaos schedule: at full speed
            # it would be over before a replica has restarted once.
            await asyncio.sleep(think_s * rng.uniform(0.5, 1.5))


async def run_schedule(
    cluster: Cluster,
    plan: ChaosPlan,
    started: float,
    answered: Callable[[], int],
    total: int,
    load_done: asyncio.Event,
    say: Callable[[str], None],
) -> tuple[list[EventRecord], list[str]]:
    """Each event once the load is far enough along (so that all land under load) and the
    previous one has been over for ``min_gap_s``."""
    records: list[EventRecord] = []
    last_end = time.monotonic()
    for i, name in enumerate(plan.events):
        due = total * (i + 1) / (len(plan.events) + 2)
        while answered() < due or time.monotonic() - last_end < plan.min_gap_s:
            if load_done.is_set():
                return records, list(plan.events[i:])
            await asyncio.sleep(0.05)
        fault = time.monotonic()
        record = EventRecord(name, at_s=fault - started, answered_before=answered())
        records.append(record)
        say(f"{record.at_s:6.1f} s  {name} (after {record.answered_before} answered requests)")
        try:
            await asyncio.to_thread(cluster.run_event, name)
            record.took_s = time.monotonic() - fault
            await asyncio.to_thread(cluster.wait_ready)
            record.ready_s = time.monotonic() - fault
        except Exception as exc:  # reported, and the run fails: the service did not come back
            record.error = f"{type(exc).__name__}: {exc}"
            say(f"          {name} failed: {record.error}")
        last_end = time.monotonic()
    return records, []


def logged_rows(database_url: str) -> list[tuple[str, str | None, int | None, str, str]]:
    engine = make_engine(database_url)
    try:
        with Session(engine) as session:
            statement = select(
                QueryRecord.client,
                QueryRecord.request_key,
                QueryRecord.position,
                QueryRecord.id,
                QueryRecord.input_sha256,
            )
            return [tuple(row) for row in session.execute(statement)]  # type: ignore[misc]
    finally:
        engine.dispose()


def tally(outcomes: list[RequestOutcome], rows: list[tuple]) -> dict[str, int]:
    """Compare what the clients were answered with what the log holds."""
    by_request: dict[tuple[str, str | None], list[tuple[int | None, str, str]]] = defaultdict(list)
    for client, request_key, position, query_id, digest in rows:
        by_request[(client, request_key)].append((position, query_id, digest))
    figures = Counter(
        clients=len({o.client for o in outcomes}),
        requests=len(outcomes),
        images=sum(len(o.hashes) for o in outcomes),
        logged_rows=len(rows),
    )
    unfinished_clients = set()
    for outcome in outcomes:
        logged = by_request.pop((outcome.client, outcome.request_key), [])
        size = len(outcome.hashes)
        positions = Counter(position for position, _, _ in logged)
        in_range = [p for p in positions if p is not None and 0 <= p < size]
        figures["duplicated_rows"] += len(logged) - len(in_range)
        if outcome.query_ids is None:
            unfinished_clients.add(outcome.client)
            figures["refused_requests" if outcome.refused else "unfinished_requests"] += 1
            figures["logged_unanswered_rows"] += len(logged)
            continue
        figures["answered_requests"] += 1
        figures["answered_images"] += size
        figures["replayed_answers"] += outcome.replayed
        lost = size - len(in_range)
        figures["lost_rows"] += lost
        figures["lost_requests"] += lost > 0
        first = {}
        for position, query_id, digest in logged:
            first.setdefault(position, (query_id, digest))
        logged_ids = [first.get(p, (None, None))[0] for p in range(size)]
        logged_digests = [first.get(p, (None, None))[1] for p in range(size)]
        if not lost and (logged_ids != outcome.query_ids or logged_digests != outcome.hashes):
            figures["mismatched_requests"] += 1
    figures["stray_rows"] = sum(len(logged) for logged in by_request.values())
    figures["unfinished_clients"] = len(unfinished_clients)
    figures["attempts"] = sum(o.attempts for o in outcomes)
    figures["retries"] = figures["attempts"] - len(outcomes)
    return {name: int(figures[name]) for name in FIGURES}


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
