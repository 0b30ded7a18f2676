"""Run ``mlaas serve`` as a real child process on loopback, as a user would.

The demo, the experiment harness and the end-to-end tests all start the provider this way,
so they exercise uvicorn, the lifespan and a graceful SIGTERM exactly as deployed.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import httpx


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class ServerStartError(RuntimeError):
    pass


class ServerProcess:
    def __init__(
        self,
        victim_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        env: dict[str, str] | None = None,
        extra_args: list[str] | None = None,
        log_file: Path | None = None,
    ) -> None:
        self.victim_dir = Path(victim_dir)
        self.host = host
        self.port = port or free_port(host)
        self.env = env or {}
        self.extra_args = extra_args or []
        self.log_file = log_file
        self.process: subprocess.Popen[bytes] | None = None
        self._log_handle: io.BufferedWriter | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 120.0) -> Self:
        command = [
            sys.executable, "-m", "testbed", "serve",
            "--victim", str(self.victim_dir),
            "--host", self.host,
            "--port", str(self.port),
            *self.extra_args,
        ]  # fmt: skip
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            self._log_handle = self.log_file.open("ab")
        output = self._log_handle or subprocess.DEVNULL
        self.process = subprocess.Popen(
            command, env={**os.environ, **self.env}, stdout=output, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerStartError(
                    f"mlaas serve exited with code {self.process.returncode} during start-up"
                    + (f"; see {self.log_file}" if self.log_file else "")
                )
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise ServerStartError(f"mlaas serve was not ready within {timeout:.0f} s")

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (uvicorn's graceful shutdown), then SIGKILL if it does not exit in time.

        Returns 0 for a clean stop: uvicorn re-raises the SIGTERM it handled once its shutdown
        is complete, so "killed by SIGTERM" after our SIGTERM is how a graceful exit looks.
        """
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        code = self.process.returncode
        return 0 if code == -signal.SIGTERM else code

    def kill(self) -> None:
        """Die at once, as a crash would: no shutdown, no flush."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> Self:
        return self.start() if self.process is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
