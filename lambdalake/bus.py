"""The event bus seen by producers: publish validated events, durable when the call returns.

The embedded default appends to the embedded event log; Kafka is the bus past one machine:
records keyed by `event_id`, produced with acks=all by librdkafka's idempotent producer. On
Kinesis, PutRecords with `event_id` as the partition key (a producer's retries of an event land
in one shard), in requests within its limits; the records a partial failure left out are sent
again, and only they, until all are stored or the caller's time is spent. A process has one
PutRecords in flight per stream (`PutCombiner`): what its concurrent publishes ask meanwhile
goes out together in the next call, so a busy gateway makes few, full requests.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from functools import lru_cache
from typing import Any, Protocol

from lambdalake.eventlog import EventLog, Topic
from lambdalake.events import Event, Record
from lambdalake.kafka_security import PLAINTEXT, KafkaSecurity, kafka_security
from lambdalake.settings import Settings

log = logging.getLogger("lambdalake.bus")


Publishable = Sequence[Event] | Sequence[Record]


class Bus(Protocol):
    def publish(self, events: Publishable, timeout_s: float | None = None) -> None:
        """Return only once every event is durable on the bus; `BusError` when that has not
        happened within `timeout_s` (None: the bus's own limit)."""


class BusError(RuntimeError):
    """The bus did not acknowledge every event (after the client's own retries)."""


class EmbeddedBus:
    def __init__(self, topic: Topic):
        self.topic = topic

    def publish(self, events: Publishable, timeout_s: float | None = None) -> None:
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
    """Kafka through librdkafka (confluent-kafka): `publish` returns once the broker
    acknowledged every event (acks=all, idempotent). Records are keyed by `event_id` and
    partitioned by murmur2 of the key, as the Java client and kafka-python do, so a retried
    event lands where its first copy did whoever produced it. A request's records are queued
    in one call (`produce_batch`); delivery reports are served by one polling thread; each
    request waits for its own records only. `queue_messages`: how many records the client
    holds unacknowledged (librdkafka's default); past it a request waits for room."""

    def __init__(self, bootstrap: str, topic: str, timeout_s: float = 30.0,
                 security: KafkaSecurity = PLAINTEXT, queue_messages: int = 100_000):
        from confluent_kafka import Producer

        self.topic, self.timeout_s = topic, timeout_s
        self.producer = Producer({
            "bootstrap.servers": bootstrap,
            "client.id": "lambdalake-bus",
            "enable.idempotence": True,  # and so acks=all
            "linger.ms": 2,
            "partitioner": "murmur2_random",
            "request.timeout.ms": 10_000,
            "message.timeout.ms": int(timeout_s * 1000),
            "queue.buffering.max.messages": queue_messages,
            **security.librdkafka(),
        }, logger=log)  # the client's own log lines go through logging, not raw to stderr
        self._closed = threading.Event()
        self._poller = threading.Thread(target=self._serve_reports, name="lambdalake-bus",
                                        daemon=True)
        self._poller.start()

    def _serve_reports(self) -> None:
        while not self._closed.is_set():
            self.producer.poll(0.1)

    def publish(self, events: Publishable, timeout_s: float | None = None) -> None:
        from confluent_kafka import KafkaException

        wait = self.timeout_s if timeout_s is None else min(timeout_s, self.timeout_s)
        deadline = time.monotonic() + wait
        delivered = _Deliveries(len(events))
        messages = [{"key": event.event_id.encode(), "value": event.to_json()}
                    for event in events]
        try:
            queued = self.producer.produce_batch(self.topic, messages,
                                                 on_delivery=delivered.report)
            if queued < len(messages):
                self._produce_refused(messages, delivered.report, deadline)
        except KafkaException as exc:
            raise BusError(f"Kafka topic {self.topic} refused the events: {exc}") from exc
        if not delivered.done.wait(max(0.0, deadline - time.monotonic())):
            raise BusError(f"Kafka topic {self.topic} did not acknowledge the events "
                           f"within {wait:.1f} s")
        if delivered.error is not None:
            raise BusError(f"Kafka topic {self.topic} did not acknowledge the events: "
                           f"{delivered.error}")

    def _produce_refused(self, messages: list[dict[str, Any]], report: Callable[..., None],
                         deadline: float) -> None:
        """The messages `produce_batch` did not queue (it marks each with its `_error`): again
        once the queue has room, if it was full; else the error is the request's."""
        from confluent_kafka import KafkaError, KafkaException

        for message in messages:
            error = message.get("_error")
            if error is None:
                continue
            if error.code() != KafkaError._QUEUE_FULL:
                raise KafkaException(error)
            self._produce_when_room(message["value"], message["key"], report, deadline)

    def _produce_when_room(self, value: bytes, key: bytes, report: Callable[..., None],
                           deadline: float) -> None:
        """The client's queue is full: the polling thread drains it while this one waits."""
        while True:
            if time.monotonic() > deadline:
                raise BusError(f"Kafka topic {self.topic}: producer queue full") from None
            time.sleep(0.01)
            try:
                self.producer.produce(self.topic, value, key, on_delivery=report)
                return
            except BufferError:
                pass

    def close(self) -> None:
        self._closed.set()
        self._poller.join()  # then the reports left are served here alone
        self.producer.flush(self.timeout_s)


class _Deliveries:
    """One request's delivery reports, all served by the bus's polling thread."""

    def __init__(self, expected: int):
        self.pending, self.error = expected, None
        self.done = threading.Event()
        if expected == 0:
            self.done.set()

    def report(self, error: Any, _message: Any) -> None:
        if error is not None and self.error is None:
            self.error = error
        self.pending -= 1
        if self.pending == 0:
            self.done.set()


@lru_cache(maxsize=4)
def kafka_bus(bootstrap: str, topic: str, partitions: int,
              security: KafkaSecurity = PLAINTEXT, replication: int = 1,
              min_insync: int = 1) -> KafkaBus:
    """The process's one producer for a topic (created with its companions if missing)."""
    from lambdalake.kafka_topics import ensure_topics

    ensure_topics(bootstrap, topic, partitions, security, replication, min_insync)
    return KafkaBus(bootstrap, topic, security=security)


PutRecords = Callable[[list[dict[str, Any]]], dict[str, Any]]  # entries -> the API's answer


def put_batches(entries: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """PutRecords entries in requests within the API's limits: 500 records, 5 MiB of data and
    partition keys (an event's record is at most 256 KiB: one always fits)."""
    from lambdalake.kinesis import MAX_PUT_BYTES, MAX_PUT_RECORDS

    batches: list[list[dict[str, Any]]] = []
    size = 0
    for entry in entries:
        size_of_entry = entry_size(entry)
        if (not batches or len(batches[-1]) == MAX_PUT_RECORDS
                or size + size_of_entry > MAX_PUT_BYTES):
            batches.append([])
            size = 0
        batches[-1].append(entry)
        size += size_of_entry
    return batches


def entry_size(entry: dict[str, Any]) -> int:
    """What a PutRecords entry counts towards the request's 5 MiB: data and partition key."""
    return len(entry["Data"]) + len(entry["PartitionKey"].encode())


Waiting = tuple[list[dict[str, Any]], Future[dict[str, Any]]]  # entries, their answer


class PutCombiner:
    """`put` with one call in flight: the entries asked for meanwhile (by other threads) go
    out together in the next call, up to the API's limits, and each caller gets the answer to
    its own entries (a failed call fails every caller in it). Besides saving requests, this
    keeps one process from writing a shard twice at once."""

    def __init__(self, put: PutRecords):
        self._put = put
        self._waiting: deque[Waiting] = deque()
        self._ready = threading.Condition()
        self._sender: threading.Thread | None = None

    def __call__(self, entries: list[dict[str, Any]]) -> dict[str, Any]:
        """`entries` (within the API's limits, as `put_batches` makes them) put; the answer."""
        answer: Future[dict[str, Any]] = Future()
        with self._ready:
            self._waiting.append((entries, answer))
            if self._sender is None:
                self._sender = threading.Thread(target=self._send_forever, daemon=True,
                                                name="put-records")
                self._sender.start()
            self._ready.notify()
        return answer.result()

    def _send_forever(self) -> None:
        while True:
            with self._ready:
                while not self._waiting:
                    self._ready.wait()
                taken = self._take()
            self._send(taken)

    def _take(self) -> list[Waiting]:
        """The oldest callers' entries that fit in one request (the first always does)."""
        from lambdalake.kinesis import MAX_PUT_BYTES, MAX_PUT_RECORDS

        taken = [self._waiting.popleft()]
        records, size = len(taken[0][0]), sum(map(entry_size, taken[0][0]))
        while self._waiting:
            entries = self._waiting[0][0]
            more = sum(map(entry_size, entries))
            if records + len(entries) > MAX_PUT_RECORDS or size + more > MAX_PUT_BYTES:
                break
            taken.append(self._waiting.popleft())
            records, size = records + len(entries), size + more
        return taken

    def _send(self, taken: list[Waiting]) -> None:
        try:
            answers = self._put([entry for entries, _ in taken for entry in entries])["Records"]
        except Exception as exc:  # the request as a whole: each caller decides what next
            for _, answer in taken:
                answer.set_exception(exc)
            return
        at = 0
        for entries, answer in taken:
            answer.set_result({"Records": answers[at:at + len(entries)]})
            at += len(entries)


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
        self._combined = PutCombiner(self._put)

    def _put(self, entries: list[dict[str, Any]]) -> dict[str, Any]:
        answer: dict[str, Any] = self.kinesis.put_records(StreamName=self.stream, Records=entries)
        return answer

    def publish(self, events: Publishable, timeout_s: float | None = None) -> None:
        wait = self.timeout_s if timeout_s is None else min(timeout_s, self.timeout_s)
        deadline = time.monotonic() + wait
        entries = [{"Data": e.to_json(), "PartitionKey": e.event_id} for e in events]
        for batch in put_batches(entries):
            put_all(self._combined, batch, deadline)


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
    return kafka_bus(settings.kafka_bootstrap, settings.topic, settings.partitions,
                     kafka_security(settings), settings.replication_factor,
                     settings.min_insync_replicas)
