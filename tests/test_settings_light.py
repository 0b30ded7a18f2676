"""The provider's settings: read cheaply, and parsed once into the types the service uses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from defense.monitor import Policy
from defense.perturb import Perturbation
from server.settings import ServerSettings
from server.shaping import Granularity

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("scipy", "torch", "sqlalchemy")


def test_reading_the_settings_loads_no_heavy_package() -> None:
    """A CLI command or a health probe that only reads settings must not pay for the
    detectors (SciPy), the model (torch) or the query log (SQLAlchemy)."""
    script = (
        "import json, sys\n"
        "from server.settings import ServerSettings\n"
        "settings = ServerSettings()\n"
        "assert settings.detector_names and settings.policy == 'block'\n"
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLAAS_")}
    # Every option that a validator parses, so that the validators are shown light too.
    env |= {
        "MLAAS_DETECTORS": "default,prada",
        "MLAAS_POLICY": "block",
        "MLAAS_GRANULARITY": "topk:3",
        "MLAAS_PERTURBATION": "noise:0.1",
        "MLAAS_DECEIVE": "label",
        "MLAAS_LOG_MODE": "buffered",
        "MLAAS_RATE_LIMIT": "2.5",
    }
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(result.stdout) == []


def test_specs_are_parsed_once_into_their_types(monkeypatch) -> None:
    monkeypatch.setenv("MLAAS_GRANULARITY", "round:2,topk:3")
    monkeypatch.setenv("MLAAS_POLICY", " Deceive ")
    monkeypatch.setenv("MLAAS_DECEIVE", "label")
    monkeypatch.setenv("MLAAS_PERTURBATION", "reverse-sigmoid:0.5:0.2")
    settings = ServerSettings()
    assert settings.granularity == Granularity(top_k=3, decimals=2)
    assert settings.policy is Policy.deceive
    assert settings.deceive == Granularity(label_only=True)
    assert settings.perturbation == Perturbation("reverse-sigmoid", beta=0.5, gamma=0.2)


def test_defaults_are_the_documented_specs() -> None:
    settings = ServerSettings(_env_file=None)
    assert str(settings.granularity) == "probs"
    assert settings.policy is Policy.monitor
    assert str(settings.deceive) == "reverse-sigmoid:0.7:0.4"
    assert str(settings.perturbation) == "none"


def test_parsed_values_dump_as_their_specs_and_read_back() -> None:
    settings = ServerSettings(
        granularity="topk:2", deceive="noise:0.3", perturbation="none", policy="block"
    )
    dumped = settings.model_dump(include={"granularity", "deceive", "perturbation", "policy"})
    assert dumped == {
        "granularity": "topk:2",
        "deceive": "noise:0.3",
        "perturbation": "none",
        "policy": "block",
    }
    again = ServerSettings(**dumped)
    assert (again.granularity, again.deceive) == (settings.granularity, settings.deceive)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("granularity", "top3", "unknown granularity 'top3'"),
        ("perturbation", "noise:-1", "perturbation 'noise:-1'"),
        ("deceive", "blur", "deceive 'blur': a perturbation"),
        ("policy", "ban", "'monitor', 'block' or 'deceive'"),
    ],
)
def test_a_bad_spec_is_refused_when_the_settings_are_read(
    field: str, value: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        ServerSettings(**{field: value})
