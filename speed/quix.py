"""The Quix Streams speed driver: the kernel's view state over the Kafka event topic, exactly once.

Built on Quix Streams' Kafka layer (`quixstreams.kafka`, librdkafka) in micro-batches, not on
its per-message dataframe: records are consumed 10,000 at a time and folded, up to 50,000
at once before each transaction, into one in-memory `ViewState` per event partition; once
read to the end of its partitions (at least every 500 ms and `flush_interval_ms` while
reading a backlog) one Kafka transaction writes what changed (cell values to the compacted
realtime topic, dedup ids and arrival to the compacted changelog, dead letters) together
with the consumed offsets. The transaction's broker round trips (offsets, commit, the next
begin) run in a background thread while the next records are consumed and folded; nothing
is produced until they are done. A worker killed at any moment restarts from the last committed
transaction: the state it rebuilds from the two compacted topics and the offsets it resumes
from were committed together, so no event is counted twice or lost. The transactional id is
stable per worker, so a restarted worker fences its previous incarnation and aborts its open
transaction at once.

    python -m lambdalake.speed.quix [--worker-id NAME]     (settings from LAMBDALAKE_* variables)
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pyarrow as pa
from confluent_kafka import KafkaException, Message, TopicPartition
from quixstreams.kafka import Consumer, Producer

from lambdalake import catalog
from lambdalake.event_columns import BatchDecoder
from lambdalake.eventlog import now_ms
from lambdalake.events import Validator
from lambdalake.kafka_security import kafka_security
from lambdalake.kafka_topics import changelog_topic, dlq_topic, realtime_topic
from lambdalake.project import Project
from lambdalake.settings import Settings
from lambdalake.speed.kafka_common import PartitionState, Record, restore_partitions
from lambdalake.speed.worker import read_floor, run_worker
from lambdalake.storage import ObjectStore

log = logging.getLogger("lambdalake.speed.quix")
BATCH = 10_000
# Consumed batches are folded together, before each transaction or once this many wait: a
# fold's fixed costs (the decode's checks, one Arrow group-by per view, a step per cell)
# are then shared by more events. The fold comes before the transaction that publishes it
# either way, so nothing is published later.
FOLD_AT = 50_000
IDLE_COMMIT_S = 1.0
BACKLOG_FLUSH_S = 0.5  # real-time views are published at least this often
IDLE_WAIT_S = 0.1  # for the next record
CATALOG_EVERY_S = 1.0
KAFKA_TIMEOUT_S = 60.0


def reported(callback: Callable[..., None]) -> Callable[..., None]:
    """A rebalance callback whose exception is logged, with its traceback, before it ends the
    worker: raised inside `consume`, confluent-kafka replaces it by a bare `SystemError`
    ("returned NULL without setting an exception") that names nothing."""

    @functools.wraps(callback)
    def run(*args: object) -> None:
        try:
            callback(*args)
        except Exception:
            log.exception("rebalance callback failed", extra={"callback": callback.__name__})
            raise

    return run


def group_id(settings: Settings) -> str:
    return f"{settings.topic}.speed"


class QuixSpeed:
    def __init__(self, settings: Settings, project: Project, store: ObjectStore, worker_id: str):
        self.settings, self.project, self.store = settings, project, store
        self.validator = Validator(project.schemas, settings.max_future_seconds * 1000)
        self.decoder = BatchDecoder(project.schemas, settings.max_future_seconds * 1000)
        self.topic = settings.topic
        self.flush_s = settings.flush_interval_ms / 1000
        bootstrap, security = settings.kafka_bootstrap, kafka_security(settings).librdkafka()
        self.consumer = Consumer(
            bootstrap,
            consumer_group=group_id(settings),
            auto_offset_reset="earliest",
            auto_commit_enable=False,
            extra_config={
                "isolation.level": "read_committed",
                "fetch.wait.max.ms": 50,
                "max.partition.fetch.bytes": 8 << 20,  # fewer, larger fetches: +15% read here
                # Fetch ahead while the worker folds, up to queued.max.messages.kbytes (64 MB)
                # in all: at the default 100,000 a partition the queue ran dry under a
                # backlog, and reading alone peaked at ~170,000 events/s (~250,000 now). A
                # backlog's peak RSS is ~70 MB more for it (473 -> 546 MB, 500,000 events).
                "queued.min.messages": 1_000_000,
                "fetch.max.bytes": 64 << 20,
                # a worker killed with -9 holds its partitions until this expires
                "session.timeout.ms": 10_000,
                "heartbeat.interval.ms": 2_000,
                **security,
            },
        )
        self.producer = Producer(
            bootstrap,
            transactional=True,
            extra_config={
                "transactional.id": f"{group_id(settings)}.{worker_id}",
                "transaction.timeout.ms": 10_000,
                "linger.ms": 5,
                **security,
            },
        )
        self.parts: dict[int, PartitionState] = {}
        self.kept = catalog.KeptVersions(store, project)
        self.floor = 0  # the lowest cut of a kept batch version: slices below it are dropped
        self._changed = False
        self._last_commit = self._last_catalog = 0.0
        self._pending: list[Message] = []  # consumed, not folded yet
        # The transaction committing in the background: its round trips to the broker (tens
        # of ms, far more under load) had stalled the fold a fifth of the time.
        self._committer = ThreadPoolExecutor(1, thread_name_prefix="quix-commit")
        self._decoder_thread = ThreadPoolExecutor(1, thread_name_prefix="quix-decode")
        self._committing: Future[None] | None = None

    def run(self, stop: threading.Event) -> None:
        """Consume until `stop` is set; then commit, leave the group and return."""
        self.producer.begin_transaction()
        self.follow_batch()
        self.consumer.subscribe(
            [self.topic], on_assign=self._assign, on_revoke=self._revoke, on_lost=self._lost
        )
        while not stop.is_set():
            self.step()
        self.consumer.close()  # revokes every partition: the last commit
        self._settle()
        self.producer.abort_transaction(KAFKA_TIMEOUT_S)  # the empty one opened after it
        self._committer.shutdown()
        self._decoder_thread.shutdown()

    def step(self) -> None:
        started = now_ms()
        # Wakes at the first record, then takes what has come with it: a consume of many
        # waits its whole timeout for a full batch.
        messages = self.consumer.consume(1, IDLE_WAIT_S)
        messages += self.consumer.consume(BATCH - 1, 0)
        self._pending += messages
        if len(self._pending) >= FOLD_AT:
            self._fold_pending()
        at_end = self._at_end()
        if at_end:
            for part in self.parts.values():
                part.caught_up_at = started
        self._changed |= bool(messages)
        now = time.monotonic()
        if now - self._last_catalog >= CATALOG_EVERY_S:
            self.follow_batch()
        since = now - self._last_commit
        # Read to the end, what changed is published at once (the transaction's own tens of
        # ms batch what comes meanwhile); while reading a backlog, whose events are late
        # already, at the published bound.
        due = 0.0 if at_end else max(self.flush_s, BACKLOG_FLUSH_S)
        if since >= due and (self._changed or since >= IDLE_COMMIT_S):
            self.commit()

    def _at_end(self) -> bool:
        """Whether every partition was consumed to its end as last fetched (read committed);
        consumed, not folded yet: the position is librdkafka's."""
        wanted = [TopicPartition(self.topic, number) for number in self.parts]
        for tp in self.consumer.position(wanted):
            _low, high = self.consumer.get_watermark_offsets(tp, cached=True)
            position = tp.offset if tp.offset >= 0 else self.parts[tp.partition].next_offset
            if position is not None and position < high:
                return False
        return True

    def _fold_pending(self) -> None:
        """Fold the consumed batches in, partition by partition, each in its order."""
        messages, self._pending = self._pending, []
        by_partition: dict[int, list[Message]] = {}
        for message in messages:
            if message.error() is not None:
                raise KafkaException(message.error())
            by_partition.setdefault(message.partition(), []).append(message)
        # Each partition's share but the first is decoded in another thread while the one
        # before it folds here (`pyarrow.json`, most of a decode, runs without the GIL). This
        # thread decodes the first, and any the other has not begun by its turn, rather than
        # wait for it: waiting was a third of its time.
        decoding: list[tuple[int, list[Message], list[bytes | None], list[int], np.ndarray,
                             Future[pa.Table | None] | None]] = []
        for number, taken in by_partition.items():
            values, timestamps = [m.value() for m in taken], [m.timestamp()[1] for m in taken]
            arrivals = self.parts[number].arrivals(timestamps)
            decoded = self._decoder_thread.submit(self.decoder.decode_batch, values,
                                                  arrivals) if decoding else None
            decoding.append((number, taken, values, timestamps, arrivals, decoded))
        for number, taken, values, timestamps, arrivals, decoded in decoding:
            part = self.parts[number]
            if decoded is None or decoded.cancel():
                events = self.decoder.decode_batch(values, arrivals)
            else:
                events = decoded.result()
            poison = part.take_decoded(values, timestamps, arrivals, events, self.validator)
            if poison:
                self._settle()
            for i, reason in poison:
                message = taken[i]
                source = f"{self.topic}/{number}/{message.offset()}"
                headers = [("reason", reason.encode()), ("source", source.encode())]
                self.producer.produce(dlq_topic(self.topic), values[i], message.key(),
                                      headers=headers)
            part.next_offset = taken[-1].offset() + 1

    def follow_batch(self) -> None:
        """Drop what every kept batch version covers (the store may be briefly unavailable)."""
        self._last_catalog = time.monotonic()
        floor = read_floor(self.kept)
        if floor is not None and floor > self.floor:
            self.floor, self._changed = floor, True
            for part in self.parts.values():
                part.follow(floor)

    def commit(self, wait: bool = False) -> None:
        """One transaction: what every partition's state changed, with the consumed offsets;
        it commits in the background (with `wait`, before this returns)."""
        self._fold_pending()
        self._settle()
        offsets = []
        for part in self.parts.values():
            self._produce(realtime_topic(self.topic), part.partition, part.realtime_records())
            self._produce(changelog_topic(self.topic), part.partition, part.changelog_records())
            part.flush_metrics()
            if part.next_offset is not None:
                offsets.append(TopicPartition(self.topic, part.partition, part.next_offset))
        metadata = self.consumer.consumer_group_metadata()
        self._committing = self._committer.submit(self._end_transaction, offsets, metadata)
        self._changed, self._last_commit = False, time.monotonic()
        if wait:
            self._settle()

    def _end_transaction(self, offsets: list[TopicPartition], metadata: object) -> None:
        self.producer.send_offsets_to_transaction(offsets, metadata, KAFKA_TIMEOUT_S)
        self.producer.commit_transaction(KAFKA_TIMEOUT_S)
        self.producer.begin_transaction()

    def _settle(self) -> None:
        """Wait for the transaction committing in the background, raising its error."""
        committing, self._committing = self._committing, None
        if committing is not None:
            committing.result()

    def _produce(self, topic: str, partition: int, records: list[Record]) -> None:
        for key, value in records:
            self.producer.produce(topic, value, key, partition=partition)

    @reported
    def _assign(self, _consumer: object, partitions: list[TopicPartition]) -> None:
        if not partitions:
            return
        # Waits until no transaction holding offsets of these partitions is pending, so the
        # state read below is the state those offsets were committed with.
        self.consumer.committed(partitions, KAFKA_TIMEOUT_S)
        numbers = [tp.partition for tp in partitions]
        self.parts.update(restore_partitions(self.settings, self.project, numbers, self.floor))
        log.info("partitions assigned, state restored", extra={"partitions": numbers})

    @reported
    def _revoke(self, _consumer: object, partitions: list[TopicPartition]) -> None:
        self.commit(wait=True)
        for tp in partitions:
            self.parts.pop(tp.partition, None)
        log.info("partitions revoked", extra={"partitions": [tp.partition for tp in partitions]})

    @reported
    def _lost(self, _consumer: object, partitions: list[TopicPartition]) -> None:
        lost = [tp.partition for tp in partitions]
        raise RuntimeError(f"partitions {lost} lost to another worker; restart to recover")


def main(argv: list[str] | None = None) -> None:
    run_worker("lambdalake.speed.quix", __doc__,
               "stable per worker: a restart fences its previous incarnation", QuixSpeed, argv)


if __name__ == "__main__":
    main()
