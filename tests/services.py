"""Private, throw-away Redis and PostgreSQL servers for fault-tolerance tests.

The shared servers on 6379 and 5432 serve every other test, so stopping them to see how the
API copes would break those tests. These helpers start real servers of the same kind on a free
loopback port, in a temporary directory, and can stop and restart them at will.

Every server is a direct child of the test process (no daemonising), so ``poll()`` tells
whether it is still alive, ``wait()`` reaps it, and the kernel kills it if the test process
itself dies (``PR_SET_PDEATHSIG``), e.g. when a CI timeout SIGKILLs pytest.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, TypeVar

import psycopg
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from testbed.serverproc import free_port

__all__ = [
    "PrivatePostgres",
    "PrivateRedis",
    "ServiceError",
    "ServiceUnavailable",
    "StopMode",
    "find_postgres_bindir",
    "make_postgres_template",
    "new_or_skip",
    "private_postgres",
    "private_postgres_template",
    "private_redis",
]

StopMode = Literal["smart", "fast", "immediate"]
_T = TypeVar("_T")


class ServiceError(RuntimeError):
    """A private server failed to start or stop."""


class ServiceUnavailable(ServiceError):
    """The server's binaries (or, under root, the ``postgres`` user) are not installed."""


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGKILL when the test process dies.

    The signal follows the *thread* that forked, not the process: from a worker thread that
    later exits it would kill a server the test still uses, so it is only armed from the main
    thread. It runs after ``Popen`` has switched user (tested), as a change of credentials
    would otherwise clear it.
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return None

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)

    return arm


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return "(no log)"


_SCRATCH_PREFIX = "mlaas-svc-"
_swept: set[Path] = set()


def _scratch_root() -> Path | None:
    """Where server directories go: tmpfs when there is room, else the usual temp dir.

    On this project's machines initdb takes ~0.5 s on /dev/shm against ~2 s on a busy disk,
    and copying a template 0.04 s against ~1.3 s. ``MLAAS_TEST_SERVICES_DIR`` overrides it.
    """
    if override := os.environ.get("MLAAS_TEST_SERVICES_DIR"):
        return Path(override)
    shm = Path("/dev/shm")
    try:
        stats = os.statvfs(shm)
    except OSError:
        return None
    if stats.f_bavail * stats.f_frsize < 1 << 30 or not os.access(shm, os.W_OK | os.X_OK):
        return None
    return shm


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        pass
    return True


def _sweep(root: Path) -> None:
    """Delete directories left by test processes that died without cleaning up.

    Their servers died with them (see ``_die_with_parent``), but on tmpfs the files would
    hold memory until reboot. The creator's pid is in each name; live ones are left alone.
    """
    for entry in root.glob(f"{_SCRATCH_PREFIX}*"):
        owner = entry.name.removeprefix(_SCRATCH_PREFIX).split("-", 1)[0]
        if owner.isdigit() and int(owner) != os.getpid() and not _pid_alive(int(owner)):
            shutil.rmtree(entry, ignore_errors=True)


def _scratch_dir(kind: str) -> Path:
    root = _scratch_root()
    resolved = root or Path(tempfile.gettempdir())
    if resolved not in _swept:
        _swept.add(resolved)
        _sweep(resolved)
    return Path(tempfile.mkdtemp(prefix=f"{_SCRATCH_PREFIX}{os.getpid()}-{kind}-", dir=root))


def _wait_dead(process: subprocess.Popen[bytes], timeout: float) -> None:
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


