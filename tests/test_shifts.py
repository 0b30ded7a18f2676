"""Benign-shift families, held-out outlier families, and the out-of-sample detection protocol."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from defense.detectors import Cusum, Prada, load_detector
from defense.evaluation import (
    Family,
    alarms_below,
    attack_streams,
    benign_streams,
    decision_paths,
    first_alarm,
    tradeoff,
)
from defense.sequential import calibrate_cusum
from defense.training import forward, train_detectors
from mlaas.datasets import load_dataset, natural_photo_names
from mlaas.images import InputShape
from mlaas.modelstore import load_model
from mlaas.shifts import (
    CALIBRATION_SHIFTS,
    HELD_OUT_SHIFTS,
    SHIFTS,
    apply_shift,
    parse_shifts,
    shift_mixture,
)

GREY = InputShape(1, 28, 28)


@pytest.fixture(scope="module")
def clothes() -> np.ndarray:
    return load_dataset("fashion-mnist:pool", GREY).get_batch(np.arange(40))


@pytest.mark.parametrize("name", [n for n in SHIFTS if n != "none"])
def test_each_family_changes_images_reproducibly_and_keeps_their_form(name, clothes) -> None:
    first = apply_shift(name, clothes, np.random.default_rng(7))
    again = apply_shift(name, clothes, np.random.default_rng(7))
    other = apply_shift(name, clothes, np.random.default_rng(8))
    assert first.shape == clothes.shape and first.dtype == np.uint8
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)  # parameters are drawn per image, per seed
    changed = (first.astype(int) != clothes).any(axis=(1, 2, 3))
    assert changed.mean() > 0.9, f"{name} left most images untouched"
    # A shift, not a new image: still far closer to its source than to another clothing item.
    own = np.abs(first.astype(int) - clothes).mean(axis=(1, 2, 3))
    others = np.abs(first.astype(int) - np.roll(clothes, 1, axis=0)).mean(axis=(1, 2, 3))
    assert (own < others).mean() > 0.8


def test_families_work_on_colour_images_too() -> None:
    photos = load_dataset("natural-crops", InputShape(3, 32, 32)).get_batch(np.arange(6))
    for name in SHIFTS:
        assert apply_shift(name, photos, np.random.default_rng(0)).shape == photos.shape


def test_calibration_and_held_out_families_are_disjoint_and_cover_the_registry() -> None:
    assert not set(CALIBRATION_SHIFTS) & set(HELD_OUT_SHIFTS)
    assert set(CALIBRATION_SHIFTS) | set(HELD_OUT_SHIFTS) == set(SHIFTS) - {"none"}


def test_parse_shifts() -> None:
    assert parse_shifts("zoom, jpeg") == ["zoom", "jpeg"]
    assert parse_shifts("all") == [n for n in SHIFTS if n != "none"]
    with pytest.raises(ValueError, match="unknown benign shift sepia"):
        parse_shifts("zoom,sepia")
    with pytest.raises(ValueError, match="none given"):
        parse_shifts(" , ")


def test_a_mixture_assigns_each_image_one_family(clothes) -> None:
    shifted, family = shift_mixture(["jpeg", "contrast"], clothes, np.random.default_rng(1))
    assert set(family.tolist()) == {0, 1}
    for index, name in enumerate(["jpeg", "contrast"]):
        mine = family == index
        alone = apply_shift(name, clothes[mine], np.random.default_rng(2))
        assert shifted[mine].shape == alone.shape


def test_photographs_split_in_two_halves_for_training_and_judging() -> None:
    a, b = natural_photo_names("photos-a"), natural_photo_names("photos-b")
    assert a and b and not set(a) & set(b)
    assert sorted(a + b) == sorted(natural_photo_names())
    crops = load_dataset("natural-crops:photos-b", GREY, size=200)
    assert len(crops) == 200 and crops.name == "natural-crops:photos-b"
    photo_indices = {crops.crop_box(i)[0] for i in range(200)}
    assert photo_indices == set(range(len(b)))  # every crop comes from the held-out half


@pytest.mark.parametrize("split", ["textures", "noise"])
def test_synthetic_images_are_seeded_and_shaped(split: str) -> None:
    first = load_dataset(f"synthetic:{split}", GREY, seed=3).get_batch([5, 9])
    again = load_dataset(f"synthetic:{split}", GREY, seed=3).get_batch([9, 5])
    np.testing.assert_array_equal(first, again[::-1])  # an item depends on its index only
    assert first.shape == (2, 28, 28, 1) and first.dtype == np.uint8
    assert first.std() > 10


def test_grouped_calibration_holds_for_the_worst_group() -> None:
    rng = np.random.default_rng(0)
    # Most calibration clients are calm; a few (one family) score higher all along.
    calm, shifted = rng.normal(0, 1, 3000), rng.normal(2, 1, 300)
    pooled = calibrate_cusum(np.r_[calm, shifted], streams=4000, stream_length=300)
    grouped = calibrate_cusum(
        np.r_[calm, shifted], groups=np.r_[np.zeros(3000), np.ones(300)], streams=4000,
        stream_length=300,
    )  # fmt: skip
    assert grouped.drift > pooled.drift

    # A client who stays in the shifted group all along: the pooled calibration flags it
    # often, the grouped one about as rarely as it promised.
    def rate(cusum: Cusum) -> float:
        alarms = [cusum.run(0.0, rng.normal(2, 1, 300))[1] is not None for _ in range(300)]
        return float(np.mean(alarms))

    assert rate(pooled) > 0.2
    assert rate(grouped) < 0.02
    with pytest.raises(ValueError, match="every group"):
        calibrate_cusum(np.r_[calm, shifted[:10]], groups=np.r_[np.zeros(3000), np.ones(10)])


def test_first_alarm_and_the_tradeoff_curve() -> None:
    paths = np.array([[0.0, 1.0, 3.0, 2.0], [0.0, 0.5, 0.5, 0.5], [np.nan, 4.0, np.nan, 0.1]])
    assert first_alarm(paths, 2.0, below=False).tolist() == [3, 0, 2]
    assert first_alarm(paths, 0.3, below=True).tolist() == [1, 1, 4]
    benign = np.array([[0.0, 0.2, 0.4], [0.0, 0.1, 1.5]])
    attack = np.array([[0.0, 2.0, 5.0], [0.0, 0.0, 3.0], [1.0, 6.0, 9.0]])
    curve = tradeoff(benign, attack, below=False)
    rates = [c[1] for c in curve]
    delays = [c[2] for c in curve]
    assert rates == sorted(rates, reverse=True)  # a higher threshold never alarms more
    assert delays == sorted(delays)
    assert curve[0][1] == 1.0 and curve[-1][1] == 0.0


def test_out_of_sample_protocol_on_a_real_victim(tiny_victim: Path, tmp_path: Path) -> None:
    """The protocol end to end: detectors trained on one half of the photographs and the
    calibration families; judged on held-out benign families and the other photographs."""
    defense_dir = tmp_path / "defense"
    train_detectors(["ood-binary"], tiny_victim, size=1500, out_dir=defense_dir)
    detectors = [load_detector("ood-binary", defense_dir), Prada(delta=0.9)]
    model, card = load_model(tiny_victim)
    rng = np.random.default_rng(0)
    pool = load_dataset("fashion-mnist:pool", card.shape)
    held_out = Family("attack", "natural-crops:photos-a", held_out=True)
    benign = benign_streams(pool, "rotation", 4, 200, rng)
    attack = attack_streams(load_dataset(held_out.name, card.shape, seed=5), 4, 200, rng)
    victim = lambda images: forward(model, images)  # noqa: E731
    benign_paths = decision_paths(detectors, victim, benign)
    attack_paths = decision_paths(detectors, victim, attack)
    ood = detectors[0]
    assert benign_paths["ood-binary"].shape == (4, 200)
    # CUSUM paths are non-negative sums; PRADA's W only appears at its tests (10th queries).
    assert (benign_paths["ood-binary"] >= 0).all()
    prada_defined = ~np.isnan(attack_paths["prada"][0])
    assert prada_defined.any() and set(np.flatnonzero(prada_defined) % 10) == {0}
    benign_alarms = first_alarm(benign_paths["ood-binary"], ood.cusum.threshold, False)
    attack_alarms = first_alarm(attack_paths["ood-binary"], ood.cusum.threshold, False)
    assert (benign_alarms == 0).all()
    assert (attack_alarms > 0).all() and attack_alarms.max() <= 50
    assert not alarms_below(ood) and alarms_below(detectors[1])


@pytest.mark.slow
def test_the_detection_bench_runs_end_to_end(tiny_victim: Path, tmp_path: Path) -> None:
    """bench/detection.py on a tiny victim: every family judged, held-out ones marked, the
    trade-off figure drawn and the summary printed as JSON."""
    import json
    import shutil
    import subprocess
    import sys

    victim = tmp_path / "victim"
    shutil.copytree(tiny_victim, victim, ignore=shutil.ignore_patterns("defense"))
    train_detectors(["ood-binary", "mahalanobis"], victim, size=1500)
    out = tmp_path / "bench"
    command = [
        sys.executable, "bench/detection.py", "--victim", str(victim), "--out", str(out),
        "--detectors", "ood-binary,mahalanobis,prada", "--benign-streams", "2",
        "--attack-streams", "2", "--length", "120", "--sybil-keys", "3", "--json",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=True)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    rows = {row["family"]: row for row in summary["rows"]}
    assert set(rows) == {f"benign:{n}" for n in SHIFTS} | {
        "attack:natural-crops:photos-a", "attack:natural-crops:photos-b", "attack:mnist",
        "attack:synthetic:textures", "attack:synthetic:noise", "attack:fashion-mnist:pool",
    }  # fmt: skip
    assert not rows["benign:zoom"]["held_out"] and rows["benign:rotation"]["held_out"]
    assert not rows["attack:natural-crops:photos-b"]["held_out"]
    assert rows["attack:natural-crops:photos-a"]["held_out"]
    assert summary["default_set"] == ["ood-binary", "mahalanobis"]
    assert set(rows["benign:blur"]["cells"]) == {"ood-binary", "mahalanobis", "prada", "set"}
    assert rows["benign:blur"]["cells"]["set"]["streams"] == 2
    assert len(summary["sybil"]) == 6
    assert summary["sybil"][0]["cells"]["prada"]["keys"] == 2 * 3
    assert (out / "tradeoff.png").stat().st_size > 10_000
    assert "| benign:mixture | yes |" in result.stdout
