"""Sybil-aware detection: keys belong to accounts, and detectors also decide per account.

An adversary who spreads its queries over many keys stays under every per-key threshold; the
account's record sees them as one stream. A key alone in its account (the default) is
observed exactly as before.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import redis
from typer.testing import CliRunner

from defense.detectors import MaxSoftmax, Observation, save_artifact
from defense.monitor import Monitor, Policy
from defense.sequential import Cusum
from defense.state import MemoryStore, RedisStore
from mlaas.datasets import load_dataset
from mlaas.images import InputShape
from mlaas.wire import NPY_MEDIA_TYPE, encode_npy
from server.db import init_db, make_engine
from server.keys import KeyStore, KeyStoreError
from server.querylog import fetch_alerts
from testbed.cli import app
from tests.helpers import ADMIN_TOKEN, REDIS_URL, bearer, create_key

ADMIN = bearer(ADMIN_TOKEN)

# ------------------------------------------------------------------ the monitor


def msp_batch(size: int, score: float = 0.8, classes: int = 10) -> Observation:
    """``size`` queries whose MSP score (1 - max p) is ``score``."""
    probs = np.full((size, classes), score / (classes - 1), dtype=np.float32)
    probs[:, 0] = 1.0 - score
    images = np.zeros((size, 4, 4, 1), dtype=np.uint8)
    return Observation(images, np.log(probs), probs, np.zeros((size, 2), np.float32))


def cusum_detector() -> MaxSoftmax:
    # 0.3 per query above the drift: a key alarms alone after 67 queries; two keys sharing an
    # account, after 67 between them.
    return MaxSoftmax(Cusum(drift=0.5, threshold=20.0))


def spread(monitor: Monitor, keys: list[str], account: str | None, batches: int = 8) -> list:
    """Batches of ten queries, round-robin over ``keys``: every verdict, in order."""
    return [
        (keys[i % len(keys)], monitor.observe(keys[i % len(keys)], msp_batch(10), account))
        for i in range(batches)
    ]


def test_two_keys_each_under_the_threshold_are_flagged_as_one_account() -> None:
    monitor = Monitor([cusum_detector()], MemoryStore(), Policy.block)
    verdicts = spread(monitor, ["k1", "k2"], "ACME")
    alerts = [a for _, v in verdicts for a in v.alerts]
    assert [(a.level, a.account, a.client, a.query_count) for a in alerts] == [
        ("account", "ACME", "k1", 67)  # the 7th batch, k1's, holds the account's 67th query
    ]
    assert alerts[0].score > alerts[0].threshold == 20.0
    for key in ("k1", "k2"):  # 40 queries each: 12 of the 20 the CUSUM needs
        assert monitor.status(key).queries == 40 and not monitor.status(key).flagged
        standing = monitor.standing(key, "ACME")
        assert standing.flagged and "account 'ACME'" in standing.reason
    assert [v.flagged for _, v in verdicts] == [False] * 6 + [True, True]
    assert not verdicts[7][1].status.flagged  # k2 itself is clean: flagged through ACME
    assert monitor.account_status("ACME").queries == 80
    assert monitor.clients() == ["account:ACME", "k1", "k2"]
    # The same stream from one key alone is flagged at key level, at the same query.
    alone = Monitor([cusum_detector()], MemoryStore(), Policy.block)
    solo = [a for _, v in spread(alone, ["solo"], None) for a in v.alerts]
    assert [(a.level, a.client, a.query_count) for a in solo] == [("key", "solo", 67)]


def test_per_query_statistics_carry_the_account_s_beside_the_key_s() -> None:
    """For the dashboard: per query, the key's CUSUM and the account's, each numbered in its
    own stream; the account's crosses its threshold at the account alert's query."""
    monitor = Monitor([cusum_detector()], MemoryStore(), Policy.monitor)
    verdicts = spread(monitor, ["k1", "k2"], "ACME")
    rows = [row for _, v in verdicts for row in v.statistics]
    assert set(rows[0]) == {"query", "msp", "account:query", "account:msp"}
    assert [row["account:query"] for row in rows] == list(range(1, 81))
    k1 = [row for (key, v) in verdicts if key == "k1" for row in v.statistics]
    assert [row["query"] for row in k1] == list(range(1, 41))
    # 0.3 above the drift per query: the key's sum grows over its own queries, the
    # account's over all of them
    assert [row["msp"] for row in k1] == pytest.approx([0.3 * n for n in range(1, 41)])
    assert [row["account:msp"] for row in rows] == pytest.approx([0.3 * n for n in range(1, 81)])
    (alert,) = [a for _, v in verdicts for a in v.alerts]
    crossed = next(row for row in rows if row["account:msp"] > 20.0)
    assert alert.level == "account" and alert.query_count == crossed["account:query"] == 67


def test_a_key_alone_in_its_account_is_observed_as_before() -> None:
    def run(account: str | None) -> tuple[list, list[str]]:
        monitor = Monitor([cusum_detector()], MemoryStore())
        out = [
            (v.scores, [(a.detector, a.level, a.query_count, a.score) for a in v.alerts])
            for _, v in spread(monitor, ["alice"], account, batches=12)
        ]
        return out, monitor.clients()

    before, records = run(None)
    with_account, records_with_account = run("alice")  # the default: the key's own name
    assert with_account == before
    assert records == records_with_account == ["alice"]  # no account record
    alerts = [a for _, batch in with_account for a in batch]
    # one alert, not two; its score is the statistic after the batch (70 queries)
    assert alerts == [("msp", "key", 67, pytest.approx(21.0))]


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str]] = []

    def load(self, client):
        self.calls.append(("load", client))
        return super().load(client)

    def save(self, client, fields):
        self.calls.append(("save", client))
        super().save(client, fields)

    def field(self, client, name):
        self.calls.append(("field", client))
        return super().field(client, name)


def test_what_a_request_costs_the_state_store() -> None:
    store = CountingStore()
    monitor = Monitor([cusum_detector()], store, Policy.block)
    monitor.standing("alice", "alice")
    monitor.observe("alice", msp_batch(3), "alice")
    assert store.calls == [("field", "alice"), ("load", "alice"), ("save", "alice")]
    store.calls.clear()
    monitor.standing("k1", "ACME")
    monitor.observe("k1", msp_batch(3), "ACME")
    assert store.calls == [
        ("field", "k1"),
        ("field", "account:ACME"),
        ("load", "k1"),
        ("save", "k1"),
        ("load", "account:ACME"),
        ("save", "account:ACME"),
    ]


def test_accounts_in_redis_decide_as_in_memory_and_persist(redis_prefix: str) -> None:
    in_memory = spread(Monitor([cusum_detector()], MemoryStore()), ["k1", "k2", "k3"], "ACME")
    shared = Monitor([cusum_detector()], RedisStore(REDIS_URL, prefix=redis_prefix))
    in_redis = spread(shared, ["k1", "k2", "k3"], "ACME")

    def decisions(verdicts: list) -> list:
        return [
            (key, v.flagged, [(a.level, a.client, a.query_count, a.score) for a in v.alerts])
            for key, v in verdicts
        ]

    assert decisions(in_redis) == decisions(in_memory)
    assert any(v.alerts for _, v in in_redis)
    shared.store.close()
    connection = redis.Redis.from_url(REDIS_URL)
    try:
        assert connection.exists(f"{redis_prefix}:client:account:ACME")
    finally:
        connection.close()
    restarted = Monitor([cusum_detector()], RedisStore(REDIS_URL, prefix=redis_prefix))
    assert restarted.account_status("ACME").flagged_by == ["msp"]
    assert restarted.standing("k3", "ACME").flagged and not restarted.status("k3").flagged
    restarted.store.close()


# ------------------------------------------------------------------ keys and the schema


def test_keys_carry_their_account(database_url: str) -> None:
    engine = make_engine(database_url)
    init_db(engine)
    keys = KeyStore(engine)
    alone = keys.create("alice")
    shared = keys.create("acme-1", account="ACME")
    keys.create("acme-2", account="ACME")
    assert {k.name: k.account for k in keys.list()} == {
        "alice": "alice",
        "acme-1": "ACME",
        "acme-2": "ACME",
    }
    assert keys.authenticate(alone).shared_account is None
    client = keys.authenticate(shared)
    assert (client.account, client.shared_account) == ("ACME", "ACME")
    # One namespace: an account named after a key is that key alone, and the other way round.
    with pytest.raises(KeyStoreError, match="own account"):
        keys.create("mallory", account="alice")
    with pytest.raises(KeyStoreError, match="shared account"):
        keys.create("ACME")
    with pytest.raises(KeyStoreError, match="account name"):
        keys.create("bob", account="account:x")
    assert len(keys.list()) == 3
    engine.dispose()


def test_a_database_from_before_accounts_is_upgraded(tmp_path) -> None:
    path = tmp_path / "old.db"
    engine = make_engine(f"sqlite:///{path}")
    init_db(engine)
    key = KeyStore(engine).create("alice")
    engine.dispose()
    with sqlite3.connect(path) as old:  # the keys and alerts tables as they were
        old.execute("DROP INDEX ix_api_keys_account")
        old.execute("ALTER TABLE api_keys DROP COLUMN account")
        old.execute("DROP INDEX ix_alerts_account")
        old.execute("ALTER TABLE alerts DROP COLUMN level")
        old.execute("ALTER TABLE alerts DROP COLUMN account")
        old.execute(
            "INSERT INTO alerts (client, detector, created_at, query_count, score, threshold,"
            " action) VALUES ('alice', 'msp', '2026-11-30 12:00:00', 40, 9.0, 5.0, 'block')"
        )
        old.execute("ALTER TABLE queries DROP COLUMN statistics")
        old.execute("DROP TABLE admin_sessions")
        old.execute("DROP TABLE alembic_version")  # before migrations
    engine = make_engine(f"sqlite:///{path}")
    init_db(engine)
    # The old key is its own account, and its alarm one on its own queries.
    assert [(k.name, k.account) for k in KeyStore(engine).list()] == [("alice", "alice")]
    client = KeyStore(engine).authenticate(key)
    assert client is not None and client.shared_account is None
    alerts = fetch_alerts(engine)
    assert [(a["client"], a["level"], a["account"]) for a in alerts] == [("alice", "key", "alice")]
    engine.dispose()


def test_cli_creates_keys_in_an_account_and_lists_it(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MLAAS_DATABASE_URL", f"sqlite:///{tmp_path / 'keys.db'}")
    runner = CliRunner()
    for args in (["alice"], ["acme-1", "--account", "ACME"], ["acme-2", "--account", "ACME"]):
        created = runner.invoke(app, ["keys", "create", *args])
        assert created.exit_code == 0, created.output
        assert created.stdout.strip().startswith("mlk_")
    refused = runner.invoke(app, ["keys", "create", "eve", "--account", "alice"])
    assert refused.exit_code == 1 and "own account" in refused.output
    listed = json.loads(runner.invoke(app, ["keys", "list", "--format", "json"]).stdout)
    assert [(k["name"], k["account"]) for k in listed] == [
        ("alice", "alice"),
        ("acme-1", "ACME"),
        ("acme-2", "ACME"),
    ]
    table = runner.invoke(app, ["keys", "list", "--format", "csv"]).stdout
    assert table.splitlines()[0].startswith("name,account,")
    alerts = runner.invoke(app, ["alerts", "--account", "ACME", "--format", "csv"])
    assert alerts.exit_code == 0 and alerts.stdout.splitlines() == [
        "time,client,level,account,detector,query_count,score,threshold,action"
    ]


# ------------------------------------------------------------------ over HTTP

SHAPE = InputShape(1, 28, 28)


@pytest.fixture(scope="module")
def crops() -> np.ndarray:
    """Knockoff's transfer set: natural images, out of the victim's distribution."""
    return load_dataset("natural-crops", SHAPE).get_batch(np.arange(600))


@pytest.fixture(scope="module")
def fixed_msp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ``msp`` artifact with a fixed CUSUM instead of a calibrated one. On the tiny victim
    natural crops score about 0.75 (benign images 0.46): 0.2 per query above the drift, so a
    key needs about 150 crops to alarm alone, an account of ten keys 15 from each."""
    directory = tmp_path_factory.mktemp("defense")
    save_artifact(directory, "msp", {}, {"drift": 0.55, "threshold": 30.0})
    return directory


