"""The per-client monitor: every detector on every query, and the deployment's alert policy.

``monitor``  log and alert;
``block``    after an alert, the client's further requests are refused (403);
``deceive``  after an alert, the client keeps getting answers, perturbed.

The monitor knows clients by name only; the server persists its alerts and applies its
decisions. Each client's record (query count, status, every detector's state) lives in a
:class:`~defense.state.StateStore` and is updated under the client's lock.

Accounts: a key that shares an account with other keys is observed twice, under its own
record (level ``key``) and under its account's (level ``account``), with separate detector
state, so that an adversary spreading queries over many keys (a Sybil attack) is still one
stream. An account's record is named ``account:NAME``; client names cannot hold a ``:``, so
the two never collide. The records are updated one after the other, each under its own lock
(never both held at once). A key alone in its account (the default: the account is the key's
own name) has only its key record, as before.

Per query, a verdict carries each detector's score and its decision statistic after the
query (the CUSUM's sum, PRADA's W where a test was taken), with the query's number: what the
query log keeps so that the dashboard can draw each statistic against its threshold up to the
alert. At account level the same, prefixed ``account:``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum

import numpy as np

from defense.detectors import Detector, Observation
from defense.options import Policy
from defense.state import Record, StateStore

SUMMARY = "_summary"
ACCOUNT_PREFIX = "account:"
QUERY = "query"
"""In a query's statistics: the query's number in its client's (or account's) stream, from 1."""


def account_record(account: str) -> str:
    """The state store's name for an account's record."""
    return ACCOUNT_PREFIX + account


def shared_account(client: str, account: str | None) -> str | None:
    """``account`` when it is more than the key itself (detectors also decide on it), else
    None: a key whose account is unset or its own name is alone."""
    return account if account and account != client else None


class Level(StrEnum):
    key = "key"  # the key's own queries
    account = "account"  # every query of the key's account


@dataclass
class Alert:
    client: str  # the key whose queries alarmed (at account level: whose request tripped it)
    detector: str
    query_count: int  # the key's (or account's) queries up to and including the alarming one
    score: float  # the detector's decision statistic at the alarm
    threshold: float
    action: str
    level: str = Level.key.value
    account: str | None = None  # the key's account, when the monitor was told it
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))


@dataclass
class ClientStatus:
    client: str
    queries: int = 0
    flagged: bool = False
    flagged_by: list[str] = field(default_factory=list)
    first_alert_at: int | None = None
    statistics: dict[str, float | None] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


Statistics = dict[str, float | int | None]


@dataclass
class Verdict:
    scores: list[dict[str, float | None]]  # per query: detector -> score (the key's)
    alerts: list[Alert]
    status: ClientStatus  # the key's
    account_status: ClientStatus | None = None  # its shared account's, when it has one
    statistics: list[Statistics] = field(default_factory=list)
    """Per query: detector -> its decision statistic after the query (None where it took
    none), and ``query`` -> the query's number in the key's stream; for a key in a shared
    account also ``account:<detector>`` and ``account:query``, the account's."""

    @property
    def flagged(self) -> bool:
        """Flagged at either level: the policy applies to the key."""
        return _either_flagged(self.status, self.account_status)


def _either_flagged(status: ClientStatus, account_status: ClientStatus | None) -> bool:
    return status.flagged or (account_status is not None and account_status.flagged)


@dataclass
class Standing:
    """A key's status and its shared account's (None when the key is alone in its account)."""

    status: ClientStatus
    account: str | None = None
    account_status: ClientStatus | None = None

    @property
    def flagged(self) -> bool:
        return _either_flagged(self.status, self.account_status)

    @property
    def reason(self) -> str:
        """Which level is flagged, by what, in words (empty when nothing is)."""
        if self.status.flagged:
            return f"flagged by {', '.join(self.status.flagged_by)}"
        if self.account_status is not None and self.account_status.flagged:
            detectors = ", ".join(self.account_status.flagged_by)
            return f"its account {self.account!r} is flagged by {detectors}"
        return ""


