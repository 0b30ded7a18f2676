"""The stronger Knockoff strategies (issue 14): ActiveThief's uncertainty and k-center selection,
and the stealth strategy's proxy of the provider's out-of-distribution detector."""

from __future__ import annotations

import itertools
import math
import re
import sqlite3
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from attacker.attacks import Victim, stealth_pool
from attacker.config import KnockoffConfig, for_attack
from attacker.runner import run_attack
from attacker.strategies import entropy, kcenter_greedy, most_uncertain, select_active
from mlaas.datasets import ArrayImageSet, load_dataset
from mlaas.images import InputShape
from tests.helpers import answered

SHAPE = InputShape(1, 28, 28)
FAST = {"epochs": 2, "eval_size": 300}


def _no_centers(dimensions: int = 1) -> np.ndarray:
    return np.zeros((0, dimensions))


# ------------------------------------------------------------------------------ uncertainty
def test_entropy_is_zero_when_certain_and_log_k_when_uniform() -> None:
    probs = np.array([[0.0, 1.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 0.0, 0.0]])
    np.testing.assert_allclose(entropy(probs), [0.0, math.log(4), math.log(2)], atol=1e-12)


def test_most_uncertain_puts_the_highest_entropy_rows_first() -> None:
    probs = np.array(
        [
            [0.9, 0.05, 0.05],  # entropy 0.39
            [1 / 3, 1 / 3, 1 / 3],  # 1.10, the most
            [1.0, 0.0, 0.0],  # 0, the least
            [0.5, 0.5, 0.0],  # 0.69
            [0.6, 0.2, 0.2],  # 0.95
        ]
    )
    assert most_uncertain(probs, 3).tolist() == [1, 4, 3]
    assert most_uncertain(probs, 10).tolist() == [1, 4, 3, 0, 2]  # all of them, once


# --------------------------------------------------------------------------------- k-center
def _line(*points: float) -> np.ndarray:
    return np.array(points, dtype=np.float64)[:, None]


def test_kcenter_picks_the_farthest_point_from_everything_chosen() -> None:
    points = _line(*range(11))  # 0, 1, ..., 10; position i holds point i
    # From center 0: 10 is farthest; then 5 (5 from both); then the first of 2, 3, 7 and 8
    # (2 from their nearest); then 7 (2 from 5 and 10, every other point is 1 from a center).
    assert kcenter_greedy(points, _line(0), 4).tolist() == [10, 5, 2, 7]


def test_kcenter_without_centers_starts_from_the_first_candidate() -> None:
    points = _line(3, 0, 9, 4)
    assert kcenter_greedy(points, _no_centers(), 2).tolist() == [0, 2]  # 3, then 9 (6 away)


def test_kcenter_never_returns_a_position_twice() -> None:
    duplicates = _line(1, 1, 1, 5, 5)
    chosen = kcenter_greedy(duplicates, _line(0), 5)
    assert sorted(chosen.tolist()) == [0, 1, 2, 3, 4]
    assert chosen[0] in (3, 4)  # the 5s are farthest from the center
    everything = kcenter_greedy(_line(2, 7, 4), _no_centers(), 10)  # more asked than there are
    assert sorted(everything.tolist()) == [0, 1, 2]


def _covering_radius(points: np.ndarray, centers: np.ndarray) -> float:
    distances = np.linalg.norm(points[:, None, :] - centers[None, :, :], axis=2)
    return float(distances.min(axis=1).max())


@pytest.mark.parametrize("seed", range(5))
def test_kcenter_covers_within_twice_the_optimal_radius(seed: int) -> None:
    # Gonzalez's bound for farthest-first traversal, checked against every choice of k centers.
    points = np.random.default_rng(seed).normal(size=(10, 2))
    k = 3
    greedy = _covering_radius(points, points[kcenter_greedy(points, _no_centers(2), k)])
    optimal = min(
        _covering_radius(points, points[list(subset)])
        for subset in itertools.combinations(range(len(points)), k)
    )
    assert optimal <= greedy <= 2 * optimal + 1e-12


# ----------------------------------------------------------------------------- select_active
def test_entropy_kcenter_picks_only_among_the_most_uncertain() -> None:
    rng = np.random.default_rng(0)
    candidate_probs = rng.dirichlet(np.full(10, 0.3), size=200)
    queried_probs = rng.dirichlet(np.full(10, 0.3), size=50)
    chosen = select_active("entropy-kcenter", candidate_probs, queried_probs, 5, shortlist=4)
    assert len(set(chosen.tolist())) == 5
    assert set(chosen.tolist()) <= set(most_uncertain(candidate_probs, 20).tolist())


