"""The attacker against a real `mlaas serve` on loopback: budgets, resumption, retries, attacks."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from attacker.client import (
    BudgetExhausted,
    ExtractionClient,
    KeyRefused,
    RateLimited,
    prediction_vector,
)
from attacker.config import for_attack
from attacker.runner import ConfigMismatch, run_attack
from attacker.strategies import AdaptiveSampler, GradientBandit, softmax
from mlaas.datasets import load_dataset
from mlaas.images import InputShape
from mlaas.modelstore import load_model
from mlaas.wire import ClassScore, Prediction
from tests.faultproxy import FaultProxy
from tests.helpers import answered, wait_until

pytestmark = pytest.mark.slow
FAST = {"epochs": 2, "eval_size": 300}
# Knockoff's paper strategy: one seeded pass through the transfer set, trained once per
# checkpoint. Tests about the client, budgets, resumption and cover pin it (the default
# strategy's rounds would only add training time, and cover goes with random alone).
RANDOM = {"strategy": "random"}


_names = iter(range(10**6))


def new_key(live, granularity: str | None = None) -> tuple[str, str]:
    name = f"client-{next(_names)}"
    return name, live.admin.create_key(name, granularity)


def test_budget_is_exact_and_a_rerun_resumes_from_the_cache(live, tmp_path) -> None:
    name, key = new_key(live)
    _, experimenter = new_key(live)
    config = for_attack("knockoff", budget=250, checkpoints=[100], **RANDOM, **FAST)
    out = tmp_path / "run"
    metrics = run_attack(
        config, url=live.url, keys=[key], out=out, eval_key=experimenter, progress=False
    )
    assert answered(live, name) == 250
    assert [c["queries"] for c in metrics["checkpoints"]] == [100, 250]
    assert metrics["queries_spent"] == 250 and metrics["queries_sent_this_run"] == 250
    assert metrics["victim"]["granularity"] == "probs" and metrics["hard_labels"] is False
    assert 0.0 <= metrics["final"]["fidelity"] <= 1.0
    for artifact in ("config.json", "cache.sqlite", "metrics.json", "curve.png"):
        assert (out / artifact).is_file()
    model, card = load_model(out / "substitute")
    assert card.test_accuracy == metrics["final"]["accuracy"] and model.num_classes == 10
    assert "mlk_" not in (out / "config.json").read_text()  # keys never written down

    again = run_attack(
        config, url=live.url, keys=[key], out=out, eval_key=experimenter, progress=False
    )
    assert again["queries_sent_this_run"] == 0
    assert again["final"]["accuracy"] == metrics["final"]["accuracy"]  # seeded throughout
    assert answered(live, name) == 250
    with pytest.raises(ConfigMismatch, match="budget"):
        run_attack(
            for_attack("knockoff", budget=300, checkpoints=[100], **RANDOM, **FAST),
            url=live.url, keys=[key], out=out, progress=False,
        )  # fmt: skip


def test_a_run_recorded_before_an_option_existed_resumes(live, tmp_path) -> None:
    name, key = new_key(live)
    config = for_attack("knockoff", budget=60, checkpoints=[], **RANDOM, **FAST)
    out = tmp_path / "run"
    first = run_attack(config, url=live.url, keys=[key], out=out, progress=False)
    # As a version before issue 14 recorded it: without the options it added (rounds: 5 today,
    # not a value a missing key reads as), and served on another port.
    record = json.loads((out / "config.json").read_text())
    assert record["rounds"] == 5 and "distill" in record and record["url"] == live.url
    del record["rounds"], record["distill"]
    record["url"] = "http://127.0.0.1:1"
    (out / "config.json").write_text(json.dumps(record))

    again = run_attack(config, url=live.url, keys=[key], out=out, progress=False)
    assert again["queries_sent_this_run"] == 0 and answered(live, name) == 60
    assert again["final"]["accuracy"] == first["final"]["accuracy"]
    with pytest.raises(ConfigMismatch, match=r"other settings \(budget\)"):
        run_attack(
            for_attack("knockoff", budget=80, checkpoints=[], **RANDOM, **FAST),
            url=live.url, keys=[key], out=out, progress=False,
        )  # fmt: skip
    assert answered(live, name) == 60


def _attack_cli(url: str, key: str, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "testbed",
            "attack",
            "knockoff",
            "--url",
            url,
            "--key",
            key,
            "--out",
            str(out),
            "--budget",
            "400",
            "--checkpoints",
            "400",
            "--epochs",
            "1",
            "--eval-size",
            "100",
            "--query-batch",
            "10",
            "--concurrency",
            "1",
            "--quiet",
            "--strategy",
            "random",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )


def _cached_answers(out: Path) -> int:
    try:
        with sqlite3.connect(out / "cache.sqlite") as db:
            return db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def test_a_killed_client_restarts_and_the_server_answers_exactly_the_budget(live, tmp_path):
    name, key = new_key(live)
    out = tmp_path / "killed"
    first = _attack_cli(live.url, key, out, "--throttle", "150")
    wait_until(lambda: _cached_answers(out) >= 100, 60, interval=0.05, what="100 cached answers")
    first.send_signal(signal.SIGKILL)  # no chance to clean up
    first.wait()
    interrupted_at = _cached_answers(out)
    assert 100 <= interrupted_at < 400
    second = _attack_cli(live.url, key, out)
    stdout, stderr = second.communicate(timeout=300)
    assert second.returncode == 0, stderr
    assert json.loads(stdout)["queries"] == 400
    assert answered(live, name) == 400  # not one more, although a batch was in flight


def test_injected_429_and_5xx_are_retried(live, tmp_path) -> None:
    name, key = new_key(live)
    images = load_dataset("natural-crops", InputShape(1, 28, 28)).get_batch(np.arange(200))
    proxy = FaultProxy(live.url, {2: "429", 3: "503", 5: "502", 6: "503", 9: "429"})
    with (
        proxy.running(),
        ExtractionClient(
            proxy.url, key, budget=200, batch_size=20, concurrency=2, backoff_s=0.01, progress=False
        ) as client,
    ):
        got = client.query(images)
    assert sorted(proxy.injected) == ["429", "429", "502", "503", "503"]
    assert client.retries == 5 and len(got) == 200
    assert answered(live, name) == 200  # the faulty attempts never reached the provider


def test_connection_errors_are_retried_until_the_server_is_up(live) -> None:
    _, key = new_key(live)
    proxy = FaultProxy(live.url, {})
    images = load_dataset("mnist", InputShape(1, 28, 28)).get_batch(np.arange(5))
    client = ExtractionClient(proxy.url, key, backoff_s=0.05, max_backoff_s=0.2, progress=False)
    result: dict[str, object] = {}
    worker = threading.Thread(target=lambda: result.update(answers=client.query(images)))
    worker.start()
    # Nothing listens on the proxy's port yet: the client's first tries are refused.
    wait_until(lambda: client.retries >= 1, 10, what="a refused connection retried")
    with proxy.running():
        worker.join(30)
    assert len(result["answers"]) == 5 and client.retries >= 1
    client.close()


def test_a_refused_key_fails_fast_and_clearly(live, tmp_path) -> None:
    started = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "testbed",
            "attack",
            "knockoff",
            "--url",
            live.url,
            "--key",
            "mlk_stolen-or-revoked",
            "--out",
            str(tmp_path / "x"),
            "--strategy",
            "random",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "refused" in result.stderr and "401" in result.stderr
    assert time.monotonic() - started < 60
    with (
        ExtractionClient(live.url, "mlk_nope", progress=False) as client,
        pytest.raises(KeyRefused, match="401"),
    ):
        client.query(np.zeros((2, 28, 28), np.uint8))


def test_the_budget_is_never_exceeded(live) -> None:
    name, key = new_key(live)
    images = load_dataset("mnist", InputShape(1, 28, 28)).get_batch(np.arange(30))
    with ExtractionClient(live.url, key, budget=20, progress=False) as client:
        client.query(images[:15])
        with pytest.raises(BudgetExhausted, match="5 left"):
            client.query(images[10:30])  # 15 new, 5 left: refused before sending anything
        client.query(images[:15])  # all cached: free
        assert client.spent == 15
    assert answered(live, name) == 15


def test_a_label_only_api_trains_through_the_hard_label_path(live, tmp_path) -> None:
    _, key = new_key(live, granularity="label")
    config = for_attack(
        "realistic", budget=300, checkpoints=[], epochs=4, patience=None, val_fraction=0.0,
        eval_size=300, augment=False,
    )  # fmt: skip
    metrics = run_attack(config, url=live.url, keys=[key], out=tmp_path / "r", progress=False)
    assert metrics["hard_labels"] is True and metrics["victim"]["granularity"] == "label"
    assert metrics["final"]["accuracy"] > 0.4  # in-domain labels teach, even alone
    with sqlite3.connect(tmp_path / "r" / "cache.sqlite") as db:
        assert (
            db.execute("SELECT COUNT(*) FROM answers WHERE scores IS NOT NULL").fetchone()[0] == 0
        )


def test_queries_spread_over_several_keys_with_cover_traffic(live, tmp_path) -> None:
    (alice, key_a), (bob, key_b) = new_key(live), new_key(live)
    config = for_attack(
        "knockoff", strategy="random", budget=200, checkpoints=[], cover="fashion-mnist:pool",
        cover_rate=0.25, **FAST,
    )  # fmt: skip
    metrics = run_attack(
        config, url=live.url, keys=[key_a, key_b], out=tmp_path / "spread", progress=False,
        query_batch=25,
    )  # fmt: skip
    assert answered(live, alice) == answered(live, bob) == 100
    assert metrics["final"]["queries"] == 200 and metrics["final"]["train_size"] == 150


def test_adaptive_knockoff_and_jbda_run_to_their_budget(live, tmp_path) -> None:
    _, key = new_key(live)
    adaptive = for_attack(
        "knockoff", strategy="adaptive", budget=160, step=16, retrain_every=80, clusters=5,
        checkpoints=[], transfer_size=2000, **FAST,
    )  # fmt: skip
    metrics = run_attack(adaptive, url=live.url, keys=[key], out=tmp_path / "a", progress=False)
    assert [c["queries"] for c in metrics["checkpoints"]] == [80, 160]
    name_j, key_j = new_key(live)
    jbda = for_attack("jbda", budget=100, seed_size=25, **FAST)
    metrics = run_attack(jbda, url=live.url, keys=[key_j], out=tmp_path / "j", progress=False)
    assert [c["queries"] for c in metrics["checkpoints"]] == [25, 50, 100]
    assert answered(live, name_j) == 100


# ------------------------------------------------------------------ units, no server needed


def test_prediction_vectors_for_every_granularity() -> None:
    def prediction(label: int, scores: list[tuple[int, float]] | None) -> Prediction:
        return Prediction(
            query_id="q",
            label=label,
            label_name="",
            scores=None
            if scores is None
            else [ClassScore(index=i, name="", prob=p) for i, p in scores],
        )

    full = prediction_vector(prediction(1, [(1, 0.7), (0, 0.2), (2, 0.1)]), 3)
    np.testing.assert_allclose(full, [0.2, 0.7, 0.1], atol=1e-6)
    top2 = prediction_vector(prediction(1, [(1, 0.6), (0, 0.3)]), 4)
    np.testing.assert_allclose(top2, [0.3, 0.6, 0.05, 0.05], atol=1e-6)  # missing mass shared
    capped = prediction_vector(prediction(0, [(0, 0.5), (1, 0.1)]), 3)
    assert capped[2] <= capped[1]  # a hidden class never outranks a revealed one
    np.testing.assert_allclose(capped.sum(), 1.0, atol=1e-6)
    rounded = prediction_vector(prediction(0, [(0, 0.7), (1, 0.2), (2, 0.2)]), 3)
    np.testing.assert_allclose(rounded, [0.7 / 1.1, 0.2 / 1.1, 0.2 / 1.1], atol=1e-6)
    np.testing.assert_array_equal(prediction_vector(prediction(2, None), 3), [0, 0, 1])
    vanished = prediction_vector(prediction(1, [(1, 0.0), (0, 0.0), (2, 0.0)]), 3)
    np.testing.assert_array_equal(vanished, [0, 1, 0])


def test_adaptive_rewards_stay_finite_on_extreme_vectors() -> None:
    extreme = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1 / 3, 1 / 3, 1 / 3]])
    substitute = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    for reward in ("cert", "div", "loss", "all"):
        sampler = AdaptiveSampler(np.array([0, 0, 1, 1, 2, 2]), reward=reward, seed=0)
        for _ in range(3):
            values = sampler.rewards(extreme, substitute)
            assert np.all(np.isfinite(values)), reward
            sampler.update(np.array([0, 1, 2]), values)
        assert np.all(np.isfinite(sampler.bandit.preferences))
    assert np.all(np.isfinite(softmax(np.array([1000.0, -1000.0, 0.0]))))  # naive exp overflows


def test_the_bandit_learns_which_action_pays() -> None:
    bandit = GradientBandit(3, lr=0.2)
    rng = np.random.default_rng(0)
    for _ in range(500):
        action = int(rng.choice(3, p=bandit.policy))
        bandit.update(action, 1.0 if action == 2 else 0.0)
    assert bandit.policy[2] > 0.9


def test_a_rate_limited_key_is_slowed_down_not_stopped(live) -> None:
    name = f"client-{next(_names)}"
    key = live.admin.create_key(name, rate_limit=100, rate_burst=10)
    images = load_dataset("natural-crops", InputShape(1, 28, 28)).get_batch(np.arange(60))
    with ExtractionClient(
        live.url, key, budget=60, batch_size=10, concurrency=3, progress=False
    ) as client:
        got = client.query(images)
    assert len(got) == 60 and client.retries >= 1  # some batches met a 429 and waited
    assert answered(live, name) == 60


def test_a_used_up_daily_quota_stops_the_attack_clearly(live, tmp_path) -> None:
    name = f"client-{next(_names)}"
    key = live.admin.create_key(name, daily_quota=30)
    images = load_dataset("natural-crops", InputShape(1, 28, 28)).get_batch(np.arange(60))
    cache = tmp_path / "cache.sqlite"
    with (
        ExtractionClient(
            live.url, key, budget=60, batch_size=10, concurrency=1, cache_path=cache,
            progress=False,
        ) as client,
        pytest.raises(RateLimited, match="rerun the attack"),
    ):  # fmt: skip
        client.query(images)
    assert answered(live, name) == 30
    assert _cached_answers(tmp_path) == 30  # what was answered is kept for the rerun
