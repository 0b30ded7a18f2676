"""What every ``mlaas`` command shares: the command groups, error reporting, output formats
and the provider's settings and database as a command opens them."""

from __future__ import annotations

import csv
import json
import sys
from enum import StrEnum
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    name="mlaas",
    help="A testbed for model extraction against ML-as-a-service: serve a victim, attack it, "
    "watch the log.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
victim_app = typer.Typer(help="Train victim models.", no_args_is_help=True)
keys_app = typer.Typer(help="Manage clients' API keys.", no_args_is_help=True)
datasets_app = typer.Typer(help="The data sets the testbed knows.", no_args_is_help=True)
app.add_typer(victim_app, name="victim")
app.add_typer(datasets_app, name="datasets")
attack_app = typer.Typer(
    help="Steal the served model over HTTP and train a substitute locally.",
    no_args_is_help=True,
)
app.add_typer(attack_app, name="attack")
defense_app = typer.Typer(help="Train the provider's detectors.", no_args_is_help=True)
app.add_typer(defense_app, name="defense")
experiment_app = typer.Typer(
    help="Run a matrix of attacks against defenses, and report what the paper measures.",
    no_args_is_help=True,
)
app.add_typer(experiment_app, name="experiment")
app.add_typer(keys_app, name="keys")

err = Console(stderr=True)
out = Console()


def fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    return typer.Exit(code)


class Format(StrEnum):
    table = "table"
    json = "json"
    csv = "csv"


def _server_settings(**overrides: Any):
    from pydantic import ValidationError

    from server.settings import ServerSettings

    try:
        return ServerSettings(**{k: v for k, v in overrides.items() if v is not None})
    except (ValidationError, ValueError, FileNotFoundError) as exc:
        raise fail(f"invalid settings: {exc}") from exc


def _database(settings: Any):
    from sqlalchemy.exc import OperationalError

    from server.db import SchemaError, init_db, make_engine

    # The server's timeouts, but no statement limit: an export of a whole log may take long.
    engine = make_engine(
        settings.resolved_database_url,
        **{**settings.database_options, "statement_timeout_s": None},
    )
    try:
        init_db(engine)
    except SchemaError as exc:
        raise fail(str(exc)) from exc
    except OperationalError as exc:
        raise fail(f"the database does not answer: {exc.orig}") from exc
    return engine


def _emit(rows: list[dict[str, Any]], fmt: Format, columns: list[str]) -> None:
    if fmt is Format.json:
        print(json.dumps(rows, indent=2, default=str))
        return
    if fmt is Format.csv:
        writer = csv.DictWriter(sys.stdout, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: _cell(row.get(c)) for c in columns})
        return
    table = Table(*columns)
    for row in rows:
        table.add_row(*(_cell(row.get(c)) for c in columns))
    out.print(table)
    err.print(f"{len(rows)} rows")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)
