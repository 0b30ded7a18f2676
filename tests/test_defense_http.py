"""The defense in the serving path: a real `mlaas serve` with detectors, over HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from defense.training import train_detectors
from mlaas.apiclient import AdminClient
from mlaas.datasets import load_dataset
from mlaas.images import InputShape
from mlaas.wire import NPY_MEDIA_TYPE, encode_npy
from server.inference import Victim
from testbed.serverproc import ServerProcess
from tests.helpers import ADMIN_TOKEN

pytestmark = pytest.mark.slow
SHAPE = InputShape(1, 28, 28)


@pytest.fixture(scope="module")
def defense_dir(tiny_victim: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("defense")
    train_detectors(["ood-binary", "msp"], tiny_victim, size=2000, out_dir=directory)
    return directory


@pytest.fixture(scope="module")
def crops() -> np.ndarray:
    return load_dataset("natural-crops", SHAPE).get_batch(np.arange(200))


@pytest.fixture(scope="module")
def pool() -> np.ndarray:
    return load_dataset("fashion-mnist:pool", SHAPE).get_batch(np.arange(200))


def serve(tiny_victim, defense_dir, tmp_path, policy: str) -> tuple[ServerProcess, dict]:
    env = {
        "MLAAS_DATABASE_URL": f"sqlite:///{tmp_path / 'mlaas.db'}",
        "MLAAS_ADMIN_TOKEN": ADMIN_TOKEN,
        "MLAAS_DETECTORS": "ood-binary,msp,prada",
        "MLAAS_POLICY": policy,
        "MLAAS_DEFENSE_DIR": str(defense_dir),
    }
    return ServerProcess(tiny_victim, env=env, log_file=tmp_path / "server.log"), env


def post(server: ServerProcess, key: str, images: np.ndarray) -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/predict",
        content=encode_npy(images),
        headers={"Authorization": f"Bearer {key}", "Content-Type": NPY_MEDIA_TYPE},
        timeout=60,
    )


def test_block_refuses_a_flagged_client_and_spares_the_others(
    tiny_victim, defense_dir, tmp_path, crops, pool
) -> None:
    server, env = serve(tiny_victim, defense_dir, tmp_path, "block")
    with server, AdminClient(server.url, ADMIN_TOKEN) as admin:
        thief, user = admin.create_key("thief"), admin.create_key("user")
        first = post(server, thief, crops[:20])
        assert first.status_code == 200  # the batch that trips the alarm is still answered
        refused = post(server, thief, crops[20:30])
        assert refused.status_code == 403
        error = refused.json()["error"]
        assert error["code"] == "client_blocked" and "ood-binary" in error["message"]
        assert post(server, user, pool[:50]).status_code == 200
        assert admin.wait_for_log(70)  # the log is written off the request path

        standing = httpx.get(
            f"{server.url}/admin/clients/thief",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        ).json()
        assert standing["status"] == "blocked" and standing["queries_logged"] == 20
        assert standing["monitor"]["flagged_by"][0] == "ood-binary"
        assert standing["alerts"][0]["query_count"] <= 20
        assert admin.queries(client="user", limit=1)[0]["scores"]["ood-binary"] is not None
    # After the stop, the CLI reads the same alerts from the database.
    shown = subprocess.run(
        [sys.executable, "-m", "testbed", "alerts", "--format", "json"],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    alerts = json.loads(shown.stdout)
    assert {a["client"] for a in alerts} == {"thief"}
    ood = next(a for a in alerts if a["detector"] == "ood-binary")
    assert ood["action"] == "block" and ood["score"] > ood["threshold"]
    assert 1 <= ood["query_count"] <= 20


def test_deceive_perturbs_answers_after_the_alert(
    tiny_victim, defense_dir, tmp_path, crops
) -> None:
    server, _ = serve(tiny_victim, defense_dir, tmp_path, "deceive")
    truth = Victim(tiny_victim, "cpu").forward(crops[20:40]).probs
    with server, AdminClient(server.url, ADMIN_TOKEN) as admin:
        thief = admin.create_key("thief")
        assert post(server, thief, crops[:20]).status_code == 200  # trips the alarm
        answer = post(server, thief, crops[20:40])
        assert answer.status_code == 200
        got = np.zeros_like(truth)
        for row, prediction in enumerate(answer.json()["predictions"]):
            for score in prediction["scores"]:
                got[row, score["index"]] = score["prob"]
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-4)
    assert np.abs(got - truth).max() > 0.05  # the vectors are bent...
    assert (got.argmax(1) == truth.argmax(1)).mean() >= 0.9  # ...while the labels mostly hold


def test_serve_refuses_an_untrained_detector(tiny_victim, tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "testbed", "serve", "--victim", str(tiny_victim),
         "--detector", "mahalanobis"],
        env={**os.environ, "MLAAS_DEFENSE_DIR": str(tmp_path)},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1 and "mlaas defense train mahalanobis" in result.stderr
