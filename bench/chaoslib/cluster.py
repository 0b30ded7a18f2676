"""The cluster the chaos benchmark breaks: private PostgreSQL and Redis, two API replicas on
them, and the faults (kills, restarts, stalls) it injects."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

from bench.chaoslib.plan import ChaosPlan
from bench.common import save_victim
from mlaas.images import InputShape
from testbed.serverproc import ServerProcess
from tests.services import PrivatePostgres, PrivateRedis

REPLICAS = ("a", "b")
READY_TIMEOUT_S = 60.0


class Cluster:
    """Private PostgreSQL and Redis, and two replicas of the API on them."""

    def __init__(self, stack: ExitStack, victim: Path, plan: ChaosPlan, log_dir: Path) -> None:
        self.postgres = stack.enter_context(PrivatePostgres())
        self.redis = stack.enter_context(PrivateRedis(appendonly=True))
        self.admin_token = secrets.token_urlsafe(32)
        self.victim = victim
        self.log_dir = log_dir
        self.stall_s = plan.stall_s
        self.env = {
            "MLAAS_DATABASE_URL": self.postgres.url,
            "MLAAS_REDIS_URL": self.redis.url,
            "MLAAS_REDIS_PREFIX": "chaos",
            "MLAAS_ADMIN_TOKEN": self.admin_token,
            "MLAAS_LOG_MODE": "durable",
            "MLAAS_DETECTORS": plan.detectors,
            # PRADA's threshold given, so the random-init victim needs no calibration.
            "MLAAS_PRADA_DELTA": "0.95",
            "MLAAS_RATE_LIMIT": str(plan.rate_limit),
        }
        self.replicas: dict[str, ServerProcess] = {}
        for name in REPLICAS:  # a new run's logs, not appended to the last one's
            (log_dir / f"server-{name}.log").unlink(missing_ok=True)
        stack.callback(self.stop_replicas)
        # One after the other: both would create the tables at once otherwise.
        for name in REPLICAS:
            self.replicas[name] = self._replica(name).start()

    def _replica(self, name: str, port: int | None = None) -> ServerProcess:
        return ServerProcess(
            self.victim,
            port=port,
            env={**self.env, "MLAAS_VAR_DIR": str(self.log_dir / f"var-{name}")},
            log_file=self.log_dir / f"server-{name}.log",
        )

    @property
    def urls(self) -> list[str]:
        return [self.replicas[name].url for name in REPLICAS]

    def stop_replicas(self) -> None:
        for replica in self.replicas.values():
            replica.stop()  # graceful: a durable log has nothing pending, but say so anyway

    def kill_replica(self, name: str) -> None:
        old = self.replicas[name]
        old.kill()
        old.stop()  # reaps it and closes its log file
        self.replicas[name] = self._replica(name, port=old.port).start()

    def stall_replica(self, name: str, seconds: float) -> None:
        """Freeze a replica (SIGSTOP), as a long pause would: clients time out and resend to
        the other one; thawed, it finishes what it had started (and drops requests it had not
        read yet, their clients having gone)."""
        process = self.replicas[name].process
        if process is None or process.poll() is not None:
            raise RuntimeError(f"replica {name} is not running")
        _freeze([process.pid], seconds)

    def stall_postgres(self, seconds: float) -> None:
        """Freeze the whole cluster (SIGSTOP), as a stalled disk or a partition would: its
        sockets stay open and nothing answers, so commits hang instead of failing."""
        postmaster = self.postgres.pid
        if postmaster is None:
            raise RuntimeError("PostgreSQL is not running")
        _freeze([postmaster, *_children(postmaster)], seconds)

    def run_event(self, name: str) -> None:
        if name.startswith("kill-"):
            self.kill_replica(name.removeprefix("kill-"))
        elif name == "redis":
            self.redis.restart()
        elif name.startswith("postgres-"):
            self.postgres.restart(name.removeprefix("postgres-"))  # type: ignore[arg-type]
        elif name == "stall-postgres":
            self.stall_postgres(self.stall_s)
        elif name.startswith("stall-"):
            self.stall_replica(name.removeprefix("stall-"), self.stall_s)
        else:
            raise ValueError(f"unknown event {name!r}")

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        for url in self.urls:
            while True:
                try:
                    if httpx.get(f"{url}/readyz", timeout=2.0).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{url} not ready {timeout:.0f} s after the event")
                time.sleep(0.05)


def _freeze(pids: list[int], seconds: float) -> None:
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (PostgreSQL's backends), from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            # The command name in parentheses may hold spaces: the fields after it do not.
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def random_victim(root: Path, seed: int) -> Path:
    return save_victim(root, "cnn-small", InputShape(1, 28, 28), seed)
