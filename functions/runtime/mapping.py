"""A stream event-source mapping on the embedded log, as AWS Lambda polls a Kafka topic, and
the delivery of batches every stream mapping shares (`Delivery`; Kinesis: `kinesis_source`).

Per partition, from the consumer group's committed position: a batch of up to `BatchSize`
records (and at most 6 MB of payload), sent once full or once the batching window has passed
since records began waiting, as the AWS Kafka event (timestamp = arrival, value base64).
Success commits the position. A failure is retried with backoff, `MaximumRetryAttempts`
times (-1: until it succeeds); a batch still failing is halved (`BisectBatchOnFunctionError`)
and each half delivered the same way, so one bad record cannot block the partition. What
still fails goes, with its error, to the on-failure destination (a JSON file under the
runtime's folder, counted) and the partition moves on. Retrying before bisecting keeps a
brief outage from splitting batches: a retried batch is the same batch.

The mapping polls in a loop (`lambdalake.loops`): an error outside the function (the log or
the position file unreadable, too many open files) is logged, counted and retried with a
capped backoff from the committed position, nothing skipped.

A drained partition is sealed at most once a second; when everything up to its end offset
is processed, `on_drained(partition, end, t)` hears that every later record arrives at t or
after (the archiver's watermark for an idle partition).
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from lambdalake.eventlog import Record, now_ms
from lambdalake.events import iso
from lambdalake.functions.runtime.function import FunctionError, LocalFunction, Throttled
from lambdalake.functions.runtime.polling import MAX_BACKOFF_SECONDS, Polling
from lambdalake.functions.runtime.template import Batching, StreamSource
from lambdalake.loops import Loop, Loops
from lambdalake.storage import FileStore

DrainHook = Callable[[int, int, int], None]  # (partition, end offset, t)
R = TypeVar("R")
MAX_PAYLOAD_BYTES = 6 * 1024 * 1024
_RECORD_JSON_BYTES = 160  # a record's JSON beyond its base64 value
STUCK_AFTER_SECONDS = 300.0  # an invocation's own timeout is at most 900 s on AWS
_DRAIN_EVERY_SECONDS = 1.0

log = logging.getLogger("lambdalake.functions.mapping")


class _Stopping(Exception):
    pass


def kafka_record(topic: str, record: Record) -> dict[str, Any]:
    return {
        "topic": topic,
        "partition": record.partition,
        "offset": record.offset,
        "timestamp": record.arrival,
        "timestampType": "LOG_APPEND_TIME",
        "key": None,
        "value": base64.b64encode(record.value).decode(),
        "headers": [],
    }


def kafka_event(topic: str, records: list[Record]) -> dict[str, Any]:
    """The AWS self-managed Kafka event of one partition's records."""
    return {
        "eventSource": "SelfManagedKafka",
        "bootstrapServers": "embedded",
        "records": {f"{topic}-{records[0].partition}": [kafka_record(topic, r) for r in records]},
    }


