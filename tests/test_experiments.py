"""The experiment harness: configurations, a tiny matrix end to end, resumption, failures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from testbed.experiments.config import ExperimentConfig
from testbed.experiments.report import write_report
from testbed.experiments.runner import check_cell, run_experiment

SHIPPED = sorted(Path(__file__).parent.parent.joinpath("experiments").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_configs_parse_and_every_cell_builds(path: Path) -> None:
    config = ExperimentConfig.load(path)
    cells = config.cells()
    assert cells and len({c.id for c in cells}) == len(cells)
    for cell in cells:
        check_cell(cell, config)  # even where the data (CIFAR, ImageNet) is absent here


def test_the_gpu_config_covers_the_papers_setting() -> None:
    config = ExperimentConfig.load(Path("experiments/paper-gpu.yaml"))
    datasets = {v.dataset for v in config.victims}
    assert {"cifar10", "gtsrb", "caltech256"} <= datasets
    assert {v.pretrained for v in config.victims} == {None, "imagenet"}
    assert max(a.budget for a in config.attackers) == 100_000


def base(**changes) -> dict:
    config = {
        "name": "t",
        "victims": [{"name": "v", "epochs": 1, "train_size": 2000}],
        "attackers": [{"name": "k", "attack": "knockoff", "budgets": [60], "epochs": 1}],
        "benign": {"clients": 1, "queries": 20},
        "eval_size": 200,
    }
    config.update(changes)
    return config


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"granularities": ["top3"]}, "granularity"),
        ({"attackers": [{"name": "k", "attack": "steal", "budgets": [5]}]}, "attack"),
        ({"victims": [{"name": "v"}, {"name": "v"}]}, "unique"),
        ({"attackers": [{"name": "k", "attack": "knockoff", "budgets": []}]}, "budgets"),
        ({"surprise": 1}, "surprise"),
        # Side by side, an attacker's key is named after it: not as the harness's own keys.
        (
            {
                "side_by_side": True,
                "attackers": [{"name": "benign-1", "attack": "knockoff", "budgets": [5]}],
            },
            "benign keys",
        ),
        ({"run_name": "{attacker}", "granularities": ["probs", "label"]}, "one run directory"),
        ({"run_name": "{attack}"}, "unknown field"),
    ],
)
def test_bad_configs_are_refused_clearly(changes: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ExperimentConfig.model_validate(base(**changes))


@pytest.mark.slow
def test_a_tiny_matrix_runs_resumes_and_records_failures(tmp_path: Path) -> None:
    config = ExperimentConfig.model_validate(
        base(
            defenses=[{"name": "none"}, {"name": "detect", "detectors": ["ood-binary"]}],
            attackers=[
                {"name": "k", "attack": "knockoff", "budgets": [30, 60], "epochs": 1},
                {
                    "name": "broken",
                    "attack": "knockoff",
                    "transfer": "no-such-set",
                    "budgets": [10],
                },
            ],
        )
    )
    out = tmp_path / "exp"
    counts = run_experiment(config, out)
    assert counts == {"cells": 4, "skipped": 0, "ok": 2, "failed": 2}
    report = write_report(out).read_text()
    assert "## The paper's claims" in report and "no-such-set" in report
    records = [json.loads(p.read_text()) for p in (out / "cells").glob("*.json")]
    guarded = next(
        r for r in records if r["status"] == "ok" and r["cell"]["defense"]["name"] == "detect"
    )
    assert guarded["alerts"]["ood-binary"] <= 10  # natural crops flagged within a few queries
    assert f"| detect | k (probs) | 0 | 60 | {guarded['alerts']['ood-binary']} |" in report
    assert (out / "figures" / "curves-v.png").is_file()
    card = out / "victims" / "v-s0" / "card.json"
    trained_at = card.stat().st_mtime

    again = run_experiment(config, out)
    assert again == {"cells": 4, "skipped": 2, "ok": 0, "failed": 2}  # finished cells skipped
    assert card.stat().st_mtime == trained_at  # and the victim was not trained again


def test_claims_are_reported_with_their_spread_and_hold_only_in_every_seed() -> None:
    from testbed.experiments.report import _spread, _verdict

    assert _verdict([True, True, True]) == "yes, in 3/3 seeds"
    assert _verdict([True]) == "yes"
    assert _verdict([True, False, True]) == "mixed: 2/3 seeds"
    assert _verdict([False, False]) == "no"
    assert _spread([0.5]) == "50.0%"
    assert _spread([0.4, 0.6]) == "50.0% (sd 10.0%, 40.0%-60.0% over 2 seeds)"