class _Server(ABC):
    """Started on entering a ``with`` block, closed (killed, directory removed) on leaving it,
    even when starting fails half-way."""

    _process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The server's pid while it runs (the postmaster's, for PostgreSQL)."""
        return self._process.pid if self.running else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @abstractmethod
    def start(self) -> Self: ...

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class PrivateRedis(_Server):
    """A ``redis-server`` of our own on a free loopback port, without persistence by default.

    ``stop()`` SIGKILLs it by default: a sudden loss is the fault worth testing, and with no
    persistence SIGTERM would lose the same data anyway. With ``appendonly=True`` it keeps an
    append-only file, so a restart (even after SIGKILL: Redis writes each command to the file
    before it replies, and the kernel keeps what a killed process wrote) comes back with its
    data, as a deployed Redis would.
    """

    def __init__(
        self, *, port: int | None = None, binary: str | None = None, appendonly: bool = False
    ) -> None:
        found = binary or shutil.which("redis-server")
        if found is None:
            raise ServiceUnavailable("redis-server is not on PATH")
        self.binary = found
        self.port = port or free_port()
        self.appendonly = appendonly
        self.base = _scratch_dir("redis")
        self.log = self.base / "redis.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._closed = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, **kwargs: Any) -> redis.Redis:
        """A client that fails at once instead of retrying, so a test sees the outage."""
        options: dict[str, Any] = {"socket_timeout": 5, "retry": Retry(NoBackoff(), 0)}
        return redis.Redis.from_url(self.url, **{**options, **kwargs})

    def start(self, timeout: float = 15.0) -> Self:
        if self._closed:
            raise ServiceError("this PrivateRedis is closed")
        if self.running:
            return self
        command = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--dir", str(self.base),
            "--daemonize", "no",
            "--logfile", "",
        ]  # fmt: skip
        with self.log.open("ab") as log:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.base,
                preexec_fn=_die_with_parent(),
            )
        process = self._process
        probe = self.client(socket_connect_timeout=1, socket_timeout=1)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if process.poll() is not None:
                    raise ServiceError(
                        f"redis-server on port {self.port} exited with {process.returncode} "
                        f"during start-up:\n{_tail(self.log)}"
                    )
                try:
                    # A PING could be answered by a stranger that took the port first.
                    if probe.info("server").get("process_id") == process.pid:
                        return self
                except redis.RedisError:
                    pass
                if time.monotonic() > deadline:
                    self._kill()
                    raise ServiceError(
                        f"redis-server on port {self.port} did not answer within {timeout}s:\n"
                        f"{_tail(self.log)}"
                    )
                time.sleep(0.02)
        finally:
            probe.close()

    def stop(self, *, graceful: bool = False, timeout: float = 15.0) -> None:
        """Stop the server and reap it, so the port refuses connections on return."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM if graceful else signal.SIGKILL)
        _wait_dead(self._process, timeout)
        self._process = None

    def restart(self, *, graceful: bool = False, timeout: float = 15.0) -> Self:
        self.stop(graceful=graceful, timeout=timeout)
        return self.start(timeout)

    def _kill(self) -> None:
        if self._process is not None:
            if self._process.poll() is None:
                self._process.kill()
            _wait_dead(self._process, 10)
            self._process = None

    def close(self) -> None:
        """Kill the server if it runs and remove its directory; safe to call twice."""
        try:
            self._kill()
        finally:
            self._closed = True
            shutil.rmtree(self.base, ignore_errors=True)


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", path.parent.name))


