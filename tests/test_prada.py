"""PRADA against a plain transcription of the published algorithm.

``Transcription`` follows Juuti et al. (PRADA, EuroS&P 2019) as the authors' reference
implementation behaves (src/growing_set.py in
SSGAalto/prada-protecting-against-dnn-model-stealing-attacks), one query at a time, with lists
and loops: a class's first query starts its growing set with threshold 0 and growth distances
[0]; every later query's minimum L2 distance to its class's set is recorded, and joins the set
(and the growth distances, threshold = max(threshold, mean - std)) when above the threshold;
after the queries at 0-based indices 0, 10, 20... the distances of the classes that have 10
or more are pooled, those 3 std or more from the mean dropped, and with more than 100 left
their Shapiro-Wilk W < delta flags the client.

``Prada`` must agree with it exactly, fed one query at a time or in batches of any size: the
same distances, growing sets, thresholds (to rounding: Prada keeps a running sum), W at every
test and the same first alarm. With caps the transcription applies them plainly (a list that
drops its oldest member; the last ``window`` distances).
"""

from __future__ import annotations

import warnings
from functools import cache

import numpy as np
import pytest
from scipy import stats
from threadpoolctl import threadpool_limits

from defense.detectors import Observation, Prada
from defense.state import decode_state, encode_state

CLASSES = 10
SHAPE = (28, 28, 1)
ROW_BYTES = 28 * 28


def observation(images: np.ndarray, labels: np.ndarray) -> Observation:
    probs = np.full((len(labels), CLASSES), 0.01, dtype=np.float32)
    probs[np.arange(len(labels)), labels] = 0.91
    features = np.zeros((len(labels), 1), dtype=np.float32)
    return Observation(images, np.log(probs), probs, features)


@pytest.fixture(autouse=True, scope="module")
def single_threaded_blas():
    """As the server runs its detectors: small products, where BLAS threads only contend."""
    with threadpool_limits(1, user_api="blas"):
        yield


# ------------------------------------------------------------------ the transcription


def l2(image: np.ndarray, members: list[np.ndarray]) -> np.ndarray:
    """L2 distances of a uint8 image to each of ``members``, pixels scaled to [0, 1]; from the
    integer differences (exact; the float formula agrees to ~1e-15)."""
    differences = np.stack(members).astype(np.int64) - image.astype(np.int64)
    return np.sqrt((differences**2).reshape(len(members), -1).sum(axis=1)) / 255.0


class Transcription:
    def __init__(self, delta: float, rows: int | None = None, window: int | None = None):
        self.delta, self.rows, self.window = delta, rows, window
        self.growing_sets: dict[int, list[np.ndarray]] = {}
        self.members: dict[int, list[int]] = {}  # the query indices of the growing sets' images
        self.growth: dict[int, list[float]] = {}
        self.thresholds: dict[int, float] = {}
        self.recorded: list[tuple[int, float]] = []  # (class, distance), oldest first
        self.class_order: list[int] = []  # classes in the order of their first distance
        self.processed = 0
        self.attacker = 0
        self.w = float("nan")
        self.tests: dict[int, float] = {}  # query index -> W, for the tests that had one

    def query(self, image: np.ndarray, label: int) -> float:
        distance = float("nan")
        if label not in self.growing_sets:
            self.growing_sets[label] = [image]
            self.members[label] = [self.processed]
            self.thresholds[label] = 0.0
            self.growth[label] = [0.0]
        else:
            distance = float(np.min(l2(image, self.growing_sets[label])))
            self.recorded.append((label, distance))
            if label not in self.class_order:
                self.class_order.append(label)
            if distance > self.thresholds[label]:
                self.growing_sets[label].append(image)
                self.members[label].append(self.processed)
                if self.rows is not None and len(self.growing_sets[label]) > self.rows:
                    self.growing_sets[label].pop(0)
                    self.members[label].pop(0)
                self.growth[label].append(distance)
                growth = np.array(self.growth[label])
                candidate = growth.mean() - growth.std()
                self.thresholds[label] = max(self.thresholds[label], candidate)
        if self.processed % 10 == 0:
            self.test()
        self.processed += 1
        return distance

    def test(self) -> None:
        recent = self.recorded if self.window is None else self.recorded[-self.window :]
        pooled = []
        for label in self.class_order:
            mine = [d for c, d in recent if c == label]
            if len(mine) >= 10:
                pooled.extend(mine)
        pooled = np.array(pooled)
        if len(pooled) == 0:
            return
        kept = pooled[np.abs(pooled - np.mean(pooled)) < 3 * np.std(pooled)]
        if len(kept) > 100:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.w = float(stats.shapiro(kept).statistic)
            self.tests[self.processed] = self.w
            self.attacker = 1 if self.w < self.delta else 0


