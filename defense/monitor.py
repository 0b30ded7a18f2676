"""The per-client monitor: every detector on every query, and the deployment's alert policy.

``monitor``  log and alert;
``block``    after an alert, the client's further requests are refused (403);
``deceive``  after an alert, the client keeps getting answers, perturbed.

The monitor knows clients by name only; the server persists its alerts and applies its
decisions. Each client's record (query count, status, every detector's state) lives in a
:class:`~defense.state.StateStore` and is updated under the client's lock.
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


class Policy(StrEnum):
    monitor = "monitor"
    block = "block"
    deceive = "deceive"


@dataclass
class Alert:
    client: str
    detector: str
    query_count: int  # the client's queries up to and including the one that alarmed
    score: float  # the detector's decision statistic at the alarm
    threshold: float
    action: str
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
    scores: list[dict[str, float | None]]  # per query: detector -> score
    alerts: list[Alert]
    status: ClientStatus


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

    def clients(self) -> list[str]:
        return self.store.clients()

    def observe(self, client: str, batch: Observation) -> Verdict:
        """Score a batch of ``client``'s queries, in order, and update its record."""
        with self.store.lock(client):
            record = self.store.load(client)
            status = _status_from(client, record.get(SUMMARY))
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
                        )
                    )
            status.queries += len(batch)
            if alerts:
                status.flagged = True
                earliest = min(a.query_count for a in alerts)
                status.first_alert_at = min(status.first_alert_at or earliest, earliest)
            updated[SUMMARY] = json.dumps(status.to_dict()).encode()
            self.store.save(client, updated)
        return Verdict(scores, alerts, status)


def _status_from(client: str, raw: object) -> ClientStatus:
    if not isinstance(raw, bytes):
        return ClientStatus(client=client)
    return ClientStatus(**json.loads(raw))
