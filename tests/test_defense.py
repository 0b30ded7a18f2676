"""Detectors on streams where the answer is known, state stores, perturbations."""

from __future__ import annotations

import numpy as np
import pytest

from defense.detectors import Mahalanobis, MaxSoftmax, Observation, Prada
from defense.monitor import Monitor, Policy
from defense.perturb import Perturbation, reverse_sigmoid
from defense.sequential import Cusum, calibrate_cusum
from defense.state import MemoryStore, RedisStore, decode_state, encode_state
from tests.helpers import REDIS_URL


def observation(images: np.ndarray, labels: np.ndarray, classes: int = 3) -> Observation:
    probs = np.full((len(labels), classes), 0.05, dtype=np.float32)
    probs[np.arange(len(labels)), labels] = 1.0 - 0.05 * (classes - 1)
    features = np.zeros((len(labels), 4), dtype=np.float32)
    return Observation(images, np.log(probs), probs, features)


# ------------------------------------------------------------------ CUSUM


def test_cusum_accumulates_only_above_the_drift() -> None:
    cusum = Cusum(drift=1.0, threshold=5.0)
    path, alarm = cusum.run(0.0, np.array([0.0, 3.0, 3.0, 0.5, 3.0, 3.0]))
    np.testing.assert_allclose(path, [0.0, 2.0, 4.0, 3.5, 5.5, 7.5])
    assert alarm == 4  # the first sum past 5


def test_calibrated_threshold_holds_its_false_alarm_rate_and_catches_a_shift() -> None:
    rng = np.random.default_rng(0)
    benign = rng.normal(0.0, 1.0, 5000)
    cusum = calibrate_cusum(benign, false_alarm_rate=0.01, stream_length=300)
    alarms = sum(cusum.run(0.0, rng.normal(0.0, 1.0, 300))[1] is not None for _ in range(1000))
    assert alarms <= 20  # 1 % of fresh benign streams, give or take sampling noise
    _, alarm = cusum.run(0.0, rng.normal(3.0, 1.0, 300))  # an out-of-distribution client
    assert alarm is not None and alarm < 20


def test_calibration_refuses_too_little_data() -> None:
    with pytest.raises(ValueError, match="50"):
        calibrate_cusum(np.zeros(10))


# ------------------------------------------------------------------ PRADA


