"""The deployment files: no Docker engine runs here, so check them as far as one can."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from server.settings import ServerSettings

ROOT = Path(__file__).parent.parent


def test_compose_file_passes_docker_compose_config(monkeypatch) -> None:
    tool = shutil.which("docker-compose")
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail("docker-compose is missing: .ci/run installs Debian's package")
        pytest.skip("docker-compose is not installed")
    result = subprocess.run(
        [tool, "-f", str(ROOT / "docker-compose.yml"), "config"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    services = resolved["services"]
    assert {"api", "postgres", "redis", "victim", "attacker", "api-gpu"} <= set(services)
    api = services["api"]
    assert api["environment"]["MLAAS_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert api["environment"]["MLAAS_REDIS_URL"].startswith("redis://")
    assert api["depends_on"]["victim"]["condition"] == "service_completed_successfully"
    assert services["attacker"]["profiles"] == ["attacker"]
    # What compose hands the API is a valid configuration, with the safe defaults.
    for name, value in api["environment"].items():
        monkeypatch.setenv(name, "" if value is None else str(value))
    settings = ServerSettings()
    assert settings.log_mode == "durable" and settings.redis_failure == "closed"
    assert settings.rate_limit is None and settings.cors_origin_list == []


def test_the_image_runs_the_readmes_steps() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    entrypoint = (ROOT / "docker" / "entrypoint.sh").read_text()
    assert "pip install ." in dockerfile
    assert "mlaas datasets prepare fashion-mnist" in dockerfile
    assert "dataset-fashion-mnist" in dockerfile
    assert re.search(r"mlaas victim train --out", entrypoint)
    assert re.search(r"exec mlaas serve --victim", entrypoint)
    readme = (ROOT / "README.md").read_text()
    assert "mlaas datasets prepare fashion-mnist" in readme and "docker compose up" in readme
