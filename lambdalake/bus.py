"""The event bus seen by producers: publish validated events, durable when the call returns.

The embedded default appends to the embedded event log; Kafka is the bus past one machine:
records keyed by `event_id`, produced with acks=all by the idempotent producer.
"""

from __future__ import annotations

import time
from functools import lru_cache
from typing import Protocol

from lambdalake.eventlog import EventLog, Topic
from lambdalake.events import Event
from lambdalake.settings import Settings


class Bus(Protocol):
    def publish(self, events: list[Event], timeout_s: float | None = None) -> None:
        """Return only once every event is durable on the bus; `BusError` when that has not
        happened within `timeout_s` (None: the bus's own limit)."""


class BusError(RuntimeError):
    """The bus did not acknowledge every event (after the client's own retries)."""


class EmbeddedBus:
    def __init__(self, topic: Topic):
        self.topic = topic

    def publish(self, events: list[Event], timeout_s: float | None = None) -> None:
        by_partition: dict[int, list[bytes]] = {}
        for event in events:
            partition = self.topic.partition_for(event.event_id)
            by_partition.setdefault(partition, []).append(event.to_json())
        for partition, values in by_partition.items():
            self.topic.partitions[partition].append(values)


@lru_cache(maxsize=4)
def embedded_log(home: str) -> EventLog:
    """The process's one handle on the embedded log under `home`."""
    from pathlib import Path

    return EventLog(Path(home) / "log")


def events_topic(settings: Settings) -> Topic:
    return embedded_log(str(settings.home.resolve())).topic(settings.topic, settings.partitions)


class KafkaBus:
    """Kafka: `publish` returns once the broker acknowledged every event (acks=all)."""

    def __init__(self, bootstrap: str, topic: str, timeout_s: float = 30.0):
        from kafka import KafkaProducer

        self.topic, self.timeout_s = topic, timeout_s
        self.producer = KafkaProducer(
            bootstrap_servers=bootstrap,
            client_id="lambdalake-bus",
            acks="all",
            enable_idempotence=True,
            linger_ms=2,
            request_timeout_ms=10_000,
            delivery_timeout_ms=int(timeout_s * 1000),
            max_block_ms=int(timeout_s * 1000),
        )

    def publish(self, events: list[Event], timeout_s: float | None = None) -> None:
        from kafka.errors import KafkaError

        wait = self.timeout_s if timeout_s is None else min(timeout_s, self.timeout_s)
        deadline = time.monotonic() + wait
        try:
            futures = [
                self.producer.send(self.topic, key=e.event_id.encode(), value=e.to_json())
                for e in events
            ]
            # Each request waits for its own records only (flush would wait for every
            # request's), for no longer than its caller can.
            for future in futures:
                future.get(timeout=max(0.0, deadline - time.monotonic()))
        except KafkaError as exc:
            raise BusError(
                f"Kafka topic {self.topic} did not acknowledge the events: {exc}"
            ) from exc

    def close(self) -> None:
        self.producer.close(timeout=self.timeout_s)


@lru_cache(maxsize=4)
def kafka_bus(
    bootstrap: str, topic: str, partitions: int, replication: int = 1, min_insync: int = 1
) -> KafkaBus:
    """The process's one producer for a topic (created with its companions if missing)."""
    from lambdalake.kafka_topics import ensure_topics

    ensure_topics(bootstrap, topic, partitions, replication, min_insync)
    return KafkaBus(bootstrap, topic)


def open_bus(settings: Settings) -> Bus:
    if settings.bus == "embedded":
        return EmbeddedBus(events_topic(settings))
    return kafka_bus(settings.kafka_bootstrap, settings.topic, settings.partitions,
                     settings.replication_factor, settings.min_insync_replicas)
