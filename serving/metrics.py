"""Prometheus metrics of the serving layer, in a registry of its own per app.

`/metrics` shows the process-wide default registry (the other parts running in the same
process) followed by this one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from time import perf_counter

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lambdalake.loops import Loops
from lambdalake.serving.batch_views import BatchViews

_LABELS = ("method", "route", "status")


class ServingMetrics:
    def __init__(self, views: BatchViews, loops: Loops):
        self.registry = CollectorRegistry()
        self.registry.register(loops)
        self.requests = Counter("lambdalake_serving_requests", "HTTP requests answered",
                                _LABELS, registry=self.registry)
        self.latency = Histogram("lambdalake_serving_request_seconds", "Time to answer a request",
                                 _LABELS, registry=self.registry)
        self.pg_connections = Gauge("lambdalake_serving_pg_connections",
                                    "Open PostgreSQL wire-protocol connections",
                                    registry=self.registry)
        self.pg_statements = Counter("lambdalake_serving_pg_statements",
                                     "PostgreSQL wire-protocol statements, by outcome",
                                     ["outcome"], registry=self.registry)
        self._gauge("lambdalake_serving_batch_version_age_seconds",
                    "Since the served batch version was created", views.version_age_seconds)
        self._gauge("lambdalake_serving_realtime_cells",
                    "Real-time cells at or past the served batch cut", views.realtime_cells)
        self._gauge("lambdalake_serving_realtime_lag_seconds",
                    "Since the speed layer last reported being caught up",
                    lambda: _seconds(views.realtime_lag_ms()))

    def _gauge(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        Gauge(name, documentation, registry=self.registry).set_function(read)

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        labels = (method, route, str(status))
        self.requests.labels(*labels).inc()
        self.latency.labels(*labels).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(REGISTRY) + generate_latest(self.registry)


def _seconds(ms: int | None) -> float:
    return math.nan if ms is None else ms / 1000


class RequestMetrics:
    """ASGI middleware: count and time every request by method, route template and status."""

    def __init__(self, app: ASGIApp, metrics: ServingMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = perf_counter(), 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.observe(scope["method"], route, status, perf_counter() - started)