def predict(client, key: str, images: np.ndarray):
    return client.post(
        "/v1/predict",
        content=encode_npy(images),
        headers={**bearer(key), "Content-Type": NPY_MEDIA_TYPE},
    )


def sybil_stream(client, keys: list[str], crops: np.ndarray, per_request: int = 5) -> int:
    """Round-robin requests over ``keys`` until one is refused; the images answered."""
    answered = 0
    for start in range(0, len(crops), per_request):
        key = keys[(start // per_request) % len(keys)]
        response = predict(client, key, crops[start : start + per_request])
        if response.status_code == 403:
            return answered
        assert response.status_code == 200, response.text
        answered += per_request
    return answered


def test_a_sybil_stream_over_ten_keys_is_blocked_as_one_account(
    make_client, fixed_msp, crops
) -> None:
    client = make_client(detectors="msp", defense_dir=fixed_msp, policy="block")
    keys = [create_key(client, f"acme-{i}", account="acme") for i in range(10)]
    user = create_key(client, "user")

    answered = sybil_stream(client, keys, crops)
    assert answered <= 500, answered  # within 50 queries per key
    print(f"account flagged after {answered} queries, {answered // 10} per key")

    alerts = client.get("/admin/alerts", headers=ADMIN).json()
    assert [(a["level"], a["account"], a["detector"]) for a in alerts] == [
        ("account", "acme", "msp")
    ]  # no key was flagged on its own
    alarm = alerts[0]
    assert alarm["query_count"] <= answered and alarm["score"] > alarm["threshold"] == 30.0
    service = client.app.state.service
    for i in range(10):
        assert not service.monitor.status(f"acme-{i}").flagged
        assert service.monitor.status(f"acme-{i}").queries <= 50

    # The policy now holds for every key of the account, and for nobody else.
    for key in keys:
        refused = predict(client, key, crops[:1])
        assert refused.status_code == 403
        error = refused.json()["error"]
        assert error["code"] == "client_blocked" and "account 'acme'" in error["message"]
    assert predict(client, user, crops[:3]).status_code == 200

    standing = client.get("/admin/clients/acme-7", headers=ADMIN).json()
    assert standing["status"] == "blocked" and standing["account"] == "acme"
    assert not standing["monitor"]["flagged"]
    assert standing["account_monitor"]["flagged_by"] == ["msp"]
    assert [a["level"] for a in standing["alerts"]] == ["account"]
    assert client.get("/admin/clients/user", headers=ADMIN).json()["status"] == "active"
    assert client.get("/admin/alerts?level=key", headers=ADMIN).json() == []
    assert fetch_alerts(service.engine, account="acme", level="account") == alerts
    keys_listed = {k["name"]: k["account"] for k in client.get("/admin/keys", headers=ADMIN).json()}
    assert keys_listed == {**{f"acme-{i}": "acme" for i in range(10)}, "user": "user"}
    dashboard = client.get("/admin/dashboard/data", headers=ADMIN).json()
    rows = {c["client"]: c["flagged_by"] for c in dashboard["clients"]}
    assert rows["acme-3"] == ["account:msp"] and rows["user"] == []


def rows_of(client, name: str) -> list[dict]:
    """A key's logged queries, in the order the monitor numbered them."""
    rows = client.get(f"/admin/queries?client={name}&limit=1000", headers=ADMIN).json()
    return sorted(rows, key=lambda row: row["statistics"]["query"])


def test_the_dashboard_shows_each_statistic_against_its_threshold_up_to_the_alert(
    make_client, database_url, fixed_msp, crops
) -> None:
    """The dashboard's charts for a key flagged on its own and for a key whose account was
    flagged: the statistic after each query, the threshold and the alert's query."""
    client = make_client(
        detectors="msp", defense_dir=fixed_msp, policy="block", database_url=database_url
    )
    thief = create_key(client, "thief")
    keys = [create_key(client, f"acme-{i}", account="acme") for i in range(3)]
    answered = sybil_stream(client, [thief], crops, per_request=20)
    sybil_stream(client, keys, crops)
    alerts = {a["level"]: a for a in client.get("/admin/alerts", headers=ADMIN).json()}
    assert alerts["key"]["client"] == "thief" and alerts["account"]["account"] == "acme"

    data = client.get("/admin/dashboard/data?client=thief", headers=ADMIN).json()
    (chart,) = data["charts"]  # one detector, one level: a key alone
    assert (chart["level"], chart["name"], chart["detector"]) == ("key", "thief", "msp")
    assert (chart["threshold"], chart["direction"]) == (30.0, "above")
    assert chart["alert"]["query_count"] == alerts["key"]["query_count"]
    assert chart["queries"] == [1, answered]
    points = dict(chart["points"])
    assert sorted(points) == list(range(1, answered + 1))
    at = chart["alert"]["query_count"]
    assert points[at] > 30.0 >= max(points[q] for q in range(1, at))  # crossed at the alert
    # The statistic is the CUSUM over the logged scores, query by query.
    statistic, expected = 0.0, []
    for row in rows_of(client, "thief"):
        statistic = max(0.0, statistic + row["scores"]["msp"] - 0.55)
        expected.append(statistic)
    assert [points[q] for q in sorted(points)] == pytest.approx(expected, rel=1e-9)

    data = client.get("/admin/dashboard/data?client=acme-1", headers=ADMIN).json()
    key_chart, account_chart = data["charts"]
    assert (key_chart["level"], key_chart["name"], key_chart["alert"]) == ("key", "acme-1", None)
    assert max(p[1] for p in key_chart["points"]) < 30.0
    assert (account_chart["level"], account_chart["name"]) == ("account", "acme")
    at = alerts["account"]["query_count"]
    assert account_chart["alert"]["query_count"] == at
    points = dict(account_chart["points"])
    assert sorted(points) == list(range(1, max(points) + 1))  # every key's queries, numbered
    assert points[at] > 30.0 >= max(points[q] for q in range(1, at))
    assert max(points) == sum(len(rows_of(client, f"acme-{i}")) for i in range(3))


def test_deceive_covers_every_key_of_a_flagged_account(make_client, fixed_msp, crops) -> None:
    client = make_client(detectors="msp", defense_dir=fixed_msp, policy="deceive", deceive="label")
    keys = [create_key(client, f"acme-{i}", account="acme") for i in range(10)]
    granularities = []
    for start in range(0, 300, 5):
        response = predict(client, keys[(start // 5) % 10], crops[start : start + 5])
        assert response.status_code == 200
        granularities.append(response.json()["granularity"])
    flip = granularities.index("label")  # answers turn to labels once the account alarms
    assert 0 < flip <= 100 and set(granularities[flip:]) == {"label"}
    assert set(granularities[:flip]) == {"probs"}
    fresh = predict(client, keys[(flip + 1) % 10], crops[300:302])  # a key the alarm spared
    assert fresh.json()["granularity"] == "label"


def test_admin_api_creates_keys_in_an_account(make_client) -> None:
    client = make_client()
    created = client.post("/admin/keys", json={"name": "acme-1", "account": "acme"}, headers=ADMIN)
    assert created.status_code == 201 and created.json()["account"] == "acme"
    assert (
        client.post("/admin/keys", json={"name": "solo"}, headers=ADMIN).json()["account"] == "solo"
    )
    clash = client.post("/admin/keys", json={"name": "acme"}, headers=ADMIN)
    assert clash.status_code == 409 and "shared account" in clash.json()["error"]["message"]
    bad = client.post("/admin/keys", json={"name": "x", "account": "a b"}, headers=ADMIN)
    assert bad.status_code == 422
    assert client.get("/admin/keys").status_code == 401
