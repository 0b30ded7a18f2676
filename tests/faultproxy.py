"""A reverse proxy on loopback that injects 429 and 5xx answers before the real server.

It forwards to a real ``mlaas serve``; faults follow a fixed schedule by request number, so a
test knows exactly what the client went through.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from testbed.serverproc import free_port
from tests.helpers import wait_until


class FaultProxy:
    def __init__(self, upstream: str, faults: dict[int, str]) -> None:
        """``faults`` maps a 1-based POST number to ``"429"`` (with Retry-After), ``"503"``
        or ``"502"``; the faulty request never reaches the upstream."""
        self.upstream = upstream
        self.faults = faults
        self.posts = 0
        self.injected: list[str] = []
        self.forwarded = 0
        self.port = free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, request: Request) -> Response:
        if request.method == "POST":
            self.posts += 1
            fault = self.faults.get(self.posts)
            if fault is not None:
                self.injected.append(fault)
                await request.body()
                if fault == "429":
                    return JSONResponse(
                        {"error": {"code": "rate_limited", "message": "slow down"}},
                        status_code=429,
                        headers={"Retry-After": "0.05"},
                    )
                return JSONResponse(
                    {"error": {"code": "upstream", "message": "try again"}}, status_code=int(fault)
                )
        async with httpx.AsyncClient(base_url=self.upstream, timeout=60) as client:
            upstream = await client.request(
                request.method,
                request.url.path,
                params=request.query_params,
                content=await request.body(),
                headers={k: v for k, v in request.headers.items() if k.lower() != "host"},
            )
        self.forwarded += 1
        return Response(
            upstream.content,
            status_code=upstream.status_code,
            headers={
                k: v
                for k, v in upstream.headers.items()
                if k.lower()
                in ("content-type", "retry-after", "idempotent-replayed", "www-authenticate")
            },
        )

    @contextmanager
    def running(self) -> Iterator[FaultProxy]:
        app = Starlette(routes=[Route("/{path:path}", self._handle, methods=["GET", "POST"])])
        server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="critical")
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        # uvicorn exits its thread when it cannot bind: give up rather than spin for ever.
        wait_until(lambda: server.started, 10, interval=0.01, what="the fault proxy to listen")
        try:
            yield self
        finally:
            server.should_exit = True
            thread.join(10)
