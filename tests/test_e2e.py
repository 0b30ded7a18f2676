"""End to end: `mlaas serve` as a real uvicorn process on loopback, driven like a user would."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from defense.detectors import DEFAULT_DETECTORS
from defense.training import train_detectors
from mlaas.datasets import load_dataset
from mlaas.images import InputShape
from mlaas.wire import NPY_MEDIA_TYPE, encode_npy, encode_png
from server.db import make_engine
from server.querylog import count_queries
from testbed.serverproc import ServerProcess
from tests.helpers import ADMIN_TOKEN

pytestmark = pytest.mark.slow


def mlaas(
    env: dict[str, str], *args: str, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "testbed", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture
def env(tmp_path: Path, database_url: str) -> dict[str, str]:
    return {
        "MLAAS_DATABASE_URL": database_url,
        "MLAAS_ADMIN_TOKEN": ADMIN_TOKEN,
        "MLAAS_VAR_DIR": str(tmp_path / "var"),
    }


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return load_dataset("fashion-mnist:test", InputShape(1, 28, 28)).get_batch(np.arange(40))


def test_serve_query_log_and_graceful_stop(
    tiny_victim, env, images, database_url, tmp_path
) -> None:
    created = mlaas(env, "keys", "create", "alice")
    key = created.stdout.strip()
    assert created.stdout == key + "\n" and key.startswith("mlk_")  # alone on stdout
    assert "shown once" in created.stderr

    server = ServerProcess(tiny_victim, env=env, log_file=tmp_path / "server.log").start()
    try:
        headers = {"Authorization": f"Bearer {key}"}
        # What the README's curl line sends: one PNG as multipart.
        single = httpx.post(
            f"{server.url}/v1/predict",
            files={"file": ("shirt.png", encode_png(images[0]), "image/png")},
            headers=headers,
        )
        assert single.status_code == 200, single.text
        query_id = single.json()["predictions"][0]["query_id"]
        answered = 1
        for start in range(0, 39, 13):
            response = httpx.post(
                f"{server.url}/v1/predict",
                content=encode_npy(images[1 + start : 14 + start]),
                headers={**headers, "Content-Type": NPY_MEDIA_TYPE},
            )
            assert response.status_code == 200, response.text
            answered += len(response.json()["predictions"])
        assert answered == 40
        # A refused request is not an answered query.
        assert httpx.post(f"{server.url}/v1/predict", content=b"x").status_code == 401
    finally:
        exit_code = server.stop()
    assert exit_code == 0
    # The graceful stop flushed every pending row: 40 answered, 40 rows.
    assert count_queries(make_engine(database_url)) == 40

    shown = json.loads(
        mlaas(env, "logs", "--client", "alice", "--format", "json", "--limit", "0").stdout
    )
    assert len(shown) == 40 and query_id in {row["id"] for row in shown}
    assert shown[0]["label_name"] and shown[0]["client"] == "alice"
    table = mlaas(env, "logs", "--limit", "5").stdout
    assert "alice" in table
    rows = list(csv.DictReader(io.StringIO(mlaas(env, "logs", "--format", "csv").stdout)))
    assert len(rows) == 40 and rows[0]["client"] == "alice"
    assert mlaas(env, "logs", "--client", "nobody", "--format", "json").stdout.strip() == "[]"


def test_revoking_through_the_cli_locks_out_a_live_client(
    tiny_victim, env, images, tmp_path
) -> None:
    key = mlaas(env, "keys", "create", "mallory", "--granularity", "label").stdout.strip()
    listed = json.loads(mlaas(env, "keys", "list", "--format", "json").stdout)
    assert [(k["name"], k["granularity"], k["revoked_at"]) for k in listed] == [
        ("mallory", "label", None)
    ]
    assert key not in json.dumps(listed)  # keys are never shown again
    with ServerProcess(tiny_victim, env=env, log_file=tmp_path / "server.log") as server:

        def post() -> httpx.Response:
            return httpx.post(
                f"{server.url}/v1/predict",
                content=encode_npy(images[:2]),
                headers={"Authorization": f"Bearer {key}", "Content-Type": NPY_MEDIA_TYPE},
            )

        first = post()
        assert first.status_code == 200 and first.json()["granularity"] == "label"
        mlaas(env, "keys", "revoke", "mallory")
        assert post().status_code == 401
    assert mlaas(env, "keys", "revoke", "nobody", check=False).returncode == 1
    duplicate = mlaas(env, "keys", "create", "mallory", check=False)
    assert duplicate.returncode == 1 and "already exists" in duplicate.stderr


def test_serve_refuses_a_missing_victim_clearly(tmp_path) -> None:
    result = mlaas({}, "serve", "--victim", str(tmp_path / "nothing"), check=False)
    assert result.returncode == 1
    assert "does not exist" in result.stderr and "mlaas victim train" in result.stderr
    bad = mlaas({}, "serve", "--victim", str(tmp_path), "--granularity", "top3", check=False)
    assert bad.returncode == 1


def test_demo_runs_to_the_end(tiny_victim, tmp_path) -> None:
    # The demo trains the detectors a victim lacks: a copy of the shared victim, given small
    # ones beforehand (the demo's own take 10,000 images a set), which the demo then reuses.
    victim = tmp_path / "victim"
    shutil.copytree(tiny_victim, victim)
    train_detectors(list(DEFAULT_DETECTORS), victim, size=1500)
    workdir = tmp_path / "demo"
    result = mlaas(
        {"MLAAS_VAR_DIR": str(tmp_path / "var")},
        "demo", "--victim", str(victim), "--workdir", str(workdir),
        "--benign-clients", "2", "--benign-queries", "60", "--budget", "200", "--eval-size", "300",
        timeout=600,  # two active-learning attackers train a substitute per round
    )  # fmt: skip
    summary = json.loads((workdir / "summary.json").read_text())
    clients = {c["client"]: c for c in summary["clients"]}
    attackers = ("knockoff", "stealth", "realistic", "jbda")
    assert set(clients) == {"benign-1", "benign-2", *attackers}
    assert all(c["error"] is None for c in clients.values())
    assert [clients[n]["queries"] for n in attackers] == [200, 200, 200, 300]
    assert summary["log_rows"] == summary["queries_answered"] + summary["experimenter_queries"]
    assert summary["server_exit_code"] == 0
    assert clients["knockoff"]["alerts"]["ood-binary"] <= 50  # natural crops are caught early
    assert summary["benign_false_alarms"] == 0
    assert clients["realistic"]["accuracy"] > 0.5 and clients["benign-1"]["api_accuracy"] > 0.5
    assert "knockoff" in result.stdout and "report:" in result.stdout
    report = (workdir / "report.md").read_text()
    assert "| knockoff | 200 |" in report
    for name in attackers:
        assert (workdir / "runs" / name / "curve.png").stat().st_size > 10_000
        assert f"runs/{name}/curve.png" in report