def test_prada_worked_example() -> None:
    """Four one-pixel queries of one class, one at a time: PRADA's rule by hand.

    q1 (0) starts the growing set: T = 0, growth distances D = [0], no distance.
    q2 (128): d = 128/255 > 0, joins; D = [0, 128]/255, mean - std = 64 - 64 = 0: T stays 0.
    q3 (255): d = 127/255 (to q2) > 0, joins; D = [0, 128, 127]/255, mean 85/255,
        std sqrt((85^2 + 43^2 + 42^2) / 3)/255 = 60.11/255: T = 24.89/255.
    q4 (64): d = 64/255 (to q1 and q2) > T, joins; D = [0, 128, 127, 64]/255, mean 79.75/255,
        std sqrt(2792.1875)/255 = 52.84/255: T = 26.91/255.
    (Without the initial 0 in D, T would be 128/255 after q2 and q3 would stay out.)
    """
    prada = Prada(delta=0.9)
    state = prada.initial_state()
    pixels = np.array([0, 128, 255, 64], dtype=np.uint8).reshape(4, 1, 1, 1)
    scores, thresholds = [], []
    for i in range(4):
        result = prada.observe(state, observation(pixels[i : i + 1], np.zeros(1, dtype=int)))
        scores.append(result.scores[0])
        thresholds.append(state["class_threshold"][0])
        assert np.isnan(result.statistic) and result.alarm_at is None  # a test needs > 100
    assert np.isnan(scores[0])
    np.testing.assert_allclose(scores[1:], np.array([128, 127, 64]) / 255, rtol=1e-15)
    expected = [0.0, 0.0, 85 - np.sqrt(10838 / 3), 79.75 - np.sqrt(2792.1875)]
    np.testing.assert_allclose(thresholds, np.array(expected) / 255, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(state["rows_0"], pixels.reshape(4, 1))
    np.testing.assert_allclose(state["distances"], np.array([128, 127, 64]) / 255, rtol=1e-15)


def jbda_like(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A few seeds, each followed by small steps away from itself, as JBDA's rounds are."""
    seeds = rng.integers(0, 256, (30, 8, 8, 1)).astype(np.int16)
    steps = rng.choice([-3, 3], (10, 30, 8, 8, 1))
    synthetic = np.clip(seeds[None] + np.cumsum(steps, axis=0), 0, 255).astype(np.uint8)
    return synthetic.reshape(-1, 8, 8, 1), np.tile(np.arange(30) % 3, 10)


def test_prada_flags_synthetic_near_duplicates_but_not_natural_spread() -> None:
    rng = np.random.default_rng(0)
    natural = rng.integers(0, 256, (300, 8, 8, 1), dtype=np.uint8)
    labels = rng.integers(0, 3, 300)
    prada = Prada(delta=0.95)
    benign = prada.observe(prada.initial_state(), observation(natural, labels))
    assert benign.alarm_at is None and benign.statistic > 0.95
    attack = prada.observe(prada.initial_state(), observation(*jbda_like(rng)))
    assert attack.alarm_at is not None and attack.statistic < 0.95


def test_prada_in_one_batch_or_query_by_query_decides_the_same() -> None:
    images, labels = jbda_like(np.random.default_rng(1))
    prada = Prada(delta=0.95)
    whole = prada.observe(prada.initial_state(), observation(images, labels))
    state = prada.initial_state()
    singles = [
        prada.observe(state, observation(images[i : i + 1], labels[i : i + 1]))
        for i in range(len(images))
    ]
    np.testing.assert_array_equal(np.concatenate([r.scores for r in singles]), whole.scores)
    first_single = next(i for i, r in enumerate(singles) if r.alarm_at is not None)
    assert whole.alarm_at == first_single
    assert whole.statistic == singles[-1].statistic


def test_state_survives_encoding() -> None:
    prada = Prada()
    state = prada.initial_state()
    rng = np.random.default_rng(2)
    prada.observe(
        state,
        observation(rng.integers(0, 256, (20, 4, 4, 1), dtype=np.uint8), rng.integers(0, 3, 20)),
    )
    restored = decode_state(encode_state(state))
    assert set(restored) == set(state)
    for name in state:
        np.testing.assert_array_equal(restored[name], state[name])


# ------------------------------------------------------------------ monitor and stores


def stream(seed: int = 0) -> list[Observation]:
    rng = np.random.default_rng(seed)
    batches = []
    for size in (7, 30, 1, 64, 20):
        labels = rng.integers(0, 3, size)
        probs = rng.dirichlet(np.ones(3) * 0.3, size).astype(np.float32)
        probs[np.arange(size), labels] += 1.0
        probs /= probs.sum(1, keepdims=True)
        images = rng.integers(0, 256, (size, 5, 5, 1), dtype=np.uint8)
        batches.append(Observation(images, np.log(probs), probs, np.zeros((size, 2), np.float32)))
    return batches


def detectors():
    return [Prada(delta=0.97), MaxSoftmax(Cusum(drift=0.1, threshold=2.0))]


def replay(monitor: Monitor, client: str) -> list[tuple]:
    out = []
    for batch in stream():
        verdict = monitor.observe(client, batch)
        out.append(
            (
                verdict.scores,
                [(a.detector, a.query_count, round(a.score, 9)) for a in verdict.alerts],
                verdict.status.queries,
                verdict.status.flagged,
            )
        )
    return out


@pytest.fixture
def redis_store(redis_prefix: str):
    return lambda: RedisStore(REDIS_URL, prefix=redis_prefix)


def test_memory_and_redis_stores_give_the_same_decisions(redis_store) -> None:
    in_memory = replay(Monitor(detectors(), MemoryStore()), "mallory")
    in_redis = replay(Monitor(detectors(), redis_store()), "mallory")
    assert in_memory == in_redis
    assert any(alerts for _, alerts, _, _ in in_memory)  # the stream does alarm


def test_redis_state_outlives_the_server_process(redis_store) -> None:
    first = Monitor(detectors(), redis_store())
    batches = stream()
    for batch in batches[:3]:
        first.observe("eve", batch)
    first.store.close()
    restarted = Monitor(detectors(), redis_store())  # a new process, the same Redis
    assert restarted.status("eve").queries == sum(len(b) for b in batches[:3])
    assert restarted.clients() == ["eve"]
    continued = [restarted.observe("eve", b) for b in batches[3:]]
    reference = replay(Monitor(detectors(), MemoryStore()), "eve")
    assert [v.status.queries for v in continued] == [r[2] for r in reference[3:]]
    assert [v.scores for v in continued] == [r[0] for r in reference[3:]]


def test_per_query_statistics_are_the_cusum_path_and_cross_at_the_alert() -> None:
    """What the query log keeps for the dashboard: after each query, the CUSUM recursion
    S = max(0, S + min(score, cap) - drift) over the MSP scores, numbered from 1 across
    batches, first past the threshold exactly at the alert's query; PRADA's W only after
    queries whose test had one (a test after every tenth), None elsewhere."""
    cusum = Cusum(drift=0.1, threshold=2.0, cap=0.6)
    monitor = Monitor([MaxSoftmax(cusum), Prada(delta=0.97)], MemoryStore())
    verdicts = [monitor.observe("mallory", batch) for batch in stream()]
    rows = [row for v in verdicts for row in v.statistics]
    scores = [row["msp"] for v in verdicts for row in v.scores]
    expected, total = [], 0.0
    for score in scores:
        total = max(0.0, total + min(score, 0.6) - 0.1)
        expected.append(total)
    assert [row["query"] for row in rows] == list(range(1, len(scores) + 1))
    assert [row["msp"] for row in rows] == pytest.approx(expected, rel=1e-12, abs=1e-12)
    tested = [row["query"] for row in rows if row["prada"] is not None]
    assert tested and all((query - 1) % 10 == 0 for query in tested)
    assert rows[tested[-1] - 1]["prada"] == monitor.status("mallory").statistics["prada"]
    assert set(rows[0]) == {"query", "msp", "prada"}  # no account: no account: entries
    (alert,) = [a for v in verdicts for a in v.alerts if a.detector == "msp"]
    crossed = next(i for i, value in enumerate(expected) if value > 2.0)
    assert alert.query_count == rows[crossed]["query"] == crossed + 1
    assert alert.threshold == monitor.detectors[0].threshold == 2.0
    assert monitor.detectors[0].direction == "above" and monitor.detectors[1].direction == "below"
    assert monitor.detectors[1].threshold == 0.97


def test_clients_are_scored_apart() -> None:
    monitor = Monitor(detectors(), MemoryStore(), Policy.block)
    batches = stream()
    monitor.observe("alice", batches[0])
    monitor.observe("bob", batches[1])
    assert monitor.status("alice").queries == len(batches[0])
    assert monitor.status("bob").queries == len(batches[1])
    assert monitor.status("carol").queries == 0 and not monitor.status("carol").flagged


# ------------------------------------------------------------------ perturbations


def test_reverse_sigmoid_matches_its_formula() -> None:
    y = np.array([[0.7, 0.2, 0.1]])
    beta, gamma = 0.7, 0.4
    logit = np.log(y / (1 - y))
    expected = y - beta * (1 / (1 + np.exp(-gamma * logit)) - 0.5)
    expected = np.clip(expected, 0, None)
    expected /= expected.sum()
    got = reverse_sigmoid(y.astype(np.float32), beta, gamma)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert got.argmax() == 0 and not np.allclose(got, y, atol=0.01)


def test_perturbations_keep_valid_vectors() -> None:
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(10), 100).astype(np.float32)
    for spec in ("reverse-sigmoid:0.7:0.4", "noise:0.05", "none"):
        out = Perturbation.parse(spec).apply(probs, rng)
        assert out.shape == probs.shape and np.all(out >= 0)
        np.testing.assert_allclose(out.sum(1), 1.0, atol=1e-5)
    noisy = Perturbation.parse("noise:0.05").apply(probs, rng)
    assert not np.allclose(noisy, probs)


@pytest.mark.parametrize("spec", ["reverse-sigmoid:0.7", "noise:-1", "noise:x", "blur:2"])
def test_bad_perturbation_specs(spec: str) -> None:
    with pytest.raises(ValueError, match="perturbation"):
        Perturbation.parse(spec)


def test_mahalanobis_fit_and_distance_match_the_definition() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, 600)
    centres = rng.normal(0, 5, (3, 4))
    features = centres[labels] + rng.normal(0, 1, (600, 4))
    means, precision = Mahalanobis.fit(features, labels)
    np.testing.assert_allclose(means, [features[labels == c].mean(0) for c in range(3)])
    queries = rng.normal(0, 5, (7, 4))
    direct = [min(float((q - m) @ precision @ (q - m)) for m in means) ** 0.5 for q in queries]
    np.testing.assert_allclose(Mahalanobis.distances(queries, means, precision), direct)
    near, far = Mahalanobis.distances(np.vstack([means[0], means[0] + 40]), means, precision)
    assert near < 0.1 < far