def test_entropy_kcenter_spreads_over_the_shortlist_where_entropy_alone_repeats() -> None:
    confusing = [0.5, 0.5, 0.0]  # five copies of one confusing answer, the most uncertain
    candidate_probs = np.array(
        [confusing] * 5
        + [
            [0.0, 0.45, 0.55],  # nearly as uncertain, and unlike the confusing one
            [0.9, 0.1, 0.0],
            [0.0, 0.05, 0.95],  # the farthest from what was queried, but confident
        ]
    )
    queried = np.array([[1.0, 0.0, 0.0]])
    assert select_active("entropy", candidate_probs, queried, 2).tolist() == [0, 1]
    # The shortlist is the 3 * 2 most uncertain: positions 0 to 5. Among them the farthest from
    # the queried answer is 5, then the first of the confusing copies (they tie).
    spread = select_active("entropy-kcenter", candidate_probs, queried, 2, shortlist=3)
    assert spread.tolist() == [5, 0]
    farthest = select_active("kcenter", candidate_probs, queried, 1)
    assert farthest.tolist() == [7]  # k-center alone has no shortlist


def test_an_unknown_active_strategy_is_refused() -> None:
    probs = np.full((3, 2), 0.5)
    with pytest.raises(ValueError, match="must be one of kcenter, entropy, entropy-kcenter"):
        select_active("random", probs, probs, 1)


# ------------------------------------------------------------------- live server, slow
def _distinct_cached(run: Path) -> int:
    with sqlite3.connect(run / "cache.sqlite") as db:
        return db.execute("SELECT COUNT(DISTINCT digest) FROM answers").fetchone()[0]


@pytest.mark.slow
def test_active_rounds_spend_the_budget_exactly_on_distinct_images(live, tmp_path) -> None:
    key = live.admin.create_key("kcenter")
    config = for_attack(
        "knockoff", budget=120, checkpoints=[60], rounds=3, initial=0.25, candidates=200,
        transfer_size=600, **FAST,
    )  # fmt: skip
    assert config.strategy == "kcenter"  # the default
    log = StringIO()
    metrics = run_attack(
        config, url=live.url, keys=[key], out=tmp_path / "run", progress=False,
        console=Console(file=log, width=200),
    )  # fmt: skip
    assert answered(live, "kcenter") == 120
    # 30 at random, then three rounds to 60, 90 and 120. A round end is measured where it is a
    # checkpoint (60, and the budget); the others only train the substitute that chooses.
    assert [c["queries"] for c in metrics["checkpoints"]] == [60, 120]
    chose_after = re.findall(r"choosing the next queries after (\d+)", log.getvalue())
    assert chose_after == ["30", "90"]
    assert metrics["strategy"] == "kcenter"
    assert _distinct_cached(tmp_path / "run") == 120  # no image asked twice


@pytest.fixture(scope="module")
def public_folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    """1,500 Fashion-MNIST pool images as an ImageFolder: the stealth proxy trains on all of its
    public set, and on the whole pool (10,000) it takes a minute here; this takes seconds."""
    pool = load_dataset("fashion-mnist:pool", SHAPE)
    assert pool.labels is not None
    root = tmp_path_factory.mktemp("public")
    for index in range(1500):
        folder = root / str(pool.labels[index])
        folder.mkdir(exist_ok=True)
        Image.fromarray(pool.get_batch([index])[0, :, :, 0]).save(folder / f"{index}.png")
    return f"imagefolder:{root}"


@pytest.mark.slow
def test_a_stealth_run_spends_its_budget(live, tmp_path, public_folder: str) -> None:
    key = live.admin.create_key("stealth")
    config = for_attack(
        "knockoff", strategy="stealth", keep=0.5, public=public_folder, budget=120,
        checkpoints=[], rounds=3, initial=0.25, candidates=200, transfer_size=600, **FAST,
    )  # fmt: skip
    metrics = run_attack(config, url=live.url, keys=[key], out=tmp_path / "run", progress=False)
    assert answered(live, "stealth") == 120
    assert metrics["final"]["queries"] == 120 and metrics["strategy"] == "stealth"
    assert _distinct_cached(tmp_path / "run") == 120


@pytest.mark.slow
def test_the_stealth_proxy_keeps_the_in_domain_share_of_a_mixed_transfer_set(
    public_folder: str,
) -> None:
    fashion = load_dataset("fashion-mnist:test", SHAPE).get_batch(np.arange(300))
    crops = load_dataset("natural-crops", SHAPE, size=900).get_batch(np.arange(900))
    transfer = ArrayImageSet("mixed", np.concatenate([fashion, crops]), None, None)
    config = for_attack("knockoff", strategy="stealth", keep=0.25, public=public_folder)
    assert isinstance(config, KnockoffConfig)
    kept = stealth_pool(config, Victim(SHAPE, 10), transfer)
    assert len(kept) == 300 and len(set(kept.tolist())) == 300
    in_domain = np.count_nonzero(kept < len(fashion))  # the fashion images come first
    assert in_domain >= 0.9 * len(kept), in_domain
