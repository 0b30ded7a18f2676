"""The ``mlaas`` command line.

This module composes the testbed's halves, so it is the one place in the shared package that
reaches into ``server`` (and later ``attacker``); it does so inside each command, which also
keeps ``mlaas --help`` and ``mlaas keys`` fast (no torch import).
Results go to standard output; messages and progress to standard error, so that scripts can
capture a command's output (``KEY=$(mlaas keys create alice)``).
"""

from __future__ import annotations

import copy
import csv
import json
import os
import re
import sys
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from mlaas.shifts import CALIBRATION_SHIFTS

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

    from server.db import SchemaOutdated, init_db, make_engine

    # The server's timeouts, but no statement limit: an export of a whole log may take long.
    engine = make_engine(
        settings.resolved_database_url,
        **{**settings.database_options, "statement_timeout_s": None},
    )
    try:
        init_db(engine)
    except SchemaOutdated as exc:
        raise fail(str(exc)) from exc
    except OperationalError as exc:
        raise fail(f"the database does not answer: {exc.orig}") from exc
    return engine


@datasets_app.command("list")
def datasets_list() -> None:
    """List the data sets the testbed knows, and whether each works offline."""
    from mlaas.datasets import describe_datasets

    table = Table("name", "splits", "shape", "offline", "description")
    for info in describe_datasets():
        table.add_row(
            info["name"],
            ", ".join(info["splits"]),
            str(info["native_shape"]),
            "yes" if info["offline"] else "no",
            info["description"],
        )
    out.print(table)


@datasets_app.command("prepare")
def datasets_prepare(
    names: Annotated[list[str], typer.Argument(help="Data sets to make available locally")],
) -> None:
    """Find or fetch data sets now (Debian's package, MLAAS_DATA_DIR or a download)."""
    from mlaas.datasets import DatasetUnavailable, load_dataset

    for name in names:
        try:
            loaded = load_dataset(name)
        except (DatasetUnavailable, ValueError) as exc:
            raise fail(str(exc)) from exc
        err.print(f"[green]{name}[/]: {len(loaded)} images at {loaded.shape}")


