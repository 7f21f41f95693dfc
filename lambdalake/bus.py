"""The event bus seen by producers: publish validated events, durable when the call returns.

The embedded default appends to the embedded event log; Kafka is the bus past one machine:
records keyed by `event_id`, produced with acks=all by the idempotent producer. On Kinesis,
PutRecords with `event_id` as the partition key (a producer's retries of an event land in one
shard), in requests within its limits; the records a partial failure left out are sent again,
and only they, until all are stored or the caller's time is spent.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import lru_cache
from typing import Any, Protocol

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
def kafka_bus(bootstrap: str, topic: str, partitions: int) -> KafkaBus:
    """The process's one producer for a topic (created with its companions if missing)."""
    from lambdalake.kafka_topics import ensure_topics

    ensure_topics(bootstrap, topic, partitions)
    return KafkaBus(bootstrap, topic)


PutRecords = Callable[[list[dict[str, Any]]], dict[str, Any]]  # entries -> the API's answer


def put_batches(entries: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """PutRecords entries in requests within the API's limits: 500 records, 5 MiB of data and
    partition keys (an event's record is at most 256 KiB: one always fits)."""
    from lambdalake.kinesis import MAX_PUT_BYTES, MAX_PUT_RECORDS

    batches: list[list[dict[str, Any]]] = []
    size = 0
    for entry in entries:
        entry_size = len(entry["Data"]) + len(entry["PartitionKey"].encode())
        if not batches or len(batches[-1]) == MAX_PUT_RECORDS or size + entry_size > MAX_PUT_BYTES:
            batches.append([])
            size = 0
        batches[-1].append(entry)
        size += entry_size
    return batches


def put_all(put: PutRecords, entries: list[dict[str, Any]], deadline: float,
            backoff_s: float = 0.05) -> None:
    """Send `entries` with `put` until every one is stored; after a partial failure only the
    records it left out (those answered with an `ErrorCode`) are sent again, with backoff.
    `BusError` when some are still not stored at `deadline` (time.monotonic())."""
    pending, attempt = entries, 0
    while True:
        try:
            answers = put(pending)["Records"]
            pending = [e for e, a in zip(pending, answers, strict=True) if a.get("ErrorCode")]
            failure = (f"{len(pending)} records not stored ({answers_errors(answers)})"
                       if pending else "")
        except Exception as exc:  # the request as a whole: throttled, unreachable, refused
            failure = f"PutRecords failed: {exc}"
        if not pending:
            return
        attempt += 1
        wait = min(backoff_s * 2 ** (attempt - 1), 1.0)
        if time.monotonic() + wait >= deadline:
            raise BusError(f"Kinesis did not store every event: {failure}")
        time.sleep(wait)


def answers_errors(answers: list[dict[str, Any]]) -> str:
    codes = sorted({a["ErrorCode"] for a in answers if a.get("ErrorCode")})
    return ", ".join(codes)


class KinesisBus:
    """Kinesis: `publish` returns once PutRecords stored every event."""

    def __init__(self, kinesis: Any, stream: str, timeout_s: float = 30.0):
        self.kinesis, self.stream, self.timeout_s = kinesis, stream, timeout_s

    def _put(self, entries: list[dict[str, Any]]) -> dict[str, Any]:
        answer: dict[str, Any] = self.kinesis.put_records(StreamName=self.stream, Records=entries)
        return answer

    def publish(self, events: list[Event], timeout_s: float | None = None) -> None:
        wait = self.timeout_s if timeout_s is None else min(timeout_s, self.timeout_s)
        deadline = time.monotonic() + wait
        entries = [{"Data": e.to_json(), "PartitionKey": e.event_id} for e in events]
        for batch in put_batches(entries):
            put_all(self._put, batch, deadline)


@lru_cache(maxsize=4)
def kinesis_bus(stream: str, endpoint_url: str | None, shards: int) -> KinesisBus:
    """The process's one client for a stream (created with `shards` shards if missing)."""
    from lambdalake.kinesis import client, ensure_stream

    kinesis = client(endpoint_url)
    ensure_stream(kinesis, stream, shards)
    return KinesisBus(kinesis, stream)


def open_bus(settings: Settings) -> Bus:
    if settings.bus == "embedded":
        return EmbeddedBus(events_topic(settings))
    if settings.bus == "kinesis":
        return kinesis_bus(settings.kinesis_stream, settings.kinesis_endpoint_url,
                           settings.partitions)
    return kafka_bus(settings.kafka_bootstrap, settings.topic, settings.partitions)
