"""A stream event-source mapping on the embedded log, as AWS Lambda polls a Kafka topic.

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lambdalake.eventlog import Partition, Record, Topic, now_ms
from lambdalake.events import iso
from lambdalake.functions.runtime.function import FunctionError, LocalFunction, Throttled
from lambdalake.functions.runtime.polling import Polling
from lambdalake.functions.runtime.template import StreamSource
from lambdalake.loops import Loops
from lambdalake.storage import FileStore

DrainHook = Callable[[int, int, int], None]  # (partition, end offset, t)
MAX_PAYLOAD_BYTES = 6 * 1024 * 1024
_RECORD_JSON_BYTES = 160  # a record's JSON beyond its base64 value
_MAX_BACKOFF_SECONDS = 30.0
_STUCK_AFTER_SECONDS = 300.0  # an invocation's own timeout is at most 900 s on AWS
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


def within_payload(records: list[Record]) -> list[Record]:
    """The leading records whose event fits the invocation payload limit (at least one)."""
    size = 0
    for count, record in enumerate(records):
        size += 4 * ((len(record.value) + 2) // 3) + _RECORD_JSON_BYTES
        if size > MAX_PAYLOAD_BYTES and count:
            return records[:count]
    return records


class StreamMapping(Polling):
    def __init__(
        self,
        function: LocalFunction,
        source: StreamSource,
        topic: Topic,
        folder: Path,
        on_drained: DrainHook | None = None,
        backoff_seconds: float = 0.5,
        poll_seconds: float = 0.05,
        loops: Loops | None = None,
    ):
        self.function, self.source, self.topic, self.on_drained = (
            function, source, topic, on_drained,
        )
        self.group = source.consumer_group or f"{function.name}-{source.topic}"
        self.failures = FileStore(folder / "on_failure" / function.name)
        self.backoff_seconds = backoff_seconds
        self.positions = topic.committed(self.group)
        self._waiting_since: dict[int, float] = {}
        self._next_drain: dict[int, float] = {}
        self.idle_seconds = poll_seconds
        super().__init__(f"mapping-{function.name}", loops, backoff_seconds,
                         _STUCK_AFTER_SECONDS)

    def poll_once(self) -> int:
        """One pass over the partitions; the number of records delivered."""
        return sum(self._poll(partition) for partition in self.topic.partitions)

    def _poll(self, partition: Partition) -> int:
        index, position = partition.index, self.positions[partition.index]
        waiting = partition.end - position
        if waiting <= 0:
            self._drained(partition)
            return 0
        since = self._waiting_since.setdefault(index, time.monotonic())
        window = self.source.batching_window_seconds
        if waiting < self.source.batch_size and time.monotonic() - since < window:
            return 0
        records = within_payload(partition.read(position, self.source.batch_size))
        if not records:  # `end` was read unlocked: an append may still be under way
            return 0
        self._deliver(records)
        del self._waiting_since[index]
        return len(records)

    def _deliver(self, records: list[Record]) -> None:
        error = self._invoke(records)
        if error is None:
            self._commit(records)
        elif self.source.bisect_on_error and len(records) > 1:
            half = len(records) // 2
            self._deliver(records[:half])
            self._deliver(records[half:])
        else:
            self._send_on_failure(records, error)
            self._commit(records)

    def _invoke(self, records: list[Record]) -> FunctionError | None:
        """Invoke until it succeeds (None) or the retries are spent (the last error)."""
        event, failures = kafka_event(self.source.topic, records), 0
        while not self.loop.stopping.is_set():
            try:
                self.function.invoke(event)
                return None
            except Throttled:
                pass  # not an attempt: wait for a free slot
            except FunctionError as error:
                failures += 1
                if 0 <= self.source.max_retries < failures:
                    return error
                log.warning("batch failed; retrying", extra={
                    "function": self.function.name, "partition": records[0].partition,
                    "records": len(records), "failures": failures, "error": str(error)})
            self.loop.wait(min(self.backoff_seconds * 2 ** max(failures - 1, 0),
                               _MAX_BACKOFF_SECONDS))
        raise _Stopping

    def _commit(self, records: list[Record]) -> None:
        partition, next_offset = records[0].partition, records[-1].offset + 1
        self.topic.commit(self.group, {partition: next_offset})
        self.positions[partition] = next_offset

    def _send_on_failure(self, records: list[Record], error: FunctionError) -> None:
        first, last = records[0], records[-1]
        key = f"p={first.partition}/{first.offset:020d}-{last.offset:020d}.json"
        self.failures.put(key, json.dumps({
            "condition": "RetryAttemptsExhausted",
            "function": self.function.name,
            "error": str(error),
            "timestamp": iso(now_ms()),
            "KafkaBatchInfo": {"topic": self.source.topic, "partition": first.partition,
                               "batchSize": len(records), "firstOffset": first.offset,
                               "lastOffset": last.offset},
            "payload": kafka_event(self.source.topic, records),
        }).encode())
        self.function.metrics.sent_on_failure(len(records))
        log.error("batch sent to the on-failure destination", extra={
            "function": self.function.name, "key": key, "error": str(error)})

    def _drained(self, partition: Partition) -> None:
        now = time.monotonic()
        if self.on_drained is None or now < self._next_drain.get(partition.index, 0.0):
            return
        self._next_drain[partition.index] = now + _DRAIN_EVERY_SECONDS
        end, t = partition.seal()
        if end == self.positions[partition.index]:
            self.on_drained(partition.index, end, t)
