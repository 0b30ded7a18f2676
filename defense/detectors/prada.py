"""PRADA (Juuti et al.): per predicted class, a growing set of the client's queries and each
new query's minimum L2 distance to it; a Shapiro-Wilk test of those distances."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
from scipy import stats

from defense.detectors.base import Detector, DetectorResult, Observation
from defense.state import State

# A float32 dot product of D non-negative terms, each exact (pixel products are integers below
# 2**24), is off by at most gamma_D = D u / (1 - D u) of its value, u = 2**-24, whatever the
# order of summation (Higham, "Accuracy and Stability of Numerical Algorithms", ch. 3).
_FLOAT32_UNIT = 2.0**-24
_REFINE_CHUNK = 2048  # candidate pairs measured exactly at a time
_CLASS_CHUNK = 1024  # a class's queries of one batch taken this many at a time


class Prada(Detector):
    """PRADA (Juuti et al., EuroS&P 2019) as the authors' reference implementation runs it
    (``src/growing_set.py`` in SSGAalto/prada-protecting-against-dnn-model-stealing-attacks),
    with each client's state bounded.

    For each query x, in order, with c the class the victim predicts for it:

    * c's first query starts c's growing set G_c; c's threshold T_c is 0 and its list of growth
      distances D_c is [0]. No distance is recorded for it.
    * Any later one: d = min L2 distance from x to G_c (pixels scaled to [0, 1]) is recorded;
      if d > T_c, x joins G_c, d joins D_c and T_c = max(T_c, mean(D_c) - std(D_c)) (population
      std). D_c is kept as its count, sum and sum of squares, so T_c costs O(1).
    * After the queries whose 0-based index is a multiple of 10 (the 1st, 11th, 21st...): a
      test. The recorded distances of every class with at least 10 of them are pooled, those
      3 standard deviations or more from the pool's mean dropped; if more than 100 remain,
      their Shapiro-Wilk W is the statistic and the attacker flag is W < delta. A test with
      too few distances leaves W and the flag as they were.

    Distances are computed from the integer pixel differences, sqrt(sum (a - b)^2) / 255:
    exact to the last bit, so ties between distances are real ties.

    The reference keeps every member and every distance, so a client's state, and the time
    each of its queries takes, grow without bound. Two caps bound them; while a client is
    under both, the behaviour is the reference's exactly.

    * ``growing_set_bytes`` (4 MiB by default), split evenly over the classes, caps each
      class's growing set at ``growing_set_bytes // (row_bytes * classes)`` rows (at least
      one); rows are kept as the uint8 input (the model's input is uint8, so nothing is lost).
      When a full class gains a member, its oldest member leaves (first in, first out). The
      growing set is there to say how far a client's new queries are from what it sent before;
      the recent members are the ones a client's next queries come near (synthetic attacks
      such as JBDA grow each round out of the last), and dropping by age needs no more state
      and cannot depend on how the client batched its queries. Its cost: a query close only to
      a member dropped long ago is measured farther than the reference would measure it.
      T_c, being a running maximum over D_c's summary, is unaffected by eviction.
    * ``distance_window`` (5,000 by default): the test pools the most recent recorded
      distances only, each kept with its class (so "at least 10 per class" counts within the
      window). A client is judged on its latest queries, so a long benign history cannot
      dilute an attack started later; and SciPy's Shapiro-Wilk warns beyond 5,000 points.

    ``statistic`` is W at the latest test that had one (NaN before); ``alarm_at`` the query of
    the batch whose test first gave W < delta, once per client. Before the alarm every test in
    a batch is evaluated (to find that query); after it, only the batch's last. ``path`` holds
    W after the queries whose test was evaluated and had one, NaN after the others.
    """

    name = "prada"
    direction = "below"
    TEST_EVERY = 10  # a test after every query whose 0-based index is a multiple of this
    CLASS_MINIMUM = 10  # a class's distances join the test once it has this many
    TEST_MINIMUM = 100  # a test needs more than this many distances, after outliers
    OUTLIER_STDS = 3.0

    def __init__(
        self,
        delta: float = 0.95,
        *,
        growing_set_bytes: int = 4 * 2**20,
        distance_window: int = 5000,
    ) -> None:
        if not 0 < delta < 1:
            raise ValueError("PRADA's delta is a Shapiro-Wilk statistic, in (0, 1)")
        if growing_set_bytes < 1:
            raise ValueError("PRADA's growing_set_bytes must be positive")
        if distance_window <= self.TEST_MINIMUM:
            raise ValueError(
                f"PRADA's distance_window must exceed {self.TEST_MINIMUM}, or it never tests"
            )
        self.delta = delta
        self.growing_set_bytes = int(growing_set_bytes)
        self.distance_window = int(distance_window)

    @property
    def threshold(self) -> float:
        return self.delta

    def rows_per_class(self, row_bytes: int, classes: int) -> int:
        """Each class's growing-set cap, in rows of ``row_bytes`` (uint8 pixels per input)."""
        return max(1, self.growing_set_bytes // (row_bytes * classes))

    @staticmethod
    def state_bytes(state: State) -> int:
        """The state's size: its arrays' bytes (the .npz Redis holds adds ~250 per array)."""
        return sum(int(np.asarray(value).nbytes) for value in state.values())

    def initial_state(self) -> State:
        # Per class c, once it has a query: "rows_c", its growing set (uint8, oldest first) and
        # "norms_c", their squared norms in integer pixel units (float64, exact).
        return {
            "queries": np.zeros((), dtype=np.int64),  # the client's queries so far
            "statistic": np.array(np.nan),  # W at the latest test that had one
            "present": np.zeros((), dtype=bool),  # the reference's attacker flag
            "alarmed": np.zeros((), dtype=bool),  # the alarm was reported
            "class_threshold": np.zeros(0, dtype=np.float64),
            "growth": np.zeros((0, 3), dtype=np.float64),  # per class: D_c's count, sum, squares
            "class_rank": np.zeros(0, dtype=np.int64),  # order of the classes' first distances
            "distances": np.zeros(0, dtype=np.float64),  # the window, oldest first
            "distance_classes": np.zeros(0, dtype=np.int32),
        }

    def observe(self, state: State, batch: Observation) -> DetectorResult:
        images = np.asarray(batch.images)
        if images.dtype != np.uint8:
            raise ValueError(f"PRADA measures uint8 inputs, not {images.dtype}")
        if "queries" not in state:  # saved by the earlier, unbounded PRADA: start afresh
            state.clear()
            state.update(self.initial_state())
        count = len(batch)
        if count == 0:
            empty = np.zeros(0)
            return DetectorResult(empty, float(state["statistic"]), None, empty)
        x = images.reshape(count, -1)
        labels = batch.probs.argmax(axis=1)
        self._fit_classes(state, batch.probs.shape[1])
        capacity = self.rows_per_class(x.shape[1], batch.probs.shape[1])
        scores = np.full(count, np.nan)
        for label in np.unique(labels).tolist():
            mine = np.flatnonzero(labels == label)
            for start in range(0, len(mine), _CLASS_CHUNK):  # bounds the within-batch matrix
                part = mine[start : start + _CLASS_CHUNK]
                scores[part] = self._grow(state, label, x[part], capacity)

        recorded = np.flatnonzero(~np.isnan(scores))
        owners = labels[recorded].astype(np.int32)
        rank = state["class_rank"]
        seen, first = np.unique(owners, return_index=True)
        for label in seen[np.argsort(first)].tolist():
            if rank[label] < 0:
                rank[label] = rank.max() + 1
        before = len(state["distances"])
        distances = np.concatenate([state["distances"], scores[recorded]])
        owners = np.concatenate([state["distance_classes"], owners])
        path = np.full(count, np.nan)
        alarm = self._run_tests(state, distances, owners, before, recorded, path)
        state["distances"] = distances[-self.distance_window :]
        state["distance_classes"] = owners[-self.distance_window :]
        state["queries"] = np.array(int(state["queries"]) + count, dtype=np.int64)
        return DetectorResult(scores, float(state["statistic"]), alarm, path)

    @staticmethod
    def _fit_classes(state: State, classes: int) -> None:
        """Per-class arrays long enough for ``classes``, and writable (decoded ones may not be)."""
        known = len(state["class_threshold"])
        grow = max(0, classes - known)
        state["class_threshold"] = np.concatenate([state["class_threshold"], np.zeros(grow)])
        state["growth"] = np.vstack([state["growth"], np.zeros((grow, 3))])
        state["class_rank"] = np.concatenate(
            [state["class_rank"], np.full(grow, -1, dtype=np.int64)]
        )

    def _grow(self, state: State, label: int, x: np.ndarray, capacity: int) -> np.ndarray:
        """Class ``label``'s queries of the batch, in order: their distances (NaN for the
        class's first query), growing set and threshold."""
        rows = state.get(f"rows_{label}", np.zeros((0, x.shape[1]), dtype=np.uint8))
        norms = state.get(f"norms_{label}", np.zeros(0))
        stored = len(rows)
        wide = x.astype(np.float64)
        x_norms = np.einsum("ij,ij->i", wide, wide)  # integers below 2**53: exact
        if stored:
            nearest, youngest = self._nearest(x, x_norms, rows, norms)
        # Squared distances between the batch's queries, exact for the same reason.
        within = x_norms[:, None] + x_norms[None, :] - 2.0 * (wide @ wide.T)
        threshold = float(state["class_threshold"][label])
        count, total, squares = state["growth"][label].tolist()
        added: list[int] = []
        out = np.full(len(x), np.nan)
        for j in range(len(x)):
            if stored == 0 and not added:  # the class's first query starts its growing set
                added.append(j)
                threshold, count, total, squares = 0.0, 1.0, 0.0, 0.0
                continue
            gone = max(0, stored + len(added) - capacity)  # stored members evicted by now
            squared = np.inf
            if gone < stored:
                if youngest[j] >= gone:  # its nearest member is still there
                    squared = nearest[j]
                else:
                    one = slice(j, j + 1)
                    squared = self._nearest(x[one], x_norms[one], rows[gone:], norms[gone:])[0][0]
            if added:
                squared = min(squared, within[j, added[-capacity:]].min())
            distance = float(np.sqrt(squared)) / 255.0
            out[j] = distance
            if distance > threshold:
                added.append(j)
                count, total, squares = count + 1.0, total + distance, squares + distance**2
                mean = total / count
                spread = np.sqrt(max(squares / count - mean * mean, 0.0))
                threshold = max(threshold, mean - float(spread))
        state["class_threshold"][label] = threshold
        state["growth"][label] = (count, total, squares)
        if added:
            state[f"rows_{label}"] = np.concatenate([rows, x[added]])[-capacity:]
            state[f"norms_{label}"] = np.concatenate([norms, x_norms[added]])[-capacity:]
        return out

    @staticmethod
    def _nearest(
        x: np.ndarray, x_norms: np.ndarray, rows: np.ndarray, norms: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each query's exact squared distance (integer pixel units) to its nearest row, and
        that row's index (the latest of several equally near).

        A float32 product ranks the rows (fast); every row that its rounding bound cannot rule
        out is then measured exactly, in integers. When too many are left (near-duplicates), a
        float64 product, exact on integer pixels, measures them all.
        """
        dots = (x.astype(np.float32) @ rows.astype(np.float32).T).astype(np.float64)
        estimate = norms[None, :] - 2.0 * dots  # the squared distance less |x|^2
        gamma = x.shape[1] * _FLOAT32_UNIT / (1.0 - x.shape[1] * _FLOAT32_UNIT)
        slack = (2.0 * gamma / (1.0 - gamma)) * dots + 1.0  # + float64 rounding, generously
        ceiling = (estimate + slack).min(axis=1, keepdims=True)
        which, member = np.nonzero(estimate - slack <= ceiling)
        if len(which) > 16 * len(x):
            exact = (
                x_norms[:, None]
                + norms[None, :]
                - 2.0 * (x.astype(np.float64) @ rows.astype(np.float64).T)
            )
            squared = exact.min(axis=1)
            latest = (exact == squared[:, None])[:, ::-1].argmax(axis=1)
            return squared, len(rows) - 1 - latest
        exact = np.empty(len(which))
        for start in range(0, len(which), _REFINE_CHUNK):
            part = slice(start, start + _REFINE_CHUNK)
            difference = x[which[part]].astype(np.int64) - rows[member[part]]
            exact[part] = np.einsum("ij,ij->i", difference, difference)
        starts = np.flatnonzero(np.concatenate([[True], which[1:] != which[:-1]]))
        squared = np.minimum.reduceat(exact, starts)
        nearest = exact == np.repeat(squared, np.diff(np.append(starts, len(which))))
        return squared, np.maximum.reduceat(np.where(nearest, member, -1), starts)

    def _run_tests(
        self,
        state: State,
        distances: np.ndarray,
        owners: np.ndarray,
        before: int,
        recorded: np.ndarray,
        path: np.ndarray,
    ) -> int | None:
        """The batch's tests; the index of the query whose test raised the alarm, if one did.

        ``distances``/``owners``: the window before the batch (``before`` long) then the
        batch's recorded distances, at batch positions ``recorded``. ``path`` (one per query
        of the batch, NaN) gets W after each query whose test is evaluated and has one.
        """
        positions = range(-int(state["queries"]) % self.TEST_EVERY, len(path), self.TEST_EVERY)

        def test(position: int) -> bool:
            end = before + int(np.searchsorted(recorded, position, side="right"))
            start = max(0, end - self.distance_window)
            w = self.shapiro_w(distances[start:end], owners[start:end], state["class_rank"])
            if w is not None:
                state["statistic"] = np.array(w)
                state["present"] = np.array(w < self.delta)
                path[position] = w
            return w is not None

        if bool(state["alarmed"]):
            self._latest_test(positions, test)
            return None
        for done, position in enumerate(positions, start=1):
            if test(position) and bool(state["present"]):
                state["alarmed"] = np.array(True)
                self._latest_test(positions[done:], test)
                return position
        return None

    @staticmethod
    def _latest_test(positions: range, test: Callable[[int], bool]) -> None:
        """After the alarm only the latest test counts: the last one that has a W."""
        for position in reversed(positions):
            if test(position):
                break

    def shapiro_w(
        self, distances: np.ndarray, owners: np.ndarray, class_rank: np.ndarray
    ) -> float | None:
        """One test's W, or None when too few distances qualify."""
        per_class = np.bincount(owners, minlength=len(class_rank))
        eligible = per_class[owners] >= self.CLASS_MINIMUM
        if np.count_nonzero(eligible) <= self.TEST_MINIMUM:
            return None
        # Pooled class after class, in the order the classes had their first distance, as the
        # reference pools them: the order moves the mean, the std and W in their last bits.
        pooled = distances[eligible][np.argsort(class_rank[owners[eligible]], kind="stable")]
        kept = pooled[np.abs(pooled - pooled.mean()) < self.OUTLIER_STDS * pooled.std()]
        if len(kept) <= self.TEST_MINIMUM:
            return None
        with warnings.catch_warnings():  # e.g. "range zero", on exact duplicates
            warnings.simplefilter("ignore")
            return float(stats.shapiro(kept).statistic)
