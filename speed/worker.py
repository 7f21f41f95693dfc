"""What a speed worker process (Kafka or Kinesis) does around its driver: the bus's topics, its
`/healthz` and `/metrics`, stopping with `lambdalake up`, and the object store."""

from __future__ import annotations

import os
import signal
import sys
import threading

from lambdalake.kafka_topics import ensure_bus_topics
from lambdalake.settings import Settings
from lambdalake.speed.metrics import serve_metrics
from lambdalake.storage import ObjectStore, open_store


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
