"""Running the serving API under uvicorn: in the foreground, or in a background thread."""

from __future__ import annotations

import threading
import time
from typing import cast

import uvicorn
from fastapi import FastAPI

from lambdalake.connections import uvicorn_bounds
from lambdalake.kafka_security import kafka_security
from lambdalake.loops import Loops
from lambdalake.project import Project
from lambdalake.realtime import RealtimeCells
from lambdalake.serving.app import create_app
from lambdalake.serving.pgwire import PgWireServer
from lambdalake.serving.realtime_feed import RealtimeFeed, StoreFeed
from lambdalake.settings import Settings
from lambdalake.storage import ObjectStore


def build_server(
    settings: Settings,
    project: Project,
    store: ObjectStore,
    realtime: RealtimeCells,
    *,
    port: int | None = None,
    poll_seconds: float = 1.0,
    loops: Loops | None = None,
) -> uvicorn.Server:
    """A uvicorn server on settings.api_host and `port` (default settings.api_port; 0: any)."""
    app = create_app(settings, project, store, realtime, poll_seconds=poll_seconds, loops=loops)
    config = uvicorn.Config(
        app,
        host=settings.api_host,
        port=settings.api_port if port is None else port,
        log_config=None,
        access_log=False,
        **settings.tls,
        **uvicorn_bounds("api", settings.http_max_connections,
                         settings.http_read_timeout_seconds),
    )
    return uvicorn.Server(config)


def serve(settings: Settings, project: Project, store: ObjectStore) -> None:
    """One stateless serving replica in the foreground until interrupted (SIGINT, SIGTERM):
    the API and the PostgreSQL endpoint over the batch views published in `store` and the
    speed layer's real-time feed (Kafka's topic, or on Kinesis the shards' state in `store`).
    It keeps nothing another replica lacks, so any number answer alike, and one restarted
    rebuilds from the two, not the master dataset."""
    loops = Loops()
    realtime = RealtimeCells(project)
    feed: RealtimeFeed | StoreFeed = (
        StoreFeed(store, settings.kinesis_stream, realtime, loops) if settings.bus == "kinesis"
        else RealtimeFeed(settings.kafka_bootstrap, settings.topic, realtime, loops,
                          kafka_security(settings)))
    server = build_server(settings, project, store, realtime, loops=loops)
    feed.start()
    postgres = start_postgres(server)
    try:
        server.run()
    finally:
        if postgres is not None:
            postgres.stop()
        feed.stop()


def start_postgres(server: uvicorn.Server, port: int | None = None) -> PgWireServer | None:
    """The PostgreSQL wire endpoint of the API `server` builds, on settings.pg_host and `port`
    (default settings.pg_port; 0 there: none), sharing its views and SQL sandbox."""
    serving = cast(FastAPI, server.config.app).state.serving  # build_server's app
    if port is None:
        if not serving.settings.pg_port:
            return None
        port = serving.settings.pg_port
    return PgWireServer(serving, serving.settings.pg_host, port).start(serving.loops)


class ServerThread:
    """A uvicorn server in a daemon thread: `start()` returns once it listens."""

    def __init__(self, server: uvicorn.Server):
        self.server = server
        self._thread = threading.Thread(target=server.run, name="serving-api", daemon=True)

    def start(self, timeout: float = 30.0) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the serving API did not start on {self.url}")
            time.sleep(0.01)
        return self

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        config = self.server.config
        host, scheme = config.host, "https" if config.ssl_certfile else "http"
        return f"{scheme}://{host}:{self.port if self.server.started else self.server.config.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join()