@victim_app.command("train")
def victim_train(
    out_dir: Annotated[Path, typer.Option("--out", help="Directory to write")] = Path(
        "var/victims/fashion"
    ),
    dataset: Annotated[str, typer.Option(help="Registered data set or ImageFolder path")] = (
        "fashion-mnist"
    ),
    arch: Annotated[str, typer.Option(help="Architecture (see mlaas.models)")] = "cnn-small",
    epochs: int = 3,
    batch_size: int = 128,
    optimizer: Annotated[str, typer.Option(help="adam or sgd")] = "adam",
    lr: Annotated[float | None, typer.Option(help="Default per optimizer")] = None,
    schedule: Annotated[str, typer.Option(help="none, cosine, onecycle or step")] = "onecycle",
    augment: bool = False,
    pretrained: Annotated[
        str | None, typer.Option(help="'imagenet' for torchvision's weights (needs them)")
    ] = None,
    input_shape: Annotated[
        str | None, typer.Option(help="CxHxW, default: the data set's, enlarged if needed")
    ] = None,
    seed: int = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1, ...")] = "auto",
    name: Annotated[str | None, typer.Option(help="Model name in the card")] = None,
    train_size: Annotated[
        int | None, typer.Option(help="Train on a seeded subset of this size (quick trials)")
    ] = None,
) -> None:
    """Train a victim model and write a directory that `mlaas serve --victim` takes."""
    from mlaas.datasets import DatasetUnavailable
    from mlaas.images import InputShape
    from mlaas.models import PretrainedWeightsUnavailable
    from mlaas.training import TrainConfig
    from server.victim import train_victim

    try:
        config = TrainConfig(
            epochs=epochs,
            batch_size=batch_size,
            optimizer=optimizer,
            lr=lr,
            schedule=schedule,
            augment=augment,
            seed=seed,
            device=device,
        )
        shape = InputShape.parse(input_shape) if input_shape else None
        card = train_victim(
            out_dir,
            dataset=dataset,
            arch=arch,
            config=config,
            shape=shape,
            pretrained=pretrained,
            name=name,
            train_size=train_size,
        )
    except (DatasetUnavailable, PretrainedWeightsUnavailable, ValueError) as exc:
        raise fail(str(exc)) from exc
    err.print(
        f"[green]victim written to {out_dir}[/]: {card.architecture} on {card.dataset}, "
        f"test accuracy {card.test_accuracy:.2%}, {card.training_seconds:.0f} s"
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


# ---------------------------------------------------------------------------- attacks
Url = Annotated[str, typer.Option(envvar="MLAAS_URL", help="The prediction API's base URL")]
Keys = Annotated[
    list[str],
    typer.Option(
        "--key", envvar="MLAAS_KEY", help="API key; repeat to spread queries over several keys"
    ),
]
Out = Annotated[Path, typer.Option("--out", help="Run directory (rerun it to resume)")]
Budget = Annotated[int, typer.Option(help="Hard limit on images the victim answers")]
Transfer = Annotated[
    str | None, typer.Option(help="Transfer set: a registered data set or an ImageFolder path")
]
Arch = Annotated[str, typer.Option(help="Substitute architecture (independent of the victim's)")]
Epochs = Annotated[int | None, typer.Option(help="Substitute training epochs per checkpoint")]
EvalKey = Annotated[
    str | None,
    typer.Option(help="Experimenter key for the victim's test labels (fidelity); not budgeted"),
]
Oracle = Annotated[
    Path | None,
    typer.Option(help="Victim labels from `mlaas victim oracle`, instead of --eval-key"),
]
TestSet = Annotated[str, typer.Option(help="Where accuracy and fidelity are measured")]
EvalSize = Annotated[int | None, typer.Option(help="Seeded subset of the test set")]
Checkpoints = Annotated[
    str, typer.Option(help="Budgets at which the substitute is trained and measured")
]
Seed = Annotated[int, typer.Option(help="Seeds every random choice")]
Throttle = Annotated[float | None, typer.Option(help="At most this many images per second")]
Concurrency = Annotated[int, typer.Option(help="Requests in flight at once")]
QueryBatch = Annotated[int, typer.Option(help="Images per request")]
Cover = Annotated[
    str | None, typer.Option(help="Cover traffic data set, interleaved with the attack's queries")
]
CoverRate = Annotated[float, typer.Option(help="Share of the budget spent on cover traffic")]
Pretrained = Annotated[str | None, typer.Option(help="'imagenet' for a pretrained substitute")]
Quiet = Annotated[bool, typer.Option("--quiet", help="No progress bars")]


def _attack(attack: str, options: dict[str, Any]) -> None:
    from attacker.attacks import AttackConfig
    from attacker.client import BudgetExhausted, KeyRefused, RateLimited
    from attacker.runner import ConfigMismatch, run_attack
    from mlaas.datasets import DatasetUnavailable
    from mlaas.models import PretrainedWeightsUnavailable

    run_options = {
        k: options.pop(k)
        for k in ("url", "key", "out", "eval_key", "oracle", "throttle", "concurrency",
                  "query_batch", "quiet")
    }  # fmt: skip
    try:
        checkpoints = [int(c) for c in options.pop("checkpoints").split(",") if c.strip()]
        given = {k: v for k, v in options.items() if v is not None}  # None: not given
        config = AttackConfig.for_attack(attack, checkpoints=checkpoints, **given)
        metrics = run_attack(
            config,
            url=run_options["url"],
            keys=run_options["key"],
            out=run_options["out"],
            eval_key=run_options["eval_key"],
            oracle=run_options["oracle"],
            query_batch=run_options["query_batch"],
            concurrency=run_options["concurrency"],
            throttle_qps=run_options["throttle"],
            progress=not run_options["quiet"],
            console=err,
        )
    except (
        KeyRefused, RateLimited, BudgetExhausted, ConfigMismatch, DatasetUnavailable,
        PretrainedWeightsUnavailable, ValueError,
    ) as exc:  # fmt: skip
        raise fail(str(exc)) from exc
    final = metrics["final"]
    fidelity = final["fidelity"]
    err.print(
        f"[green]done[/]: {final['queries']} queries, substitute accuracy {final['accuracy']:.2%}"
        + (f", fidelity {fidelity:.2%}" if fidelity is not None else "")
        + f"; run directory {run_options['out']}"
    )
    print(json.dumps(final))


_DEFAULT_CHECKPOINTS = "500,1000,2000,5000,10000"


@attack_app.command("knockoff")
def attack_knockoff(
    url: Url,
    key: Keys,
    out: Out = Path("runs/knockoff"),
    budget: Budget = 5000,
    transfer: Transfer = "natural-crops",
    strategy: Annotated[str, typer.Option(help="random or adaptive (gradient bandit)")] = "random",
    reward: Annotated[str, typer.Option(help="adaptive reward: cert, div, loss or all")] = "all",
    clusters: Annotated[int, typer.Option(help="adaptive actions when the set has no labels")] = 20,
    arch: Arch = "cnn-small",
    pretrained: Pretrained = None,
    epochs: Epochs = None,
    label_only: Annotated[bool, typer.Option(help="Train on top-1 labels only")] = False,
    checkpoints: Checkpoints = _DEFAULT_CHECKPOINTS,
    eval_key: EvalKey = None,
    oracle: Oracle = None,
    test_set: TestSet = "fashion-mnist:test",
    eval_size: EvalSize = None,
    cover: Cover = None,
    cover_rate: CoverRate = 0.0,
    throttle: Throttle = None,
    concurrency: Concurrency = 4,
    query_batch: QueryBatch = 64,
    seed: Seed = 0,
    quiet: Quiet = False,
) -> None:
    """Knockoff nets: natural images from another distribution, labelled by the victim."""
    _attack("knockoff", dict(locals()))


@attack_app.command("realistic")
def attack_realistic(
    url: Url,
    key: Keys,
    out: Out = Path("runs/realistic"),
    budget: Budget = 5000,
    transfer: Transfer = "fashion-mnist:pool",
    arch: Arch = "cnn-small",
    pretrained: Pretrained = None,
    epochs: Annotated[
        int | None, typer.Option(help="Most epochs; early stopping ends sooner")
    ] = None,
    patience: Annotated[int | None, typer.Option(help="Early-stopping patience (epochs)")] = None,
    checkpoints: Checkpoints = _DEFAULT_CHECKPOINTS,
    eval_key: EvalKey = None,
    oracle: Oracle = None,
    test_set: TestSet = "fashion-mnist:test",
    eval_size: EvalSize = None,
    cover: Cover = None,
    cover_rate: CoverRate = 0.0,
    throttle: Throttle = None,
    concurrency: Concurrency = 4,
    query_batch: QueryBatch = 64,
    seed: Seed = 0,
    quiet: Quiet = False,
) -> None:
    """Atli et al.'s realistic adversary: in-domain public data and strong training choices
    (augmentation, LR schedule, early stopping on a split of its own queries)."""
    _attack("realistic", dict(locals()))


@attack_app.command("copycat")
def attack_copycat(
    url: Url,
    key: Keys,
    out: Out = Path("runs/copycat"),
    budget: Budget = 5000,
    transfer: Transfer = "natural-crops",
    arch: Arch = "cnn-small",
    pretrained: Pretrained = None,
    epochs: Epochs = None,
    checkpoints: Checkpoints = _DEFAULT_CHECKPOINTS,
    eval_key: EvalKey = None,
    oracle: Oracle = None,
    test_set: TestSet = "fashion-mnist:test",
    eval_size: EvalSize = None,
    throttle: Throttle = None,
    concurrency: Concurrency = 4,
    query_batch: QueryBatch = 64,
    seed: Seed = 0,
    quiet: Quiet = False,
) -> None:
    """Copycat CNN: non-problem-domain images, trained on the victim's labels only."""
    _attack("copycat", dict(locals()))


@attack_app.command("jbda")
def attack_jbda(
    url: Url,
    key: Keys,
    out: Out = Path("runs/jbda"),
    budget: Budget = 5000,
    transfer: Annotated[str | None, typer.Option(help="Where the seed set comes from")] = (
        "fashion-mnist:pool"
    ),
    seed_size: Annotated[int, typer.Option(help="Initial in-domain images")] = 150,
    jbda_lambda: Annotated[
        float, typer.Option("--lambda", help="Step size, in [0, 1] pixels")
    ] = 0.1,
    jbda_tau: Annotated[int, typer.Option("--tau", help="Rounds between sign flips")] = 3,
    arch: Arch = "cnn-small",
    epochs: Epochs = None,
    eval_key: EvalKey = None,
    oracle: Oracle = None,
    test_set: TestSet = "fashion-mnist:test",
    eval_size: EvalSize = None,
    throttle: Throttle = None,
    concurrency: Concurrency = 4,
    query_batch: QueryBatch = 64,
    seed: Seed = 0,
    quiet: Quiet = False,
) -> None:
    """Papernot et al.'s JBDA: a small seed set, doubled each round along the substitute's
    Jacobian, every round queried through the API."""
    _attack("jbda", {**locals(), "checkpoints": ""})


@victim_app.command("oracle")
def victim_oracle(
    victim: Annotated[Path, typer.Option(help="Victim directory")] = Path("var/victims/fashion"),
    test_set: TestSet = "fashion-mnist:test",
    out: Annotated[Path, typer.Option("--out", help=".npy file to write")] = Path("var/oracle.npy"),
) -> None:
    """Write the victim's top-1 labels on a test split: an attack's fidelity reference."""
    import numpy as np

    from mlaas.datasets import load_dataset
    from mlaas.modelstore import load_model
    from mlaas.training import predict_proba

    model, card = load_model(victim)
    labels = predict_proba(model, load_dataset(test_set, card.shape)).argmax(axis=1)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, labels.astype(np.int64))
    err.print(f"wrote {len(labels)} victim labels on {test_set} to {out}")


