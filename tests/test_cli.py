"""CLI parsing and settings sources."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import typer
from typer.testing import CliRunner

from server.settings import ServerSettings
from server.shaping import Granularity
from testbed.cli import app, parse_since

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30s", NOW - timedelta(seconds=30)),
        ("15m", NOW - timedelta(minutes=15)),
        ("2h", NOW - timedelta(hours=2)),
        ("1.5d", NOW - timedelta(days=1.5)),
        ("2026-11-28T10:00", datetime(2026, 11, 28, 10, 0, tzinfo=UTC)),
        ("2026-11-28T10:00+01:00", datetime(2026, 11, 28, 9, 0, tzinfo=UTC)),
    ],
)
def test_parse_since(text: str, expected: datetime) -> None:
    assert parse_since(text, now=NOW) == expected


@pytest.mark.parametrize("text", ["yesterday", "15", "5w", ""])
def test_parse_since_refuses_nonsense(text: str) -> None:
    with pytest.raises(typer.BadParameter):
        parse_since(text, now=NOW)


def test_settings_from_toml_file_and_environment(tmp_path, monkeypatch) -> None:
    config = tmp_path / "mlaas.toml"
    config.write_text('granularity = "topk:3"\nmax_images_per_request = 8\n')
    monkeypatch.setenv("MLAAS_CONFIG", str(config))
    settings = ServerSettings()
    assert (
        settings.granularity == Granularity.parse("topk:3") and settings.max_images_per_request == 8
    )
    monkeypatch.setenv("MLAAS_GRANULARITY", "label")  # the environment wins over the file
    assert ServerSettings().granularity == Granularity.parse("label")
    monkeypatch.setenv("MLAAS_GRANULARITY", "top3")
    with pytest.raises(ValueError, match="granularity"):
        ServerSettings()
    monkeypatch.setenv("MLAAS_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(FileNotFoundError):
        ServerSettings()


def test_the_default_detector_set_expands_in_place(monkeypatch) -> None:
    from defense.detectors import DEFAULT_DETECTORS

    monkeypatch.setenv("MLAAS_DETECTORS", "default")
    assert ServerSettings().detector_names == list(DEFAULT_DETECTORS)
    monkeypatch.setenv("MLAAS_DETECTORS", "prada,default,ood-binary")
    names = ServerSettings().detector_names
    assert names[0] == "prada" and sorted(names) == sorted({"prada", *DEFAULT_DETECTORS})
    monkeypatch.setenv("MLAAS_DETECTORS", "defaults")
    with pytest.raises(ValueError, match="unknown detector 'defaults'"):
        ServerSettings()


def test_default_database_lives_under_var_dir(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("MLAAS_DATABASE_URL", raising=False)
    monkeypatch.setenv("MLAAS_VAR_DIR", str(tmp_path))
    assert ServerSettings().resolved_database_url == f"sqlite:///{tmp_path / 'mlaas.db'}"


def test_help_lists_the_commands() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("victim", "serve", "keys", "logs", "demo", "datasets"):
        assert command in result.output


def test_keys_carry_their_own_limits(tmp_path, monkeypatch) -> None:
    import json

    monkeypatch.setenv("MLAAS_DATABASE_URL", f"sqlite:///{tmp_path / 'keys.db'}")
    runner = CliRunner()
    created = runner.invoke(app, ["keys", "create", "trial", "--daily-quota", "500"])
    assert created.exit_code == 0, created.output
    assert created.stdout.strip().startswith("mlk_")
    refused = runner.invoke(app, ["keys", "create", "bad", "--rate-limit", "0"])
    assert refused.exit_code != 0
    listed = json.loads(runner.invoke(app, ["keys", "list", "--format", "json"]).stdout)
    assert [(k["name"], k["daily_quota"], k["rate_limit"]) for k in listed] == [
        ("trial", 500, None)
    ]


def test_an_unreachable_database_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setenv("MLAAS_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:1/none")
    result = CliRunner().invoke(app, ["keys", "list"])
    assert result.exit_code == 1
    assert "the database does not answer" in result.output
    assert "Traceback" not in result.output
