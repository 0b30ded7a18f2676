"""Prometheus metrics: requests and latency by route and status, answered queries by client,
forward-pass batch sizes, detector alerts.

Each serving process keeps its own registry (uvicorn workers and compose replicas are scraped
one by one). ``/metrics`` needs the admin token: its labels name the clients.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "mlaas_requests_total",
            "HTTP requests by route, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "mlaas_request_seconds",
            "HTTP request latency by route",
            ["route", "method"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.answered = Counter(
            "mlaas_answered_queries_total",
            "Images answered, by client",
            ["client"],
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "mlaas_forward_batch_images",
            "Images per forward pass (the micro-batcher at work)",
            registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
        )
        self.degraded = Counter(
            "mlaas_degraded_requests_total",
            "Requests answered without a component that was down (fail-open settings)",
            ["component"],
            registry=self.registry,
        )
        self.alerts = Counter(
            "mlaas_alerts_total",
            "Detector alerts by detector and action",
            ["detector", "action"],
            registry=self.registry,
        )


class MetricsMiddleware:
    """Counts every request and times it, labelled by the route's template (not the raw
    path, which would make one series per client name or query string)."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def observing_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observing_send)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.requests.labels(template, method, str(status)).inc()
            self.metrics.latency.labels(template, method).observe(time.perf_counter() - started)
