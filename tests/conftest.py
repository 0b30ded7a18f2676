"""Shared fixtures: a small real victim, both databases, and in-process API clients."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from tests.helpers import ADMIN_TOKEN, REDIS_URL

POSTGRES_URL = os.environ.get(
    "MLAAS_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@pytest.fixture(scope="session")
def tiny_victim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """cnn-small trained for one epoch on 3,000 Fashion-MNIST images: quick, and far from
    random, so that agreement tests mean something."""
    from mlaas.training import TrainConfig
    from testbed.victim import train_victim

    directory = tmp_path_factory.mktemp("victim")
    train_victim(
        directory,
        config=TrainConfig(epochs=1, seed=0),
        train_size=3000,
        name="tiny-fashion",
        progress=False,
    )
    return directory


def _postgres_or_skip() -> None:
    try:
        with create_engine(POSTGRES_URL).connect() as connection:
            connection.execute(text("SELECT 1"))
    except OperationalError as exc:
        message = f"PostgreSQL at {POSTGRES_URL} is not reachable: {exc.orig}"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI starts PostgreSQL: its absence there is a failure
        pytest.skip(message)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A PostgreSQL URL whose tables live in a fresh schema, dropped afterwards."""
    _postgres_or_skip()
    schema = f"test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A key prefix of its own in the shared Redis at REDIS_URL, its keys deleted afterwards."""
    connection = redis.Redis.from_url(REDIS_URL)
    try:
        connection.ping()
    except redis.RedisError as exc:
        connection.close()
        if os.environ.get("CI"):
            pytest.fail(f"Redis at {REDIS_URL} is not reachable: {exc}")  # CI starts it
        pytest.skip(f"Redis at {REDIS_URL} is not reachable")
    prefix = f"test-{uuid.uuid4().hex[:10]}"
    yield prefix
    keys = list(connection.scan_iter(f"{prefix}:*"))
    if keys:
        connection.delete(*keys)
    connection.close()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'mlaas.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def make_client(tiny_victim: Path, tmp_path: Path) -> Iterator[Callable[..., TestClient]]:
    """Start the app in-process (lifespan included) with settings overrides."""
    from server.app import create_app
    from server.settings import ServerSettings

    with ExitStack() as stack:

        def make(**overrides: object) -> TestClient:
            settings = ServerSettings(
                **{
                    "victim_dir": tiny_victim,
                    "database_url": f"sqlite:///{tmp_path / 'api.db'}",
                    "admin_token": ADMIN_TOKEN,
                    "var_dir": tmp_path / "var",
                    **overrides,
                }
            )
            return stack.enter_context(TestClient(create_app(settings)))

        yield make


from tests.services import private_postgres, private_postgres_template, private_redis  # noqa: E402, F401


@pytest.fixture(scope="module")
def live(tiny_victim: Path, tmp_path_factory: pytest.TempPathFactory):
    """A real `mlaas serve` of the tiny victim on loopback, one per test module, with an
    admin client (``live.admin``) and its SQLite log's URL (``live.database``)."""
    from mlaas.apiclient import AdminClient
    from testbed.serverproc import ServerProcess

    directory = tmp_path_factory.mktemp("live")
    database = f"sqlite:///{directory / 'mlaas.db'}"
    server = ServerProcess(
        tiny_victim,
        env={"MLAAS_DATABASE_URL": database, "MLAAS_ADMIN_TOKEN": ADMIN_TOKEN},
        log_file=directory / "server.log",
    ).start()
    server.database = database  # type: ignore[attr-defined]
    server.admin = AdminClient(server.url, ADMIN_TOKEN)  # type: ignore[attr-defined]
    yield server
    server.admin.close()  # type: ignore[attr-defined]
    server.stop()
