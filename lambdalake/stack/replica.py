"""`lambdalake serve`: a serving replica in its own process, beside `lambdalake up --bus kafka`
or `--bus kinesis`.

Replicas share no state but the store (the published batch views) and the speed layer's
output: on Kafka its compacted real-time topic, on Kinesis its shards' state in the store
(`serving.realtime_feed.StoreFeed`). Start as many as the queries need, behind any load
balancer, and kill or restart any of them.
"""

from __future__ import annotations

from lambdalake.kafka_topics import ensure_bus_topics
from lambdalake.master import check_schemas
from lambdalake.project import load_project
from lambdalake.settings import Settings
from lambdalake.stack.up import open_settings_store


class BusUnreachable(RuntimeError):
    """The bus did not answer: the CLI says so in one line."""


def serve_replica(settings: Settings) -> None:
    """Serve in the foreground until interrupted; on Kafka, the bus topics made if `up` has not
    yet (on Kinesis the feed is the store, read as the shards' states appear)."""
    from lambdalake.serving.server import serve

    project = load_project(settings.project)
    store = open_settings_store(settings)
    check_schemas(store, project)
    if settings.bus == "kafka":
        ensure_kafka_topics(settings)
    serve(settings, project, store)


def ensure_kafka_topics(settings: Settings) -> None:
    from kafka.errors import KafkaError

    try:
        ensure_bus_topics(settings)
    except KafkaError as exc:
        raise BusUnreachable(f"cannot reach Kafka at {settings.kafka_bootstrap}: {exc}") from None
