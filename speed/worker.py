"""What a speed worker process (Kafka or Kinesis) does around its driver: the bus's topics, its
`/healthz` and `/metrics`, stopping with `lambdalake up`, and the object store."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any, Protocol

from lambdalake.catalog import KeptVersions
from lambdalake.kafka_topics import ensure_bus_topics
from lambdalake.project import Project, load_project
from lambdalake.settings import Settings
from lambdalake.speed.metrics import serve_metrics
from lambdalake.storage import ObjectStore, open_store

log = logging.getLogger("lambdalake.speed")


def prepare(settings: Settings) -> ObjectStore:
    """Everything a worker needs before its driver starts; the object store."""
    if settings.bus == "kinesis":
        from lambdalake import kinesis

        kinesis.ensure_stream(kinesis.client(settings.kinesis_endpoint_url),
                              settings.kinesis_stream, settings.partitions)
    else:
        ensure_bus_topics(settings)
    serve_metrics(settings)
    exit_with_supervisor(settings)
    return open_store(settings.store_url, settings.s3_endpoint_url)


def exit_with_supervisor(settings: Settings) -> None:
    """Under `lambdalake up`, stop (SIGTERM, so the open transaction ends cleanly) once the
    supervisor's end of the stdin pipe closes: when `up` dies, even by kill -9."""
    if not settings.supervised:
        return

    def watch() -> None:
        sys.stdin.buffer.read()  # returns at end of file only
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="supervisor-watch", daemon=True).start()


class Driver(Protocol):
    def run(self, stop: threading.Event) -> None: ...


def run_worker(
    module: str, description: str | None, worker_id_help: str,
    driver: Callable[[Settings, Project, ObjectStore, str], Driver], argv: list[str] | None,
) -> None:
    """A worker process's main: its arguments, logs, settings and store, then `driver(...)`
    run until SIGTERM or SIGINT."""
    from lambdalake.logs import setup_logging

    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker-id", default=socket.gethostname(), help=worker_id_help)
    args = parser.parse_args(argv)
    setup_logging()
    settings = Settings()
    store = prepare(settings)
    speed = driver(settings, load_project(settings.project), store, args.worker_id)
    stop = threading.Event()

    def stopping(*_: Any) -> None:
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stopping)
    speed.run(stop)
    if settings.supervised:  # the stdin watch is still blocked in a read: no clean shutdown
        logging.shutdown()
        os._exit(0)


def read_floor(kept: KeptVersions) -> int | None:
    """The real-time floor (`KeptVersions.floor`), or None while the store cannot be read:
    an unreachable store delays dropping slices, it never stops the layer."""
    try:
        return kept.floor()
    except Exception:
        log.warning("cannot read the batch catalog", exc_info=True)
        return None
