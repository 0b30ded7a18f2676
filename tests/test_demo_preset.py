"""`mlaas demo` as an experiment preset: the preset fitted to the command's options, and the
harness's side-by-side mode it runs on (all attackers and the benign clients at one server)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from defense.detectors import DEFAULT_DETECTORS
from defense.training import train_detectors
from mlaas.shifts import HELD_OUT_SHIFTS
from testbed.demo import PRESET, demo_config
from testbed.experiments.config import ExperimentConfig
from testbed.experiments.report import write_report
from testbed.experiments.runner import check_cell, run_experiment


def test_the_preset_ships_in_the_package_and_experiments_links_to_it() -> None:
    shipped = Path(__file__).parent.parent / "experiments" / "demo.yaml"
    assert shipped.resolve() == Path(str(PRESET)).resolve()


def test_the_preset_takes_the_commands_options(tmp_path: Path) -> None:
    config = demo_config(
        victim_dir=tmp_path / "victim", benign_clients=2, benign_queries=60, budget=200
    )
    assert config.side_by_side and len(config.groups()) == 1
    assert config.victims[0].directory == str(tmp_path / "victim")
    assert (config.benign.clients, config.benign.queries) == (2, 60)
    assert config.benign.shifts == list(HELD_OUT_SHIFTS)  # shifts no calibration saw
    assert config.defenses[0].detectors == list(DEFAULT_DETECTORS)
    budgets = {a.name: a.budgets for a in config.attackers}
    # JBDA keeps room for its seed set (75) and two doubling rounds.
    assert budgets == {"knockoff": [200], "stealth": [200], "realistic": [200], "jbda": [300]}
    assert [config.run_dir(c) for c in config.cells()] == [
        "knockoff", "stealth", "realistic", "jbda"
    ]  # fmt: skip
    for cell in config.cells():
        check_cell(cell, config)

    default = demo_config(victim_dir=tmp_path / "victim")
    assert {a.name: a.budgets for a in default.attackers} == {
        "knockoff": [250, 500, 1000],
        "stealth": [250, 500, 1000],
        "realistic": [250, 500, 1000],
        "jbda": [1000],
    }
    assert default.eval_size == 2000


@pytest.mark.slow
def test_side_by_side_runs_every_client_at_once_and_resumes(
    tiny_victim: Path, tmp_path: Path
) -> None:
    victim = tmp_path / "victim"  # detectors go into it: not the shared fixture
    shutil.copytree(tiny_victim, victim)
    train_detectors(["ood-binary"], victim, size=1500)  # small: the harness reuses it
    config = ExperimentConfig.model_validate(
        {
            "name": "sbs",
            "side_by_side": True,
            "run_name": "{attacker}",
            "victims": [{"name": "v", "directory": str(victim)}],
            "defenses": [{"name": "detect", "detectors": ["ood-binary"]}],
            "attackers": [
                {"name": "k", "attack": "knockoff", "budgets": [30, 60], "epochs": 1},
                {"name": "broken", "attack": "knockoff", "transfer": "no-such", "budgets": [10]},
            ],
            "benign": {"clients": 2, "queries": 20, "shifts": ["held-out"]},
            "eval_size": 200,
        }
    )
    out = tmp_path / "exp"
    assert run_experiment(config, out) == {"cells": 2, "skipped": 0, "ok": 1, "failed": 1}

    (group,) = [json.loads(p.read_text()) for p in (out / "groups").glob("*.json")]
    assert group["group"] == "v--detect--probs--0" and group["side_by_side"]
    assert group["server_exit_code"] == 0
    benign = group["benign"]["clients"]
    assert [(c["client"], c["shift"], c["queries_logged"]) for c in benign] == [
        ("benign-1", "rotation", 20),
        ("benign-2", "contrast", 20),
    ]
    records = {r["cell"]["attacker"]["name"]: r for r in _records(out)}
    knockoff, broken = records["k"], records["broken"]
    assert knockoff["queries_logged"] == 60 and knockoff["run_dir"] == "runs/k"
    assert knockoff["alerts"]["ood-binary"] <= 10  # natural crops flagged within a few queries
    assert broken["status"] == "failed" and "no-such" in broken["error"]
    assert broken["group"] == group["group"]
    # Every logged row is some client's: nothing lost, nothing counted twice.
    clients = sum(c["queries_logged"] for c in benign) + 60 + broken["queries_logged"]
    assert group["log_rows"] == clients + group["experimenter_queries"]
    assert (out / "runs" / "k" / "curve.png").stat().st_size > 10_000

    report = write_report(out).read_text()
    assert "## Side by side: v--detect--probs--0" in report
    assert f"| k | 60 | {knockoff['metrics']['final']['accuracy']:.1%} |" in report
    assert "| broken (failed) |" in report and "![k](runs/k/curve.png)" in report
    assert "Benign false alarms: " in report

    card = victim / "card.json"
    trained_at = card.stat().st_mtime
    again = run_experiment(config, out)
    assert again == {"cells": 2, "skipped": 1, "ok": 0, "failed": 1}  # finished cell skipped
    assert card.stat().st_mtime == trained_at  # the victim's own directory, reused


def _records(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in (out / "cells").glob("*.json")]