def _finite(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _columns(arrays: list[np.ndarray]) -> list[list[float | None]]:
    """Per-query floats as JSON keeps them, None where not finite: one NumPy pass for all the
    detectors' scores and statistics of a batch, no Python loop."""
    if not arrays:
        return []
    stacked = np.array(arrays, dtype=np.float64)
    finite = np.isfinite(stacked)
    if finite.all():
        return stacked.tolist()
    columns = stacked.astype(object)
    columns[~finite] = None
    return columns.tolist()


def _rows(names: list[str], columns: list[list], count: int) -> list[dict]:
    """Columns of per-query values as one dict per query."""
    if not names:
        return [{} for _ in range(count)]
    return [dict(zip(names, values, strict=True)) for values in zip(*columns, strict=True)]


class Monitor:
    def __init__(
        self, detectors: list[Detector], store: StateStore, policy: Policy = Policy.monitor
    ) -> None:
        names = [d.name for d in detectors]
        if len(set(names)) != len(names):
            raise ValueError(f"a detector is listed twice: {names}")
        self.detectors = detectors
        self.store = store
        self.policy = Policy(policy)

    def status(self, client: str) -> ClientStatus:
        return _status_from(client, self.store.field(client, SUMMARY))

    def account_status(self, account: str) -> ClientStatus:
        """A shared account's status (its ``client`` field is the account's record name)."""
        record = account_record(account)
        return _status_from(record, self.store.field(record, SUMMARY))

    def standing(self, client: str, account: str | None = None) -> Standing:
        """The key's status and, when ``account`` is shared (not the key's own name), the
        account's: what the policy decides on. One field read per level."""
        shared = shared_account(client, account)
        if shared is None:
            return Standing(self.status(client))
        return Standing(self.status(client), shared, self.account_status(shared))

    def clients(self) -> list[str]:
        """Every record in the store: keys, and accounts as ``account:NAME``."""
        return self.store.clients()

    def mark_flagged(self, record_name: str, detectors: list[str]) -> ClientStatus:
        """Flag a record (a key's name, or :func:`account_record`) by ``detectors`` again, for
        a store that lost what it knew (a Redis restarted without persistence) while the alerts
        were kept elsewhere. Only the status comes back: the detectors' state starts afresh,
        but the policy holds, and no detector named here alerts a second time."""
        with self.store.lock(record_name):
            status = _status_from(record_name, self.store.field(record_name, SUMMARY))
            status.flagged = True
            status.flagged_by += [d for d in detectors if d not in status.flagged_by]
            self.store.save(record_name, {SUMMARY: json.dumps(status.to_dict()).encode()})
        return status

    def observe(self, client: str, batch: Observation, account: str | None = None) -> Verdict:
        """Score a batch of ``client``'s queries, in order, and update its record; when
        ``account`` is given and is not the client's own name, update the account's too."""
        shared = shared_account(client, account)
        count = len(batch)
        key = self._observe(client, client, batch, Level.key, account)
        scores = _rows(self.names, key.scores, count)
        names = [QUERY, *self.names]
        if shared is None:
            statistics = _rows(names, key.statistics, count)
            return Verdict(scores, key.alerts, key.status, statistics=statistics)
        at_account = self._observe(account_record(shared), client, batch, Level.account, shared)
        statistics = _rows(
            names + [ACCOUNT_PREFIX + name for name in names],
            key.statistics + at_account.statistics,
            count,
        )
        return Verdict(
            scores, key.alerts + at_account.alerts, key.status, at_account.status, statistics
        )

    @property
    def names(self) -> list[str]:
        return [detector.name for detector in self.detectors]

    def _observe(
        self, record_name: str, client: str, batch: Observation, level: Level, account: str | None
    ) -> _Observed:
        """Observe ``batch`` under one record (the key's or its account's), under its lock."""
        with self.store.lock(record_name):
            record = self.store.load(record_name)
            status = _status_from(record_name, record.get(SUMMARY))
            numbers = list(range(status.queries + 1, status.queries + len(batch) + 1))
            scores: list[np.ndarray] = []
            paths: list[np.ndarray] = []
            alerts: list[Alert] = []
            updated: Record = {}
            for detector in self.detectors:
                state = record.get(detector.name)
                if not isinstance(state, dict):
                    state = detector.initial_state()
                result = detector.observe(state, batch)
                updated[detector.name] = state
                scores.append(result.scores)
                paths.append(result.path)
                status.statistics[detector.name] = _finite(result.statistic)
                if result.alarm_at is not None and detector.name not in status.flagged_by:
                    count = status.queries + result.alarm_at + 1
                    status.flagged_by.append(detector.name)
                    alerts.append(
                        Alert(
                            client=client,
                            detector=detector.name,
                            query_count=count,
                            score=float(result.statistic),
                            threshold=float(detector.threshold),
                            action=self.policy.value,
                            level=level.value,
                            account=account,
                        )
                    )
            status.queries += len(batch)
            if alerts:
                status.flagged = True
                earliest = min(a.query_count for a in alerts)
                status.first_alert_at = min(status.first_alert_at or earliest, earliest)
            updated[SUMMARY] = json.dumps(status.to_dict()).encode()
            self.store.save(record_name, updated)
        columns = _columns(scores + paths)
        split = len(self.detectors)
        return _Observed(columns[:split], [numbers, *columns[split:]], alerts, status)


@dataclass
class _Observed:
    """A batch observed under one record, per query as columns (one per detector, in order)."""

    scores: list[list[float | None]]
    statistics: list[list]  # the queries' numbers, then each detector's statistic
    alerts: list[Alert]
    status: ClientStatus


def _status_from(client: str, raw: object) -> ClientStatus:
    if not isinstance(raw, bytes):
        return ClientStatus(client=client)
    return ClientStatus(**json.loads(raw))