def find_postgres_bindir() -> Path | None:
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres``.

    Debian keeps them off PATH under /usr/lib/postgresql/<major>/bin; the newest major wins.
    ``MLAAS_TEST_PG_BINDIR`` overrides the search.
    """
    needed = ("initdb", "pg_ctl", "postgres")
    candidates: list[Path] = []
    if override := os.environ.get("MLAAS_TEST_PG_BINDIR"):
        candidates.append(Path(override))
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True)
    if on_path := shutil.which("pg_ctl"):
        candidates.append(Path(on_path).resolve().parent)
    for candidate in candidates:
        if all(os.access(candidate / name, os.X_OK) for name in needed):
            return candidate
    return None


def _postgres_identity() -> dict[str, Any]:
    """``Popen`` arguments that run PostgreSQL's tools as a user they accept.

    initdb, pg_ctl and postgres all refuse to run as root. Under root (as in CI) they run as
    the ``postgres`` system user, switched to inside ``Popen`` rather than through runuser so
    the server stays our direct child; supplementary groups are dropped with it.
    """
    if os.geteuid() != 0:
        return {}
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        raise ServiceUnavailable(
            "running as root, but there is no 'postgres' user to run PostgreSQL as"
        ) from None
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def _give_to_postgres_user(path: Path) -> None:
    identity = _postgres_identity()
    if not identity:
        return
    os.chown(path, identity["user"], identity["group"])
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(root, name), identity["user"], identity["group"])


def _postgres_env() -> dict[str, str]:
    # A stray PGDATA/PGPORT/PGHOST from the caller must not steer pg_ctl to the shared server.
    return {key: value for key, value in os.environ.items() if not key.startswith("PG")}


def _run_postgres_tool(command: list[str], cwd: Path, timeout: float) -> None:
    result = subprocess.run(
        command,
        cwd=cwd,
        env=_postgres_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
        **_postgres_identity(),
    )
    if result.returncode != 0:
        output = (result.stdout + result.stderr).decode(errors="replace")
        raise ServiceError(f"{Path(command[0]).name} failed ({result.returncode}):\n{output}")


def make_postgres_template(
    directory: Path, *, bindir: Path | None = None, timeout: float = 120.0
) -> Path:
    """initdb a cluster into ``directory/data`` (which must not exist) and return it.

    Copying this is faster than a fresh initdb, so each test can get its own cluster.
    """
    bindir = bindir or find_postgres_bindir()
    if bindir is None:
        raise ServiceUnavailable("PostgreSQL binaries (initdb, pg_ctl, postgres) not found")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _give_to_postgres_user(directory)
    datadir = directory / "data"
    _run_postgres_tool(
        [
            str(bindir / "initdb"),
            "--pgdata", str(datadir),
            "--username", "postgres",
            "--auth", "trust",
            "--encoding", "UTF8",
            "--locale", "C",
            "--no-sync",  # nothing here has to survive a machine crash
            "--wal-segsize", "1",  # 1 MB instead of 16 MB to copy per cluster
            "--no-instructions",
        ],
        cwd=directory,
        timeout=timeout,
    )  # fmt: skip
    return datadir


class PrivatePostgres(_Server):
    """A PostgreSQL cluster of our own, in a temporary directory, on a free loopback port.

    The cluster is created on the first ``start()``: by initdb, or by copying ``template``
    (a data directory from ``make_postgres_template``). Restarts keep the data directory, so
    committed rows survive both ``fast`` and ``immediate`` stops (the latter via crash
    recovery). fsync is off: the machine itself never crashes in these tests.
    """

    def __init__(
        self,
        *,
        template: Path | None = None,
        bindir: Path | None = None,
        port: int | None = None,
    ) -> None:
        found = bindir or find_postgres_bindir()
        if found is None:
            raise ServiceUnavailable("PostgreSQL binaries (initdb, pg_ctl, postgres) not found")
        self.bindir = found
        self.identity = _postgres_identity()
        self.template = template
        self.port = port or free_port()
        # Not pytest's tmp_path: that sits under a root-only directory the postgres user
        # cannot enter. A short path also keeps the socket under its 107-byte limit.
        self.base = _scratch_dir("pg")
        self.datadir = self.base / "data"
        self.log = self.base / "postgres.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._closed = False

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def conninfo(self) -> str:
        """The same target for plain psycopg."""
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"

    def _create_cluster(self) -> None:
        if self.template is None:
            make_postgres_template(self.base, bindir=self.bindir)
        else:
            shutil.copytree(self.template, self.datadir, symlinks=True)
            _give_to_postgres_user(self.base)
            # A template copied from a running or crashed cluster would refuse to start.
            (self.datadir / "postmaster.pid").unlink(missing_ok=True)

    def start(self, timeout: float = 60.0) -> Self:
        if self._closed:
            raise ServiceError("this PrivatePostgres is closed")
        if self.running:
            return self
        if not (self.datadir / "PG_VERSION").exists():
            self._create_cluster()
        # Options on the command line, not in postgresql.conf, so templates stay neutral.
        command = [
            str(self.bindir / "postgres"),
            "-D", str(self.datadir),
            "-p", str(self.port),
            "-c", "listen_addresses=127.0.0.1",
            "-c", f"unix_socket_directories={self.base}",
            # fsync=off only skips flushes to disk; committed WAL still reaches the OS, so it
            # survives an immediate stop. synchronous_commit=off would not: it leaves recent
            # commits in shared memory, lost when the server is killed.
            "-c", "fsync=off",
            "-c", "full_page_writes=off",
        ]  # fmt: skip
        with self.log.open("ab") as log:
            self._process = subprocess.Popen(
                command,
                cwd=self.base,
                env=_postgres_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent(),
                **self.identity,
            )
        process = self._process
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                self._process = None
                raise ServiceError(
                    f"postgres on port {self.port} exited with {process.returncode} during "
                    f"start-up:\n{_tail(self.log)}"
                )
            try:
                with psycopg.connect(self.conninfo, connect_timeout=2) as connection:
                    # A stranger that took the port first would answer too.
                    row = connection.execute("SHOW data_directory").fetchone()
                if row is not None and Path(row[0]).resolve() == self.datadir.resolve():
                    return self
            except psycopg.OperationalError:
                pass
            if time.monotonic() > deadline:
                self._kill()
                raise ServiceError(
                    f"postgres on port {self.port} not ready within {timeout}s:\n{_tail(self.log)}"
                )
            time.sleep(0.02)

    def stop(self, mode: StopMode = "fast", timeout: float = 60.0) -> None:
        """Shut down with ``pg_ctl stop -m mode`` and reap the postmaster.

        ``fast`` disconnects clients and checkpoints; ``immediate`` drops everything like a
        crash, leaving recovery to the next start.
        """
        if self._process is None:
            return
        process = self._process
        if process.poll() is None:
            _run_postgres_tool(
                [
                    str(self.bindir / "pg_ctl"), "stop",
                    "--pgdata", str(self.datadir),
                    "--mode", mode,
                    "--wait", "--timeout", str(int(timeout)),
                    "--silent",
                ],
                cwd=self.base,
                timeout=timeout + 10,
            )  # fmt: skip
        _wait_dead(process, timeout)
        self._process = None

    def restart(self, mode: StopMode = "fast", timeout: float = 60.0) -> Self:
        self.stop(mode, timeout)
        return self.start(timeout)

    def _kill(self) -> None:
        if self._process is None:
            return
        if self._process.poll() is None:
            # Backends notice their postmaster's death and exit by themselves.
            self._process.kill()
        _wait_dead(self._process, 10)
        self._process = None

    def close(self) -> None:
        """Stop the cluster if it runs and delete it; safe to call twice."""
        try:
            with contextlib.suppress(ServiceError, subprocess.TimeoutExpired):
                self.stop("immediate", timeout=20)
        finally:
            try:
                self._kill()
            finally:
                self._closed = True
                shutil.rmtree(self.base, ignore_errors=True)


def new_or_skip(factory: Callable[[], _T]) -> _T:
    """``factory()``, but a missing server skips the test locally and fails it under CI."""
    try:
        return factory()
    except ServiceUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(f"{exc} (CI installs it: its absence there is a failure)")
        pytest.skip(str(exc))


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    """A running private Redis, killed and deleted after the test."""
    with new_or_skip(PrivateRedis) as server:
        yield server


@pytest.fixture(scope="session")
def private_postgres_template() -> Iterator[Path]:
    """One initdb per session (0.5-2 s), copied by each ``private_postgres`` (0.05-1 s)."""
    directory = _scratch_dir("pg-template")
    try:
        yield new_or_skip(lambda: make_postgres_template(directory))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def private_postgres(private_postgres_template: Path) -> Iterator[PrivatePostgres]:
    """A running private PostgreSQL cluster of the test's own, deleted afterwards.

    Function scope: a copy of the session's template starts in well under a second, and no
    test inherits another's rows or a cluster it left stopped.
    """
    with PrivatePostgres(template=private_postgres_template) as server:
        yield server
