"""The deployment files: no Docker engine runs here, so check them as far as one can."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from server.settings import ServerSettings

ROOT = Path(__file__).parent.parent


def compose_config(tmp_path: Path, **variables: str) -> subprocess.CompletedProcess[str]:
    """``docker-compose config`` with exactly these MLAAS_* variables: none from this process's
    environment, and an empty env file in place of any .env lying in the checkout."""
    tool = shutil.which("docker-compose")
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail("docker-compose is missing: .ci/run installs Debian's package")
        pytest.skip("docker-compose is not installed")
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLAAS_")} | variables
    return subprocess.run(
        [tool, "-f", str(ROOT / "docker-compose.yml"), "--env-file", str(env_file), "config"],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env=env,
    )  # fmt: skip


def test_compose_file_passes_docker_compose_config(monkeypatch, tmp_path: Path) -> None:
    token = secrets.token_urlsafe(32)
    result = compose_config(tmp_path, MLAAS_ADMIN_TOKEN=token)
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    services = resolved["services"]
    assert {"api", "postgres", "redis", "victim", "attacker", "api-gpu"} <= set(services)
    api = services["api"]
    assert api["environment"]["MLAAS_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert api["environment"]["MLAAS_REDIS_URL"].startswith("redis://")
    assert api["depends_on"]["victim"]["condition"] == "service_completed_successfully"
    assert services["attacker"]["profiles"] == ["attacker"]
    assert api["environment"]["MLAAS_ADMIN_TOKEN"] == token
    # Redis keeps an append-only file on a volume: blocks and quotas survive its restart.
    redis_command = services["redis"]["command"]
    assert redis_command[redis_command.index("--appendonly") + 1] == "yes"
    assert any(volume.split(":")[1] == "/data" for volume in services["redis"]["volumes"])
    # What compose hands the API is a valid configuration, with the safe defaults.
    for name, value in api["environment"].items():
        monkeypatch.setenv(name, "" if value is None else str(value))
    settings = ServerSettings()
    assert settings.log_mode == "durable" and settings.redis_failure == "closed"
    assert settings.rate_limit is None and settings.cors_origin_list == []
    assert settings.admin_token is not None and not settings.secure_cookies


def test_the_api_refuses_to_start_without_an_admin_token(tmp_path: Path) -> None:
    """No default token: one published in the compose file would open every deployment of it.
    `docker-compose config` (and the other services) work without one; the API does not."""
    for variables in ({}, {"MLAAS_ADMIN_TOKEN": ""}):
        result = compose_config(tmp_path, **variables)
        assert result.returncode == 0, result.stderr
        assert not yaml.safe_load(result.stdout)["services"]["api"]["environment"].get(
            "MLAAS_ADMIN_TOKEN"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLAAS_")} | variables
        served = subprocess.run(
            ["sh", str(ROOT / "docker" / "entrypoint.sh"), "serve"],
            capture_output=True, text=True, timeout=30, env=env,
        )  # fmt: skip
        assert served.returncode == 1, served.stderr
        assert "set MLAAS_ADMIN_TOKEN" in served.stderr  # before training or serving anything
        assert "token_urlsafe(32)" in served.stderr  # and how to make one


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
