"""The provider: `mlaas serve`, `mlaas keys ...`, `mlaas logs`, `mlaas alerts`."""

from __future__ import annotations

import copy
import os
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer

from testbed.cli.common import (
    Format,
    _cell,
    _database,
    _emit,
    _server_settings,
    app,
    err,
    fail,
    keys_app,
)


@app.command("serve")
def serve(
    victim: Annotated[Path, typer.Option(help="Directory from `mlaas victim train`")] = Path(
        "var/victims/fashion"
    ),
    granularity: Annotated[
        str | None, typer.Option(help="probs, label, topk:K, round:D; topk and round compose")
    ] = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: Annotated[int, typer.Option(help="uvicorn worker processes")] = 1,
    database_url: Annotated[
        str | None, typer.Option(help="SQLAlchemy URL (default: SQLite under var/)")
    ] = None,
    detector: Annotated[
        list[str] | None,
        typer.Option(
            help="ood-binary, msp, mahalanobis or prada; repeat for several; 'default' for the "
            "set measured best out of sample (ood-binary + mahalanobis)"
        ),
    ] = None,
    policy: Annotated[
        str | None, typer.Option(help="After an alert: monitor, block or deceive")
    ] = None,
    perturbation: Annotated[
        str | None, typer.Option(help="On every answer: reverse-sigmoid:B:G or noise:S")
    ] = None,
    log_level: str = "info",
) -> None:
    """Serve a victim model over HTTP (uvicorn), with the inline defense if asked."""
    import uvicorn

    from mlaas.modelstore import load_card

    try:
        load_card(victim)
    except (FileNotFoundError, ValueError) as exc:
        raise fail(f"{exc} (train one with `mlaas victim train --out {victim}`)") from exc
    overrides = {
        "victim_dir": str(victim),
        "granularity": granularity,
        "database_url": database_url,
        "detectors": ",".join(detector) if detector else None,
        "policy": policy,
        "perturbation": perturbation,
    }
    settings = _server_settings(**overrides)  # fail here, clearly, rather than inside a worker
    from defense.detectors import artifact_path

    for name in settings.detector_names:
        if name != "prada" and not artifact_path(settings.resolved_defense_dir, name).exists():
            raise fail(
                f"detector {name!r} is not trained for this victim: run `mlaas defense train "
                f"{name} --victim {victim}`"
            )
    for key, value in overrides.items():
        if value is not None:
            os.environ[f"MLAAS_{key.upper()}"] = value
    from server.redaction import redacting_log_config

    log_config = redacting_log_config(copy.deepcopy(uvicorn.config.LOGGING_CONFIG), log_level)
    uvicorn.run(
        "server.app:create_app_from_env",
        log_config=log_config,
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=log_level,
        timeout_graceful_shutdown=30,
    )


@keys_app.command("create")
def keys_create(
    name: str,
    granularity: Annotated[
        str | None, typer.Option(help="Override the deployment's granularity for this client")
    ] = None,
    rate_limit: Annotated[
        float | None, typer.Option(min=0.001, help="Images per second (default: the server's)")
    ] = None,
    rate_burst: Annotated[
        int | None, typer.Option(min=1, help="Images at once (default: one second's worth)")
    ] = None,
    daily_quota: Annotated[
        int | None, typer.Option(min=1, help="Images per UTC day (default: the server's)")
    ] = None,
    account: Annotated[
        str | None,
        typer.Option(
            help="The account the key joins (default: the key's own name); detectors also "
            "decide on a shared account's queries taken together"
        ),
    ] = None,
) -> None:
    """Create a client and print its API key (once, alone on standard output)."""
    from server.keys import KeyStore, KeyStoreError
    from server.ratelimit import LimitSpec

    engine = _database(_server_settings())
    try:
        limits = LimitSpec(rate=rate_limit, burst=rate_burst, daily_quota=daily_quota)
        key = KeyStore(engine).create(name, granularity, limits, account)
    except (KeyStoreError, ValueError) as exc:
        raise fail(str(exc)) from exc
    joined = f" in account [bold]{account}[/]" if account and account != name else ""
    err.print(f"created client [bold]{name}[/]{joined}; the key is shown once:")
    print(key)