@defense_app.command("train")
def defense_train(
    names: Annotated[
        list[str],
        typer.Argument(
            help="Detectors: ood-binary, msp, mahalanobis, prada, all, or default (the set "
            "`mlaas serve --detector default` serves)"
        ),
    ],
    victim: Annotated[Path, typer.Option(help="Victim directory")] = Path("var/victims/fashion"),
    outliers: Annotated[
        str,
        typer.Option(
            help="Out-of-distribution images for ood-binary (default: crops of half of the "
            "photographs; the other half, natural-crops:photos-a, stays held out)"
        ),
    ] = "natural-crops:photos-b",
    calibrate_on: Annotated[
        str,
        typer.Option(
            help="Benign-shift families to calibrate on (comma-separated, or all); "
            "see mlaas.shifts. The rest stay held out for bench/detection.py"
        ),
    ] = ",".join(CALIBRATION_SHIFTS),
    size: Annotated[int, typer.Option(help="Images per training and calibration set")] = 10_000,
    false_alarm_rate: Annotated[
        float, typer.Option(help="Chance that a benign client of --stream-length queries alarms")
    ] = 0.001,
    stream_length: int = 1000,
    out: Annotated[
        Path | None, typer.Option(help="Artifact directory; default <victim>/defense")
    ] = None,
    seed: int = 0,
) -> None:
    """Fit and calibrate detectors; `mlaas serve --detector NAME` finds them."""
    from defense.detectors import DEFAULT_DETECTORS
    from defense.training import TRAINABLE, train_detectors
    from mlaas.datasets import DatasetUnavailable

    chosen = {"all": list(TRAINABLE), "default": list(DEFAULT_DETECTORS)}.get(
        ",".join(names), names
    )
    try:
        with err.status(f"training {', '.join(chosen)}"):
            reports = train_detectors(
                chosen,
                victim,
                outliers=outliers,
                calibrate_on=calibrate_on,
                size=size,
                false_alarm_rate=false_alarm_rate,
                stream_length=stream_length,
                out_dir=out,
                seed=seed,
            )
    except (DatasetUnavailable, FileNotFoundError, ValueError) as exc:
        raise fail(str(exc)) from exc
    for name, meta in reports.items():
        if name == "prada":
            err.print(
                f"[green]prada[/]: delta {meta['delta']:.4f}, below the lowest W of "
                f"{meta['benign_streams']} benign streams of {meta['stream_length']} queries"
            )
            continue
        auc = f", held-out AUC {meta['held_out_auc']:.4f}" if "held_out_auc" in meta else ""
        err.print(
            f"[green]{name}[/]: CUSUM drift {meta['drift']:.4g}, threshold "
            f"{meta['threshold']:.4g} (false-alarm rate {meta['false_alarm_rate']} per "
            f"{meta['stream_length']} queries){auc}"
        )


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