@cache
def reference_run(stream: str, delta: float, rows: int | None, window: int | None):
    """The transcription over a stream: per query its distance and a snapshot after it."""
    images, labels = STREAMS[stream]()
    transcription = Transcription(delta, rows, window)
    distances, snapshots, first_alarm = [], [], None
    for index, (image, label) in enumerate(zip(images, labels.tolist(), strict=True)):
        distances.append(transcription.query(image, label))
        if first_alarm is None and transcription.attacker:
            first_alarm = index
        snapshots.append(
            (
                dict(transcription.thresholds),
                {c: list(s) for c, s in transcription.members.items()},
                transcription.w,
                transcription.attacker,
            )
        )
    return np.array(distances), snapshots, transcription.tests, first_alarm, transcription


# ------------------------------------------------------------------ streams


def smooth(rng: np.random.Generator, count: int) -> np.ndarray:
    """Natural-ish images: a 7x7 random pattern blown up to 28x28, plus pixel noise."""
    low = rng.integers(0, 256, (count, 7, 7)).astype(np.float64)
    big = np.kron(low, np.ones((4, 4))) + rng.normal(0, 20, (count, 28, 28))
    return np.clip(big, 0, 255).astype(np.uint8)[..., None]


def natural(count: int = 1500) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(10)
    return smooth(rng, count), rng.integers(0, CLASSES, count)


def jbda(count: int = 1500, seeds: int = 150, step: int = 25) -> tuple[np.ndarray, np.ndarray]:
    """JBDA-like: seed images, then rounds of every one moved +-step on every pixel."""
    rng = np.random.default_rng(11)
    current = smooth(rng, seeds).astype(np.int16)
    labels = rng.integers(0, CLASSES, seeds)
    rounds = [current]
    while len(rounds) * seeds < count:
        current = np.clip(current + step * rng.choice([-1, 1], current.shape), 0, 255)
        rounds.append(current)
    return np.concatenate(rounds)[:count].astype(np.uint8), np.tile(labels, len(rounds))[:count]


