"""The query log read back and counted against what the clients were answered."""

from __future__ import annotations

from collections import Counter, defaultdict

from sqlalchemy import select
from sqlalchemy.orm import Session

from bench.chaoslib.clients import RequestOutcome
from server.db import QueryRecord, make_engine

FIGURES = (
    "clients", "requests", "images", "answered_requests", "answered_images", "logged_rows",
    "duplicated_rows", "lost_rows", "lost_requests", "mismatched_requests", "stray_rows",
    "logged_unanswered_rows", "unfinished_requests", "refused_requests", "unfinished_clients",
    "attempts", "retries", "replayed_answers",
)  # fmt: skip


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
        first: dict[int | None, tuple[str, str]] = {}
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