@experiment_app.command("run")
def experiment_run(
    config: Annotated[Path, typer.Argument(help="Experiment YAML (see experiments/)")],
    out: Annotated[
        Path | None, typer.Option("--out", help="Run directory; default var/experiments/NAME")
    ] = None,
    report: Annotated[bool, typer.Option(help="Write the report at the end")] = True,
) -> None:
    """Run every cell of the matrix (resumable: finished cells are skipped)."""
    from pydantic import ValidationError

    from mlaas.experiments.config import ExperimentConfig
    from mlaas.experiments.report import write_report
    from mlaas.experiments.runner import run_experiment

    try:
        parsed = ExperimentConfig.load(config)
    except (ValidationError, ValueError, FileNotFoundError) as exc:
        raise fail(f"{config}: {exc}") from exc
    directory = out or Path("var/experiments") / parsed.name

    def show(cell, record):
        if record["status"] == "ok":
            final = record["metrics"]["final"]
            err.print(
                f"  [green]ok[/] {cell.attacker.name} ({cell.granularity}, {cell.defense.name}): "
                f"accuracy {final['accuracy']:.2%}, alerts {record['alerts'] or '-'}"
            )
        else:
            err.print(f"  [red]failed[/] {cell.id}: {record['error']}")

    counts = run_experiment(
        parsed, directory, console=err, config_text=config.read_text(), on_cell=show
    )
    err.print(
        f"{counts['cells']} cells: {counts['ok']} run, {counts['skipped']} already done, "
        f"{counts['failed']} failed; results in {directory}"
    )
    if report:
        print(write_report(directory))


