"""The speed layer's Prometheus metrics, the same for every driver, and a worker's endpoint."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import Counter, Gauge, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from lambdalake.settings import Settings
from lambdalake.viewstate import ViewState

log = logging.getLogger("lambdalake.speed")

APPLIED = Counter("lambdalake_speed_events_total", "Events read by the speed layer", ["outcome"])
DEAD_LETTERS = Counter(
    "lambdalake_speed_dead_letters_total",
    "Records sent to the dead-letter topic by the speed layer",
    ["kind"],
)
DEDUP_IDS = Gauge("lambdalake_speed_dedup_ids", "Event ids held for dedup", ["partition"])
FORGOTTEN_EARLY = Counter(
    "lambdalake_speed_dedup_forgotten_early_total",
    "Event ids forgotten inside the dedup window, to stay within LAMBDALAKE_DEDUP_MAX_IDS",
    ["partition"],
)


class DedupGauges:
    """Publishes one view state's dedup figures; warns once when its cap starts forgetting."""

    def __init__(self, partition: str):
        self.partition = partition
        self._forgotten = 0

    def report(self, state: ViewState) -> None:
        DEDUP_IDS.labels(self.partition).set(state.tracked_ids)
        fresh = state.forgotten_early - self._forgotten
        if fresh <= 0:
            return
        if not self._forgotten:
            log.warning("dedup window shortened: the id cap is reached",
                        extra={"partition": self.partition, "max_ids": state.max_ids})
        FORGOTTEN_EARLY.labels(self.partition).inc(fresh)
        self._forgotten = state.forgotten_early


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *_: Any) -> None:  # a scrape every few seconds is not news
        pass


def serve_metrics(settings: Settings) -> None:
    """A worker's `/healthz` and Prometheus `/metrics`, on a daemon thread, if a port is set."""
    if not settings.speed_metrics_port:
        return
    metrics = make_wsgi_app()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ["PATH_INFO"] == "/healthz":
            start_response("200 OK", [("Content-Type", "application/json")])
            return [b'{"status":"ok"}']
        return metrics(environ, start_response)

    server = make_server(settings.speed_metrics_host, settings.speed_metrics_port, app,
                         ThreadingWSGIServer, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