@keys_app.command("list")
def keys_list(fmt: Annotated[Format, typer.Option("--format")] = Format.table) -> None:
    """List clients (never their keys)."""
    from server.keys import KeyStore

    rows = [k.to_row() for k in KeyStore(_database(_server_settings())).list()]
    columns = [
        "name",
        "account",
        "key_prefix",
        "granularity",
        "rate_limit",
        "daily_quota",
        "created_at",
    ]
    _emit(rows, fmt, columns=[*columns, "revoked_at"])


@keys_app.command("revoke")
def keys_revoke(name: str) -> None:
    """Revoke a client's key: its next request gets 401."""
    from server.keys import KeyStore, KeyStoreError

    try:
        KeyStore(_database(_server_settings())).revoke(name)
    except KeyStoreError as exc:
        raise fail(str(exc)) from exc
    err.print(f"revoked client [bold]{name}[/]")


_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """An ISO 8601 time (UTC if no zone) or a span back from now: 30s, 15m, 2h, 7d."""
    match = _RELATIVE.match(text.strip())
    if match:
        now = now or datetime.now(UTC)
        return now - timedelta(**{_UNITS[match.group(2)]: float(match.group(1))})
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        raise typer.BadParameter(
            f"{text!r} is neither an ISO time (2026-01-31T12:00) nor a span (15m, 2h, 7d)"
        ) from exc
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


_LOG_COLUMNS = [
    "time", "client", "id", "predicted", "label_name", "top_prob", "granularity",
    "input_shape", "latency_ms", "scores", "input_sha256",
]  # fmt: skip
# A terminal is narrow: the table shows what a person scans for, the other formats all.
_LOG_TABLE_COLUMNS = ["time", "client", "id", "label_name", "top_prob", "latency_ms", "scores"]


def _flatten_log_row(row: dict[str, Any]) -> dict[str, Any]:
    payload = row["payload"] or {}
    scores = payload.get("scores") or []
    return {
        **row,
        "label_name": payload.get("label_name"),
        "top_prob": scores[0]["prob"] if scores else None,
    }


def _compact_log_row(row: dict[str, Any]) -> dict[str, Any]:
    detectors = row.get("scores") or {}
    return {
        **row,
        "time": row["time"][11:23],
        "id": row["id"][:8],
        "scores": " ".join(f"{k}={_cell(v)}" for k, v in detectors.items()) or None,
    }


@app.command("logs")
def logs(
    client: Annotated[str | None, typer.Option(help="Only this client's queries")] = None,
    since: Annotated[
        str | None, typer.Option(help="ISO time or span back from now: 15m, 2h, 7d")
    ] = None,
    limit: Annotated[int, typer.Option(help="Newest N rows; 0 for all")] = 50,
    fmt: Annotated[Format, typer.Option("--format")] = Format.table,
) -> None:
    """Show the query log: one row per answered query, oldest first."""
    from server.querylog import fetch_queries

    moment = parse_since(since) if since else None
    engine = _database(_server_settings())
    rows = fetch_queries(
        engine, client=client, since=moment, limit=limit or None, newest_first=True
    )
    rows.reverse()
    flat = [_flatten_log_row(r) for r in rows]
    if fmt is Format.table:
        _emit([_compact_log_row(r) for r in flat], fmt, columns=_LOG_TABLE_COLUMNS)
    else:
        _emit(flat, fmt, columns=_LOG_COLUMNS)


@app.command("alerts")
def alerts(
    client: Annotated[str | None, typer.Option(help="Only this client's alerts")] = None,
    account: Annotated[
        str | None, typer.Option(help="Only this account's alerts (key and account level)")
    ] = None,
    since: Annotated[
        str | None, typer.Option(help="ISO time or span back from now: 15m, 2h, 7d")
    ] = None,
    fmt: Annotated[Format, typer.Option("--format")] = Format.table,
) -> None:
    """Show the detectors' alerts, oldest first; ``level`` says whether a key's own queries
    alarmed or its account's taken together."""
    from server.querylog import fetch_alerts

    engine = _database(_server_settings())
    rows = fetch_alerts(
        engine,
        client=client,
        account=account,
        since=parse_since(since) if since else None,
        limit=None,
    )
    _emit(
        rows,
        fmt,
        columns=[
            "time",
            "client",
            "level",
            "account",
            "detector",
            "query_count",
            "score",
            "threshold",
            "action",
        ],
    )