@experiment_app.command("report")
def experiment_report(
    directory: Annotated[Path, typer.Argument(help="A directory `mlaas experiment run` wrote")],
) -> None:
    """Write report.md and figures/ from an experiment's records."""
    from mlaas.experiments.report import write_report

    if not (directory / "cells").is_dir():
        raise fail(f"{directory} holds no experiment records (no cells/ directory)")
    print(write_report(directory))


@app.command("demo")
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the demo writes")] = Path("var/demo"),
    victim: Annotated[Path, typer.Option(help="Victim directory; trained if missing")] = Path(
        "var/victims/fashion"
    ),
    benign_clients: Annotated[int, typer.Option(help="Benign clients")] = 3,
    benign_queries: Annotated[int, typer.Option(help="Queries per benign client")] = 300,
    budget: Annotated[int, typer.Option(help="Queries per attacker")] = 1000,
    eval_size: Annotated[int, typer.Option(help="Test images for accuracy/fidelity")] = 2000,
) -> None:
    """The testbed in one command: serve the victim with detectors, let benign clients and
    three attackers at it side by side, and report who stole what and who was caught."""
    from mlaas.demo import DemoPlan, run_demo

    plan = DemoPlan(
        benign_clients=benign_clients,
        benign_queries=benign_queries,
        knockoff_budget=budget,
        realistic_budget=budget,
        jbda_budget=max(budget, 300),
        eval_size=eval_size,
    )
    run_demo(victim_dir=victim, workdir=workdir, console=err, out=out, plan=plan)


def main() -> None:
    app()
