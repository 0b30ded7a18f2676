"""The query log writer: a background thread that commits each request's rows in one
transaction, in durable or buffered mode (see the package's doc), and the wait for a durable
request's commit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import insert
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from server.backoff import Backoff
from server.db import AlertRecord, QueryRecord
from server.options import LogMode
from server.querylog.records import (
    DuplicateRequest,
    LogUnavailable,
    PendingQuery,
    _describe,
    _to_row,
    _Unit,
    is_outage,
)
from server.querylog.spool import Spool, insert_new_queries

if TYPE_CHECKING:  # at run time alerts are whatever is not a PendingQuery: no scipy to load
    from defense.monitor import Alert

log = logging.getLogger(__name__)


class _Repeating:
    """Logs a recurring problem at most once per ``every_s``, saying how often it recurred."""

    def __init__(self, every_s: float = 60.0) -> None:
        self.every_s = every_s
        self._last = -float("inf")
        self._since = 0

    def warning(self, message: str, *args: Any) -> None:
        now = time.monotonic()
        self._since += 1
        if now - self._last < self.every_s:
            return
        if self._since > 1:
            message += " (%d times since the last report)"
            args = (*args, self._since)
        log.warning(message, *args)
        self._last, self._since = now, 0


_STOP = object()


class QueryLogWriter:
    """A background thread that persists each request's rows in one transaction."""

    def __init__(
        self,
        engine: Engine,
        *,
        mode: LogMode | str = LogMode.durable,
        store_inputs: bool = True,
        flush_rows: int = 512,
        flush_interval_s: float = 0.1,
        max_retry_delay_s: float = 5.0,
        max_buffered_rows: int = 100_000,
        spool: Path | None = None,
        max_kept_alerts: int = 10_000,
    ) -> None:
        """``spool``: buffered mode keeps rows in this SQLite file while the database is away
        (without one, in memory only, retrying). ``max_kept_alerts``: alerts of failed
        commits held in memory for the database's return, at most (the oldest go first)."""
        self._engine = engine
        self.mode = LogMode(mode)
        self._store_inputs = store_inputs
        self._flush_rows = flush_rows
        self._flush_interval_s = flush_interval_s
        self._max_retry_delay_s = max_retry_delay_s
        self._max_buffered_rows = max_buffered_rows
        self._spool = Spool(spool) if spool is not None and self.mode is LogMode.buffered else None
        self.spooled = self._spool.count() if self._spool is not None else 0
        """Rows and alerts in the spool, waiting for the database."""
        self._next_move = 0.0
        self._move_backoff = Backoff(0.1, max_retry_delay_s)
        self._spool_trouble = _Repeating()
        self._kept_alerts: list[dict[str, Any]] = []
        """Alerts of requests whose commit failed: written on their own once it can be."""
        self._max_kept_alerts = max_kept_alerts
        self._next_alert_try = 0.0
        self._alert_backoff = Backoff(0.1, max_retry_delay_s)
        self._alert_trouble = _Repeating()
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._pending_rows = 0
        self._count_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="query-log-writer", daemon=True)
        self._closed = False
        self._give_up_at: float | None = None
        self.written = 0
        self.alerts_written = 0
        self.write_errors = 0
        self.lost = 0
        self.alerts_lost = 0
        self.healthy = True
        """False from a failed write until the next successful one."""
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def pending(self) -> int:
        return self._pending_rows

    @property
    def alerts_waiting(self) -> int:
        """Alerts of failed commits that wait for the database."""
        return len(self._kept_alerts)

    def submit(self, items: Sequence[PendingQuery | Alert]) -> Future[None]:
        """Queue one request's rows; the future completes when they are safe.

        In durable mode that is their commit, and the future fails with
        :class:`LogUnavailable` (or :class:`DuplicateRequest`) when the commit does; the
        alerts are then kept and written later (see the module's doc). A caller that stops
        waiting (a timeout) leaves the rows queued: committed later, they stay logged. In
        buffered mode it is their commit or, while the database is away, their place in the
        spool (without a spool, only their commit, however long that takes); a full buffer
        raises :class:`LogUnavailable` here, before anything is queued.
        """
        if self._closed:
            raise LogUnavailable("the query log writer is closed")
        queries = [q for q in items if isinstance(q, PendingQuery)]
        if (
            self.mode is LogMode.buffered
            and self._pending_rows + len(queries) > self._max_buffered_rows
        ):
            raise LogUnavailable(
                f"the query log buffer is full ({self._pending_rows} rows wait for the database)"
            )
        unit = _Unit(queries, [a for a in items if not isinstance(a, PendingQuery)])
        with self._count_lock:
            self._pending_rows += len(queries)
        self._queue.put(unit)
        return unit.done

    def close(self, timeout: float | None = None) -> None:
        """Write every pending row, then stop the thread.

        With ``timeout``, a buffered writer whose database stays away gives up after that
        long: what it could spool waits there for the next start, the rest is counted as lost
        (a durable writer has only the alerts of failed commits waiting: they get as long).
        """
        if self._closed:
            return
        self._closed = True
        if timeout is not None:
            self._give_up_at = time.monotonic() + timeout
        self._queue.put(_STOP)
        self._thread.join(None if timeout is None else timeout + 5.0)
        if self._spool is not None:
            if self.spooled:
                log.warning(
                    "query log: %d rows stay in %s until the database answers",
                    self.spooled,
                    self._spool.path,
                )
            self._spool.close()

    def _run(self) -> None:
        stopping = False
        while not stopping:
            units: list[_Unit] = []
            rows = 0
            deadline: float | None = None
            while rows < self._flush_rows:
                timeout: float | None
                if self.mode is LogMode.durable and units:
                    timeout = 0.0  # group commit: take what is queued, never wait for more
                else:
                    timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                    chore = self._next_chore()
                    if chore is not None:  # wake up to move spooled rows or write kept alerts
                        until_chore = max(0.0, chore - time.monotonic())
                        timeout = until_chore if timeout is None else min(timeout, until_chore)
                try:
                    item = self._queue.get(timeout=timeout)
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                units.append(item)
                rows += len(item.queries)
                if deadline is None:
                    deadline = time.monotonic() + self._flush_interval_s
            if units:
                if self.mode is LogMode.durable:
                    self._commit_or_fail(units)
                else:
                    self._write_until_done(units)
            if self.spooled:
                self._move_spooled(until_empty=stopping)
            if self._kept_alerts:
                self._write_kept_alerts(until_empty=stopping)

    def _next_chore(self) -> float | None:
        """When spooled rows or kept alerts are next due a try; None when none wait."""
        due = [
            at
            for at, waiting in (
                (self._next_move, self.spooled),
                (self._next_alert_try, self._kept_alerts),
            )
            if waiting
        ]
        return min(due, default=None)

    def _finished(self, units: list[_Unit]) -> None:
        with self._count_lock:
            self._pending_rows -= sum(len(u.queries) for u in units)

    @staticmethod
    def _alerts(units: list[_Unit]) -> list[dict[str, Any]]:
        return [asdict(alert) for u in units for alert in u.alerts]

    def _rows(self, units: list[_Unit]) -> list[dict[str, Any]]:
        for unit in units:
            if unit.rows is None:
                unit.rows = [_to_row(q, self._store_inputs) for q in unit.queries]
        return [row for u in units for row in u.rows or ()]

    def _insert(self, units: list[_Unit], *, skip_logged: bool = False) -> list[dict[str, Any]]:
        """Commit the units' rows and alerts in one transaction; the rows skipped.

        ``skip_logged``: rows the log holds already (by id or idempotency key) are skipped;
        otherwise one fails the whole transaction with IntegrityError.
        """
        rows, alerts = self._rows(units), self._alerts(units)
        with Session(self._engine) as session, session.begin():
            if skip_logged:
                inserted = insert_new_queries(session, rows)
            else:
                if rows:
                    session.execute(insert(QueryRecord), rows)
                inserted = {row["id"] for row in rows}
            if alerts:
                session.execute(insert(AlertRecord), alerts)
        skipped = [row for row in rows if row["id"] not in inserted]
        self.written += len(rows) - len(skipped)
        self.alerts_written += len(alerts)
        self.healthy = True
        return skipped

    def _commit_or_fail(self, units: list[_Unit]) -> None:
        try:
            self._insert(units)
        except IntegrityError:
            if len(units) == 1:
                # Another replica logged this request; the detectors here counted its images
                # all the same, and an alert they raised must not be lost with the rows.
                self._keep_alerts(units)
                self._fail(units, DuplicateRequest("this request is already in the log"))
                return
            # One request's idempotency key clashed; commit the others on their own.
            for unit in units:
                self._commit_or_fail([unit])
            return
        except Exception as exc:
            self.write_errors += 1
            self.healthy = False
            log.warning("query log commit failed, %d requests refused: %s", len(units), exc)
            self._keep_alerts(units)
            self._fail(units, LogUnavailable("the query log database is unavailable"))
            return
        self._succeed(units)

    def _succeed(self, units: list[_Unit]) -> None:
        self._finished(units)
        for unit in units:
            # A future its caller cancelled must not stop the thread (the rows are written).
            with contextlib.suppress(InvalidStateError):
                unit.done.set_result(None)

    def _fail(self, units: list[_Unit], error: LogUnavailable) -> None:
        self._finished(units)
        for unit in units:
            with contextlib.suppress(InvalidStateError):
                unit.done.set_exception(error)

    def _write_until_done(self, units: list[_Unit]) -> None:
        backoff = Backoff(0.05, self._max_retry_delay_s)
        while True:
            try:
                skipped = self._insert(units, skip_logged=True)
                if skipped:  # an idempotent request answered twice, by two workers, say
                    log.warning("query log: %s were logged already; skipped", _describe(skipped))
                break
            except IntegrityError as exc:
                if len(units) == 1:
                    # Not an idempotency key met twice (those are skipped above, but for a
                    # race on a database without ON CONFLICT): the database refuses these
                    # rows, and would for ever. Their alerts are written on their own.
                    log.warning(
                        "query log: the database refused %s; skipped: %s",
                        _describe(self._rows(units)),
                        exc,
                    )
                    self._keep_alerts(units)
                    break
                for unit in units:
                    self._write_until_done([unit])
                return
            except Exception as exc:
                self.write_errors += 1
                self.healthy = False
                if self._to_spool(units, exc):
                    return
                # Keep the rows and try again: losing answered queries would blind the log.
                delay = backoff.next()
                log.warning(
                    "query log write failed, %d rows wait; retrying in %.2f s: %s",
                    self.pending,
                    delay,
                    exc,
                )
                if self._give_up_at is not None and time.monotonic() > self._give_up_at:
                    self.lost += self._drain_on_give_up(units)
                    return
                time.sleep(delay)
        self._succeed(units)

    def _to_spool(self, units: list[_Unit], error: Exception) -> bool:
        """Park the rows in the spool; False when there is none or it fails too."""
        if self._spool is None:
            return False
        rows, alerts = self._rows(units), self._alerts(units)
        try:
            kept = self._spool.put(rows, alerts)
        except Exception:
            log.exception("query log spool %s failed", self._spool.path)
            return False
        if not self.spooled:
            log.warning(
                "query log database unavailable, spooling to %s: %s", self._spool.path, error
            )
        self.spooled += kept
        self._succeed(units)
        return True

    def _move_spooled(self, until_empty: bool = False) -> None:
        """Move spooled rows into the database, oldest first, backing off while it is away.

        One batch per call while serving; ``until_empty`` (stopping) moves them all, or
        retries until the shutdown timeout and leaves the rest for the next start.
        """
        while self.spooled:
            if not until_empty and time.monotonic() < self._next_move:
                return
            try:
                moved = self._spool.move_into(self._engine)  # type: ignore[union-attr]
            except Exception as exc:
                if is_outage(exc):
                    log.debug("query log spool: the database is still away: %s", exc)
                else:  # not an outage: it will not pass by itself, so it must be seen
                    self._spool_trouble.warning(
                        "query log spool: moving rows into the database failed (%d wait in "
                        "%s); retrying with backoff: %s",
                        self.spooled,
                        self._spool.path,  # type: ignore[union-attr]
                        exc,
                    )
                delay = self._move_backoff.next()
                self._next_move = time.monotonic() + delay
                if (
                    not until_empty
                    or self._give_up_at is None
                    or time.monotonic() > self._give_up_at
                ):
                    return
                time.sleep(delay)
                continue
            self._move_backoff.reset()
            self.healthy = True
            self.written += moved.written
            self.alerts_written += moved.alerts
            self.spooled = max(0, self.spooled - moved.taken) if moved.taken else 0
            if not self.spooled:
                log.info("query log spool emptied into the database")
            if not until_empty:
                return

    def _keep_alerts(self, units: list[_Unit]) -> None:
        """Keep the alerts of units that were not committed, to be written on their own."""
        alerts = self._alerts(units)
        if not alerts:
            return
        self._kept_alerts.extend(alerts)
        log.warning("query log: %d alerts of a failed commit wait for the database", len(alerts))
        overflow = len(self._kept_alerts) - self._max_kept_alerts
        if overflow > 0:
            del self._kept_alerts[:overflow]
            self.alerts_lost += overflow
            log.error("query log: %d alerts dropped, the oldest of too many waiting", overflow)

    def _write_kept_alerts(self, until_empty: bool = False) -> None:
        """Write the kept alerts, oldest first, backing off while the database is away.

        One batch per call while serving; ``until_empty`` (stopping) writes them all, or
        retries until the shutdown timeout and counts the rest as lost.
        """
        while self._kept_alerts:
            if not until_empty and time.monotonic() < self._next_alert_try:
                return
            alerts = self._kept_alerts[:1000]
            try:
                with Session(self._engine) as session, session.begin():
                    session.execute(insert(AlertRecord), alerts)
            except Exception as exc:
                if is_outage(exc):
                    log.debug("query log: kept alerts wait, the database is away: %s", exc)
                else:
                    self._alert_trouble.warning(
                        "query log: %d kept alerts cannot be written; retrying with backoff: %s",
                        len(self._kept_alerts),
                        exc,
                    )
                delay = self._alert_backoff.next()
                self._next_alert_try = time.monotonic() + delay
                if not until_empty:
                    return
                if self._give_up_at is None or time.monotonic() > self._give_up_at:
                    self.alerts_lost += len(self._kept_alerts)
                    log.error(
                        "query log: the database stayed unavailable; %d alerts lost",
                        len(self._kept_alerts),
                    )
                    self._kept_alerts.clear()
                    return
                time.sleep(delay)
                continue
            del self._kept_alerts[: len(alerts)]
            self.alerts_written += len(alerts)
            self._alert_backoff.reset()
            log.info("query log: %d alerts of failed commits written", len(alerts))

    def _drain_on_give_up(self, units: list[_Unit]) -> int:
        lost = sum(len(u.queries) for u in units)
        stop_seen = False
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                stop_seen = True
            else:
                units.append(item)
                lost += len(item.queries)
        if stop_seen:
            self._queue.put(_STOP)
        self._fail(units, LogUnavailable("the query log database stayed unavailable"))
        log.error("query log: the database stayed unavailable; %d answered rows lost", lost)
        return lost


async def wait_for_commit(done: Future[None], timeout_s: float) -> None:
    """Wait for a durable request's commit (``submit``'s future), raising what it raises, or
    :class:`LogUnavailable` once ``timeout_s`` has passed, for a database that stopped
    answering: the request is then refused with 503, never left hanging.

    Rows that commit after that stay logged: the log then holds a query whose answer the
    client never got (the safe side for detection), and a retry under the same
    Idempotency-Key is answered from them.
    """
    waiting = asyncio.wrap_future(done)
    try:
        # Shielded: a timeout or a cancelled request must not cancel the writer's future,
        # which the writer still completes; the shield also retrieves its late outcome.
        await asyncio.wait_for(asyncio.shield(waiting), timeout_s)
    except TimeoutError:
        raise LogUnavailable(f"the query log did not commit within {timeout_s:g} s") from None
