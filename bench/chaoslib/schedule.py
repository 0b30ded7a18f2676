"""The chaos schedule: each fault in turn, once the load is far enough along, timed until the
service answers again."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from bench.chaoslib.cluster import Cluster
from bench.chaoslib.plan import ChaosPlan


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