def near_duplicates(count: int = 1500, bases: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """A few images sent again and again: 1 in 10 exactly, else with 5 pixels nudged by <= 3."""
    rng = np.random.default_rng(12)
    base = smooth(rng, bases).reshape(bases, -1).astype(np.int16)
    labels = rng.integers(0, CLASSES, bases)
    which = rng.integers(0, bases, count)
    images = base[which]
    for i in np.flatnonzero(rng.random(count) >= 0.1):
        images[i, rng.integers(0, images.shape[1], 5)] += rng.integers(-3, 4, 5)
    images = np.clip(images, 0, 255).astype(np.uint8).reshape(count, *SHAPE)
    return images, labels[which]


def benign(count: int = 1500) -> tuple[np.ndarray, np.ndarray]:
    """One prototype per class, shifted, brightened or darkened and noisy."""
    rng = np.random.default_rng(13)
    prototypes = smooth(rng, CLASSES).astype(np.float64)
    labels = rng.integers(0, CLASSES, count)
    images = np.empty((count, *SHAPE), dtype=np.uint8)
    for i, label in enumerate(labels):
        image = np.roll(prototypes[label], rng.integers(-3, 4, 2), axis=(0, 1))
        image = image * rng.uniform(0.7, 1.3) + rng.normal(0, 25, image.shape)
        images[i] = np.clip(image, 0, 255)
    return images, labels


STREAMS = {
    "natural": cache(natural),
    "jbda": cache(jbda),
    "near-duplicates": cache(near_duplicates),
    "benign": cache(benign),
}
BATCHES = (1, 7, 64, 256, 3, 100)


def batches(count: int, sizes: tuple[int, ...]) -> list[slice]:
    out, start, i = [], 0, 0
    while start < count:
        out.append(slice(start, min(start + sizes[i % len(sizes)], count)))
        start, i = out[-1].stop, i + 1
    return out


# ------------------------------------------------------------------ agreement


def check_against_transcription(
    stream: str, sizes: tuple[int, ...], delta: float, rows: int | None, window: int | None
) -> tuple[Prada, dict]:
    images, labels = STREAMS[stream]()
    distances, snapshots, tests, first_alarm, _ = reference_run(stream, delta, rows, window)
    budget = 4 * 2**20 if rows is None else rows * ROW_BYTES * CLASSES
    prada = Prada(delta=delta, growing_set_bytes=budget, distance_window=window or 5000)
    state = prada.initial_state()
    alarms = []
    for part in batches(len(labels), sizes):
        result = prada.observe(state, observation(images[part], labels[part]))
        last = part.stop - 1
        thresholds, sets, w, attacker = snapshots[last]
        assert np.array_equal(result.scores, distances[part], equal_nan=True), part
        expected = [thresholds.get(label, 0.0) for label in range(CLASSES)]
        np.testing.assert_allclose(state["class_threshold"], expected, rtol=1e-12, atol=0)
        for label in np.unique(labels[part]).tolist():  # the growing sets it changed
            assert len(state[f"rows_{label}"]) == len(sets[label]), (part, label)
            if part.stop - part.start > 1 or part.stop % 20 == 0 or part.stop == len(labels):
                expected = images[sets[label]].reshape(-1, ROW_BYTES)
                assert np.array_equal(state[f"rows_{label}"], expected), (part, label)
        assert result.statistic == w or (np.isnan(result.statistic) and np.isnan(w))
        assert bool(state["present"]) == bool(attacker)
        if len(range(part.start, part.stop)) == 1 and last in tests:
            assert result.statistic == tests[last]  # W at every test, query by query
        # The path: W after the queries whose test was evaluated, each test's W; before the
        # alarm, every test that had one.
        taken = part.start + np.flatnonzero(~np.isnan(result.path))
        assert [result.path[i - part.start] for i in taken] == [tests[i] for i in taken]
        if not alarms:  # up to the alarm, if this batch raised it
            upto = part.stop if result.alarm_at is None else part.start + result.alarm_at + 1
            expected = [i for i in range(part.start, upto) if i in tests]
            assert [i for i in taken.tolist() if i < upto] == expected
        if result.alarm_at is not None:
            alarms.append(part.start + result.alarm_at)
    assert alarms == ([] if first_alarm is None else [first_alarm])
    recorded = distances[~np.isnan(distances)]
    np.testing.assert_array_equal(state["distances"], recorded[-prada.distance_window :])
    return prada, state


@pytest.mark.parametrize("sizes", [(1,), BATCHES], ids=["one-by-one", "batches"])
@pytest.mark.parametrize("stream", list(STREAMS))
def test_prada_is_the_published_algorithm(stream: str, sizes: tuple[int, ...]) -> None:
    prada, state = check_against_transcription(stream, sizes, 0.95, None, None)
    capacity = prada.rows_per_class(ROW_BYTES, CLASSES)
    assert all(len(state.get(f"rows_{c}", ())) < capacity for c in range(CLASSES))  # uncapped


def test_the_streams_cover_alarms_and_their_absence() -> None:
    """The agreement above covers both outcomes, and alarms inside batches, not at their ends."""
    first = {s: reference_run(s, 0.95, None, None)[3] for s in STREAMS}
    assert first["natural"] is None
    alarmed = [a for a in first.values() if a is not None]
    assert len(alarmed) >= 2
    ends = {part.stop - 1 for part in batches(1500, BATCHES)}
    assert any(a not in ends for a in alarmed)
    tests = reference_run("jbda", 0.95, None, None)[2]
    assert min(tests) >= 110 and all(index % 10 == 0 for index in tests)


@pytest.mark.parametrize("sizes", [(1,), BATCHES], ids=["one-by-one", "batches"])
@pytest.mark.parametrize("stream", ["natural", "jbda"])
def test_capped_prada_is_the_transcription_with_caps(stream: str, sizes: tuple[int, ...]) -> None:
    """Small caps, hit early: eviction and the window behave as the plain rules say."""
    _, state = check_against_transcription(stream, sizes, 0.95, 12, 300)
    assert all(len(state[f"rows_{c}"]) == 12 for c in range(CLASSES))
    assert len(state["distances"]) == 300


def test_threshold_is_mean_less_std_of_the_growth_list_with_its_zero() -> None:
    """The running sums give what numpy gives on the list, the initial 0 included."""
    prada = Prada()
    state = prada.initial_state()
    images, labels = STREAMS["natural"]()
    prada.observe(state, observation(images, labels))
    transcription = reference_run("natural", 0.95, None, None)[4]
    for label, growth in transcription.growth.items():
        count, total, squares = state["growth"][label]
        assert count == len(growth) and growth[0] == 0.0
        np.testing.assert_allclose([total, squares], [sum(growth), sum(g * g for g in growth)])
        np.testing.assert_allclose(
            state["class_threshold"][label], transcription.thresholds[label], rtol=1e-12
        )
        # The threshold with the initial 0 is below the one without it.
        without = np.mean(growth[1:]) - np.std(growth[1:])
        assert state["class_threshold"][label] < without


# ------------------------------------------------------------------ bounded state


def test_state_stays_under_its_budget() -> None:
    rng = np.random.default_rng(20)
    budget, window = 64 * 1024, 1000
    prada = Prada(growing_set_bytes=budget, distance_window=window)
    capacity = prada.rows_per_class(ROW_BYTES, CLASSES)
    state = prada.initial_state()
    sizes = []
    for _ in range(20):
        images = rng.integers(0, 256, (500, *SHAPE), dtype=np.uint8)
        prada.observe(state, observation(images, rng.integers(0, CLASSES, 500)))
        sizes.append(Prada.state_bytes(state))
    assert all(len(state[f"rows_{c}"]) == capacity for c in range(CLASSES))
    assert len(state["distances"]) == window and int(state["queries"]) == 10_000
    # rows (the budget), their norms, the window's distances and classes, a few scalars
    bound = capacity * CLASSES * (ROW_BYTES + 8) + window * (8 + 4) + 1024
    assert capacity * CLASSES * ROW_BYTES <= budget
    assert max(sizes) <= bound
    assert sizes[-1] == sizes[10]  # flat once full


def test_the_default_budget_is_4_mib_of_rows() -> None:
    prada = Prada()
    assert prada.rows_per_class(ROW_BYTES, CLASSES) == 4 * 2**20 // (ROW_BYTES * CLASSES) == 534
    assert prada.rows_per_class(10**7, 1000) == 1  # never less than one


def test_eviction_still_catches_jbda_and_spares_natural_queries() -> None:
    """20 rows a class, fewer than the busiest classes' lineages of JBDA seeds (22, 23): those
    classes evict all along, yet PRADA alarms at the same query as without a cap. (With fewer
    rows than a class's lineages every query is far from what is left, and PRADA goes blind:
    bench/prada_bound.py measures it.)"""
    images, labels = STREAMS["jbda"]()
    first_alarm = reference_run("jbda", 0.95, None, None)[3]
    capped = Prada(delta=0.95, growing_set_bytes=20 * ROW_BYTES * CLASSES, distance_window=300)
    state = capped.initial_state()
    alarms = []
    for part in batches(len(labels), BATCHES):
        alarm = capped.observe(state, observation(images[part], labels[part])).alarm_at
        alarms += [] if alarm is None else [part.start + alarm]
    assert alarms == [first_alarm]
    evicting = [c for c in range(CLASSES) if state["growth"][c, 0] - 1 > 20]
    assert len(evicting) >= 2 and all(len(state[f"rows_{c}"]) == 20 for c in evicting)
    images, labels = STREAMS["natural"]()
    state = capped.initial_state()
    assert capped.observe(state, observation(images, labels)).alarm_at is None
    assert all(len(state[f"rows_{c}"]) == 20 for c in range(CLASSES))


def test_state_round_trips_through_the_store_encoding() -> None:
    images, labels = STREAMS["jbda"]()
    prada = Prada(delta=0.95, growing_set_bytes=20 * ROW_BYTES * CLASSES)
    state = prada.initial_state()
    prada.observe(state, observation(images[:700], labels[:700]))
    restored = decode_state(encode_state(state))
    assert set(restored) == set(state)
    for name, value in state.items():
        assert restored[name].dtype == value.dtype
        np.testing.assert_array_equal(restored[name], value)
    assert restored["rows_0"].dtype == np.uint8
    here = prada.observe(state, observation(images[700:], labels[700:]))
    there = prada.observe(restored, observation(images[700:], labels[700:]))
    np.testing.assert_array_equal(here.scores, there.scores)
    assert (here.statistic, here.alarm_at) == (there.statistic, there.alarm_at)


def test_a_state_from_the_unbounded_prada_starts_afresh() -> None:
    images, labels = STREAMS["natural"]()
    prada = Prada()
    old = {"class_threshold": np.ones(3), "distances": np.ones(500), "alarmed": np.array(True)}
    fresh = prada.initial_state()
    got = prada.observe(old, observation(images[:50], labels[:50]))
    expected = prada.observe(fresh, observation(images[:50], labels[:50]))
    np.testing.assert_array_equal(got.scores, expected.scores)
    assert set(old) == set(fresh)


def test_prada_refuses_what_it_cannot_measure() -> None:
    floats = observation(np.zeros((2, *SHAPE)), np.zeros(2, dtype=int))
    with pytest.raises(ValueError, match="uint8"):
        Prada().observe(Prada().initial_state(), floats)
    with pytest.raises(ValueError, match="window"):
        Prada(distance_window=100)