def within_payload(records: list[R], data: Callable[[R], bytes], json_bytes: int) -> list[R]:
    """The leading records whose event fits the invocation payload limit (at least one): a
    record's `data` goes in base64, with `json_bytes` of JSON around it."""
    size = 0
    for count, record in enumerate(records):
        size += 4 * ((len(data(record)) + 2) // 3) + json_bytes
        if size > MAX_PAYLOAD_BYTES and count:
            return records[:count]
    return records


class Feed(Protocol[R]):
    """What a delivery needs to know of one partition's (or shard's) records."""

    def event(self, records: list[R]) -> dict[str, Any]:
        """The function's event for the records."""

    def commit(self, records: list[R]) -> None:
        """Checkpoint past the records."""

    def failed_from(self, records: list[R], answer: Any) -> int:
        """The index of the first record a partial batch response names (len: none)."""

    def failure(self, records: list[R]) -> tuple[str, dict[str, Any]]:
        """The on-failure record's key, and its batch info (AWS's `...BatchInfo`)."""

    def age_seconds(self, records: list[R]) -> float:
        """How long ago the first record arrived."""


class BadBatchResponse(FunctionError):
    """A partial batch response that names no record of the batch: the whole batch failed."""


def first_failed(sequences: list[str], answer: Any) -> int:
    """The index of the first of a shard's records (by their sequence numbers, in order) that
    the answer's `batchItemFailures` names: the lowest sequence number (len: none named)."""
    failures = (answer or {}).get("batchItemFailures") if isinstance(answer, dict) else None
    if not failures:
        return len(sequences)
    named = [failure.get("itemIdentifier") for failure in failures]
    if any(not isinstance(s, str) or s not in sequences for s in named):
        raise BadBatchResponse(f"batchItemFailures names no record of the batch: {named}")
    return min(sequences.index(s) for s in named)


class Delivery(Generic[R]):
    """Delivers batches to a function as AWS Lambda's stream event-source mappings do.

    A failure is retried with backoff, `MaximumRetryAttempts` times (-1: until it succeeds);
    a batch still failing is halved (`BisectBatchOnFunctionError`) and each half delivered
    the same way. With `ReportBatchItemFailures`, an answer naming a record as failed
    checkpoints the records before it and retries from it on (an attempt). Records older
    than `MaximumRecordAgeInSeconds` are not retried. What is given up goes, with its error,
    to the on-failure destination (a JSON file under the runtime's folder, counted), and is
    checkpointed past.
    """

    def __init__(self, function: LocalFunction, batching: Batching, folder: Path, loop: Loop,
                 backoff_seconds: float):
        self.function, self.batching, self.loop = function, batching, loop
        self.failures = FileStore(folder / "on_failure" / function.name)
        self.backoff_seconds = backoff_seconds

    def deliver(self, feed: Feed[R], records: list[R]) -> None:
        failures, error = 0, None
        while records:
            if self._too_old(feed, records):
                self._give_up(feed, records, "RecordAgeExceeded", error)
                return
            answer, error = self._invoke(feed.event(records))
            done = len(records) if error is None else 0
            if error is None and self.batching.reports_item_failures:
                try:
                    done = feed.failed_from(records, answer)
                except BadBatchResponse as bad:
                    done, error = 0, bad
            if done:
                feed.commit(records[:done])
                records = records[done:]
            if not records:
                return
            failures += 1
            error = error or FunctionError(f"{len(records)} records reported as failed")
            if 0 <= self.batching.max_retries < failures:
                self._exhausted(feed, records, error)
                return
            log.warning("batch failed; retrying", extra={
                "function": self.function.name, "records": len(records),
                "failures": failures, "error": str(error)})
            self.loop.wait(min(self.backoff_seconds * 2 ** (failures - 1), MAX_BACKOFF_SECONDS))

    def _exhausted(self, feed: Feed[R], records: list[R], error: FunctionError) -> None:
        if self.batching.bisect_on_error and len(records) > 1:
            half = len(records) // 2
            self.deliver(feed, records[:half])
            self.deliver(feed, records[half:])
        else:
            self._give_up(feed, records, "RetryAttemptsExhausted", error)

    def _too_old(self, feed: Feed[R], records: list[R]) -> bool:
        limit = self.batching.max_record_age_seconds
        return limit >= 0 and feed.age_seconds(records) > limit

    def _invoke(self, event: dict[str, Any]) -> tuple[Any, FunctionError | None]:
        """One attempt (waiting out throttles): the answer, or the error."""
        while not self.loop.stopping.is_set():
            try:
                return self.function.invoke(event), None
            except Throttled:
                self.loop.wait(self.backoff_seconds)  # not an attempt: wait for a free slot
            except FunctionError as error:
                return None, error
        raise _Stopping

    def _give_up(self, feed: Feed[R], records: list[R], condition: str,
                 error: FunctionError | None) -> None:
        key, info = feed.failure(records)
        self.failures.put(key, json.dumps({
            "condition": condition,
            "function": self.function.name,
            "error": str(error) if error else None,
            "timestamp": iso(now_ms()),
            **info,
            "payload": feed.event(records),
        }).encode())
        self.function.metrics.sent_on_failure(len(records))
        log.error("batch sent to the on-failure destination", extra={
            "function": self.function.name, "key": key, "condition": condition,
            "error": str(error)})
        feed.commit(records)


class _KafkaFeed:
    """A topic's partition as the Kafka event-source mapping sees it."""

    def __init__(self, mapping: StreamMapping):
        self.mapping = mapping

    def event(self, records: list[Record]) -> dict[str, Any]:
        return kafka_event(self.mapping.source.topic, records)

    def commit(self, records: list[Record]) -> None:
        self.mapping.commit(records)

    def failed_from(self, records: list[Record], answer: Any) -> int:
        return len(records)  # a Kafka mapping has no partial batch responses

    def failure(self, records: list[Record]) -> tuple[str, dict[str, Any]]:
        first, last = records[0], records[-1]
        key = f"p={first.partition}/{first.offset:020d}-{last.offset:020d}.json"
        return key, {"KafkaBatchInfo": {
            "topic": self.mapping.source.topic, "partition": first.partition,
            "batchSize": len(records), "firstOffset": first.offset, "lastOffset": last.offset}}

    def age_seconds(self, records: list[Record]) -> float:
        return (now_ms() - records[0].arrival) / 1000


class BatchPolling(Polling, Generic[R]):
    """A stream mapping's poll loop (named `<kind>-<function>`) and the delivery of its
    batches."""

    kind = "mapping"

    def __init__(self, function: LocalFunction, batching: Batching, folder: Path,
                 backoff_seconds: float, poll_seconds: float, loops: Loops | None):
        super().__init__(f"{self.kind}-{function.name}", loops, backoff_seconds,
                         STUCK_AFTER_SECONDS)
        self.function, self.idle_seconds = function, poll_seconds
        self.delivery: Delivery[R] = Delivery(function, batching, folder, self.loop,
                                              backoff_seconds)

    @property
    def failures(self) -> FileStore:
        return self.delivery.failures


class StreamPartition(Protocol):
    """One partition of a stream topic: the embedded log's, or Kafka's (kafka_source)."""

    index: int

    @property
    def end(self) -> int: ...

    def read(self, offset: int, max_records: int) -> list[Record]: ...

    def seal(self) -> tuple[int, int]: ...


class StreamTopic(Protocol):
    """The topic a stream mapping reads, and its consumer groups' committed positions."""

    @property
    def partitions(self) -> Sequence[StreamPartition]: ...

    def committed(self, group: str) -> dict[int, int]: ...

    def commit(self, group: str, positions: dict[int, int]) -> None: ...


class StreamMapping(BatchPolling[Record]):
    def __init__(
        self,
        function: LocalFunction,
        source: StreamSource,
        topic: StreamTopic,
        folder: Path,
        on_drained: DrainHook | None = None,
        backoff_seconds: float = 0.5,
        poll_seconds: float = 0.05,
        loops: Loops | None = None,
    ):
        super().__init__(function, source, folder, backoff_seconds, poll_seconds, loops)
        self.source, self.topic, self.on_drained = source, topic, on_drained
        self.group = source.consumer_group or f"{function.name}-{source.topic}"
        self.positions = topic.committed(self.group)
        self._waiting_since: dict[int, float] = {}
        self._next_drain: dict[int, float] = {}
        self.feed = _KafkaFeed(self)

    def poll_once(self) -> int:
        """One pass over the partitions; the number of records delivered."""
        return sum(self._poll(partition) for partition in self.topic.partitions)

    def _poll(self, partition: StreamPartition) -> int:
        index, position = partition.index, self.positions[partition.index]
        waiting = partition.end - position
        if waiting <= 0:
            self._drained(partition)
            return 0
        since = self._waiting_since.setdefault(index, time.monotonic())
        window = self.source.batching_window_seconds
        if waiting < self.source.batch_size and time.monotonic() - since < window:
            return 0
        records = within_payload(partition.read(position, self.source.batch_size),
                                 lambda record: record.value, _RECORD_JSON_BYTES)
        if not records:  # `end` was read unlocked: an append may still be under way
            return 0
        self.delivery.deliver(self.feed, records)
        del self._waiting_since[index]
        return len(records)

    def commit(self, records: list[Record]) -> None:
        partition, next_offset = records[0].partition, records[-1].offset + 1
        self.topic.commit(self.group, {partition: next_offset})
        self.positions[partition] = next_offset

    def _drained(self, partition: StreamPartition) -> None:
        now = time.monotonic()
        if self.on_drained is None or now < self._next_drain.get(partition.index, 0.0):
            return
        self._next_drain[partition.index] = now + _DRAIN_EVERY_SECONDS
        end, t = partition.seal()
        if end == self.positions[partition.index]:
            self.on_drained(partition.index, end, t)
