"""The private Redis and PostgreSQL helpers really stop, restart and clean up."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from tests.helpers import wait_until
from tests.services import PrivatePostgres, PrivateRedis, StopMode, new_or_skip


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone as a server but keeps its pid until reaped by init.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def _port_refuses(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_redis_set_get_stop_restart(private_redis: PrivateRedis) -> None:
    client = private_redis.client()
    client.set("key", "value")
    assert client.get("key") == b"value"
    port, pid = private_redis.port, private_redis.pid

    private_redis.stop()
    assert not private_redis.running
    with pytest.raises(redis.ConnectionError):
        private_redis.client().ping()
    assert pid is not None
    assert not _alive(pid)

    private_redis.restart()
    assert private_redis.port == port
    assert private_redis.pid != pid
    assert private_redis.client().ping() is True
    # No persistence: a restart is a clean slate, as a Redis outage would be.
    assert private_redis.client().get("key") is None


def test_redis_close_leaves_nothing() -> None:
    with new_or_skip(PrivateRedis) as server:
        pid, port, base = server.pid, server.port, server.base
        assert server.client().ping() is True
    assert pid is not None
    assert not _alive(pid)
    assert _port_refuses(port)
    assert not base.exists()


def test_redis_close_after_failed_test_leaves_nothing() -> None:
    server = new_or_skip(PrivateRedis)
    with pytest.raises(RuntimeError), server:
        pid = server.pid
        raise RuntimeError("the test failed")
    assert pid is not None
    assert not _alive(pid)


def test_private_redis_is_not_the_shared_one(private_redis: PrivateRedis) -> None:
    assert private_redis.port != 6379
    assert private_redis.client().info("server")["tcp_port"] == private_redis.port


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_postgres_row_survives_restart(private_postgres: PrivatePostgres, mode: StopMode) -> None:
    engine = create_engine(private_postgres.url)
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE item (id integer PRIMARY KEY, name text)"))
        connection.execute(text("INSERT INTO item VALUES (1, 'kept')"))
    engine.dispose()
    port, pid = private_postgres.port, private_postgres.pid

    private_postgres.stop(mode)
    assert not private_postgres.running
    assert pid is not None
    assert not _alive(pid)
    with pytest.raises(OperationalError):
        create_engine(private_postgres.url).connect()

    private_postgres.restart()
    assert private_postgres.port == port
    engine = create_engine(private_postgres.url)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT name FROM item")).scalar_one() == "kept"
    engine.dispose()


def test_postgres_stop_breaks_open_connections(private_postgres: PrivatePostgres) -> None:
    engine = create_engine(private_postgres.url)
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))
        private_postgres.restart()
        with pytest.raises(OperationalError):
            connection.execute(text("SELECT 1"))
    engine.dispose()


def test_private_postgres_is_not_the_shared_one(private_postgres: PrivatePostgres) -> None:
    assert private_postgres.port != 5432
    engine = create_engine(private_postgres.url)
    with engine.connect() as connection:
        directory = connection.execute(text("SHOW data_directory")).scalar_one()
        listen = connection.execute(text("SHOW listen_addresses")).scalar_one()
        sockets = connection.execute(text("SHOW unix_socket_directories")).scalar_one()
    engine.dispose()
    assert Path(directory) == private_postgres.datadir
    assert listen == "127.0.0.1"
    assert Path(sockets) == private_postgres.base


def test_postgres_close_leaves_nothing(private_postgres_template: Path) -> None:
    with PrivatePostgres(template=private_postgres_template) as server:
        engine = create_engine(server.url)
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
            pid, port, base = server.pid, server.port, server.base
            assert pid is not None
            processes = [pid, *_children(pid)]
            assert len(processes) > 1  # checkpointer, walwriter, this backend...
    engine.dispose()
    wait_until(
        lambda: not any(_alive(pid) for pid in processes),
        10,
        interval=0.05,
        what=f"processes {processes} to be gone",
    )
    assert _port_refuses(port)
    assert not base.exists()


def test_postgres_without_template_initdbs() -> None:
    with new_or_skip(PrivatePostgres) as server:
        engine = create_engine(server.url)
        with engine.connect() as connection:
            assert connection.execute(text("SELECT current_user")).scalar_one() == "postgres"
        engine.dispose()
        pid = server.pid
    assert pid is not None
    assert not _alive(pid)
