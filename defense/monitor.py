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
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum

from defense.detectors import Detector, Observation
from defense.state import Record, StateStore

SUMMARY = "_summary"
ACCOUNT_PREFIX = "account:"


def account_record(account: str) -> str:
    """The state store's name for an account's record."""
    return ACCOUNT_PREFIX + account


class Policy(StrEnum):
    monitor = "monitor"
    block = "block"
    deceive = "deceive"


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


@dataclass
class Verdict:
    scores: list[dict[str, float | None]]  # per query: detector -> score (the key's)
    alerts: list[Alert]
    status: ClientStatus  # the key's
    account_status: ClientStatus | None = None  # its shared account's, when it has one

    @property
    def flagged(self) -> bool:
        """Flagged at either level: the policy applies to the key."""
        return self.status.flagged or (
            self.account_status is not None and self.account_status.flagged
        )


@dataclass
class Standing:
    """A key's status and its shared account's (None when the key is alone in its account)."""

    status: ClientStatus
    account: str | None = None
    account_status: ClientStatus | None = None

    @property
    def flagged(self) -> bool:
        return self.status.flagged or (
            self.account_status is not None and self.account_status.flagged
        )

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
        if not account or account == client:
            return Standing(self.status(client))
        return Standing(self.status(client), account, self.account_status(account))

    def clients(self) -> list[str]:
        """Every record in the store: keys, and accounts as ``account:NAME``."""
        return self.store.clients()

    def observe(self, client: str, batch: Observation, account: str | None = None) -> Verdict:
        """Score a batch of ``client``'s queries, in order, and update its record; when
        ``account`` is given and is not the client's own name, update the account's too."""
        shared = account if account and account != client else None
        scores, alerts, status = self._observe(client, client, batch, Level.key, account)
        if shared is None:
            return Verdict(scores, alerts, status)
        _, more, account_status = self._observe(
            account_record(shared), client, batch, Level.account, shared
        )
        return Verdict(scores, alerts + more, status, account_status)

    def _observe(
        self, record_name: str, client: str, batch: Observation, level: Level, account: str | None
    ) -> tuple[list[dict[str, float | None]], list[Alert], ClientStatus]:
        with self.store.lock(record_name):
            record = self.store.load(record_name)
            status = _status_from(record_name, record.get(SUMMARY))
            scores: list[dict[str, float | None]] = [{} for _ in range(len(batch))]
            alerts: list[Alert] = []
            updated: Record = {}
            for detector in self.detectors:
                state = record.get(detector.name)
                if not isinstance(state, dict):
                    state = detector.initial_state()
                result = detector.observe(state, batch)
                updated[detector.name] = state
                for row, value in zip(scores, result.scores, strict=True):
                    row[detector.name] = _finite(value)
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
                            threshold=float(result.threshold),
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
        return scores, alerts, status


def _status_from(client: str, raw: object) -> ClientStatus:
    if not isinstance(raw, bytes):
        return ClientStatus(client=client)
    return ClientStatus(**json.loads(raw))
