"""What the Kafka speed drivers share: reading a record, the state of one event partition, and
the records that persist that state. The view logic itself is the kernel's `ViewState`.

One `PartitionState` per event-topic partition: the kernel's view state for that partition
alone, so a partition moves between workers with its state. What a transaction writes:
- to `<topic>.realtime`, keyed `[partition, view, slice, bucket, key]`: the whole current
  value of every cell changed since the last transaction (`ViewState.drain`), tombstones for
  cells dropped below the lowest cut of a kept batch version (kept down to it so that a
  rollback to any kept version is exact at once), and `[partition]` -> when the partition
  was last read to its end. This compacted topic is both the serving layer's feed and the
  cell state.
- to `<topic>.speed-changelog`: `[partition, "ids", seq]` -> the [type, event_id, arrival]
  ids read since the last transaction, hundreds a record (tombstoned once past the dedup
  window; records written before dedup was by type hold [event_id, arrival] pairs, restored
  as held for every type), and
  `[partition, "meta"]` -> arrival, cut, the event-topic offset after the last record
  folded (the offset the same transaction commits), and each view's definition fingerprint.
A restarted or rebalanced worker rebuilds the view state from both topics, read committed.
Cells carry their view's fingerprint (`lambdalake.realtime.encode_update`). A view changed or
added since the partition's last transaction is rebuilt from the event partition's beginning
up to that transaction's offset, and its old cells, like those of a removed view, are
tombstoned. The heartbeat names the project's digest, so the serving layer knows when every
partition's cells reflect the views as defined now (`serving.realtime_feed`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import orjson
import pyarrow as pa

from lambdalake.event_columns import BatchDecoder
from lambdalake.events import Event, Problem, Validator
from lambdalake.kafka_security import PLAINTEXT, KafkaSecurity, kafka_security
from lambdalake.kafka_topics import arrival as next_arrival
from lambdalake.kafka_topics import changelog_topic, realtime_topic
from lambdalake.project import Project
from lambdalake.realtime import decode_update, encode_update
from lambdalake.settings import Settings
from lambdalake.speed.metrics import APPLIED, DEAD_LETTERS, DedupGauges
from lambdalake.viewstate import CellKey, CellUpdate, ViewState

MAX_REASON = 1_000
IDS_PER_RECORD = 768  # ids a record: < 300 KB with 256-char ids and 64-char types
Record = tuple[bytes, bytes | None]  # (key, value); a None value is a tombstone


class Poison(str):
    """Why a record cannot be read: the `reason` header of its dead letter."""

    @classmethod
    def of(cls, problems: list[Problem]) -> Poison:
        return cls("; ".join(f"{p.field}: {p.error}" for p in problems)[:MAX_REASON])

    @property
    def kind(self) -> str:
        return "json" if self.startswith("$: not JSON") else "schema"


NO_VALUE = [Problem("$", "not JSON: the record has no value")]


def dumped(value: Any) -> bytes:
    """`orjson.dumps`, in bytes of its own size: orjson's keep their whole write buffer (4 KB
    at least, 130 KB for a 50 KB record), and records are held: dropped cells' keys until the
    next transaction, every latest record in the Kinesis driver."""
    return bytes(memoryview(orjson.dumps(value)))


def cell_key(partition: int, view: str, cell: CellKey) -> bytes:
    return dumped([partition, view, cell[0], cell[1], list(cell[2])])


def heartbeat_key(partition: int) -> bytes:
    return dumped([partition])


def meta_key(partition: int) -> bytes:
    return dumped([partition, "meta"])


def ids_key(partition: int, seq: int) -> bytes:
    return dumped([partition, "ids", seq])


class PartitionState:
    """One event partition: its view state and what the next transaction must write."""

    def __init__(self, partition: int, project: Project, settings: Settings):
        self.partition, self.project = partition, project
        self.view = ViewState(project, settings.slice_ms, settings.dedup_window_ms,
                              settings.dedup_max_ids)
        self._dedup_gauges = DedupGauges(str(partition))
        self.arrival = 0
        self.next_offset: int | None = None
        self.caught_up_at = 0
        # the ids read since the last transaction: types, event ids, arrivals
        self._fresh_ids: tuple[list[str], list[str], list[int]] = ([], [], [])
        self._chunks: dict[int, int] = {}  # ids chunk seq -> newest arrival in it
        self._dropped: list[bytes] = []
        self.redefined = False  # set by `restore`: the committed state names other views
        self._outcomes = {"counted": 0, "skipped": 0, "json": 0, "schema": 0}

    def take(self, value: bytes | None, timestamp: int, validator: Validator) -> Poison | None:
        """Fold one record in; the reason when it is poison."""
        self.arrival = arrival = next_arrival(self.arrival, timestamp)
        # `ts` is checked against the arrival, not the clock: a record read again after a
        # restart gets the same verdict.
        event = validator.validate_json(value, arrival) if value is not None else NO_VALUE
        if not isinstance(event, Event):
            poison = Poison.of(event)
            self._outcomes[poison.kind] += 1
            return poison
        self._remember([event.type], [event.event_id], [arrival])
        self._outcomes["counted" if self.view.apply(event, arrival) else "skipped"] += 1
        return None

    def take_all(
        self, values: list[bytes | None], timestamps: list[int], decoder: BatchDecoder,
        validator: Validator,
    ) -> list[tuple[int, Poison]]:
        """Fold records in, in order: column-wise when the whole batch is valid, else one by
        one. The poison among them: (index, reason)."""
        arrivals = self.arrivals(timestamps)
        events = decoder.decode_batch(values, arrivals)
        return self.take_decoded(values, timestamps, arrivals, events, validator)

    def arrivals(self, timestamps: list[int]) -> np.ndarray:
        """The arrivals of records with these timestamps, taken next."""
        return np.maximum.accumulate(np.array([self.arrival, *timestamps], np.int64))[1:]

    def take_decoded(
        self, values: list[bytes | None], timestamps: list[int], arrivals: np.ndarray,
        events: pa.Table | None, validator: Validator,
    ) -> list[tuple[int, Poison]]:
        """`take_all` of records `decode_batch` decoded as `events` (None: record by record)
        with these `arrivals`."""
        if events is None:
            taken = (self.take(v, ts, validator) for v, ts in zip(values, timestamps, strict=True))
            return [(i, reason) for i, reason in enumerate(taken) if reason is not None]
        self.arrival = int(arrivals[-1])
        kinds, ids = events["type"].to_pylist(), events["event_id"].to_pylist()
        self._remember(kinds, ids, arrivals.tolist())
        counted = int(self.view.apply_batch(events, (kinds, ids)).sum())
        self._outcomes["counted"] += counted
        self._outcomes["skipped"] += len(values) - counted
        return []

    def _remember(self, kinds: list[str], ids: list[str], arrivals: list[int]) -> None:
        fresh_kinds, fresh_ids, fresh_arrivals = self._fresh_ids
        fresh_kinds += kinds
        fresh_ids += ids
        fresh_arrivals += arrivals

    def flush_metrics(self) -> None:
        """Add the outcomes counted since the last call to the Prometheus counters; set the
        dedup gauges."""
        for outcome, n in self._outcomes.items():
            if n:
                counter = APPLIED if outcome in ("counted", "skipped") else DEAD_LETTERS
                counter.labels(outcome).inc(n)
                self._outcomes[outcome] = 0
        self._dedup_gauges.report(self.view)

    def follow(self, cut: int) -> None:
        """Drop the slices every kept batch version covers (below `cut`, the lowest kept
        cut), remembering their keys."""
        if cut <= self.view.cut:
            return
        self._dropped += [
            cell_key(self.partition, name, cell)
            for name, cells in self.view.cells.items()
            for cell in cells
            if cell[0] < cut
        ]
        self.view.drop_below(cut)

    def realtime_records(self) -> list[Record]:
        records: list[Record] = [
            (cell_key(self.partition, u.view, (u.slice, u.bucket, u.key)),
             encode_update(u, self.project))
            for u in self.view.drain()
        ]
        # tombstones first: a rebuilt cell may have the key of one it replaces
        records = [(key, None) for key in self._dropped] + records
        self._dropped = []
        heartbeat = {"caught_up_at": self.caught_up_at, "views": self.project.digest}
        records.append((heartbeat_key(self.partition), dumped(heartbeat)))
        return records

    def changelog_records(self) -> list[Record]:
        records: list[Record] = []
        seq = max(self._chunks, default=-1) + 1
        kinds, ids, arrivals = self._fresh_ids
        for at in range(0, len(ids), IDS_PER_RECORD):
            till = at + IDS_PER_RECORD
            chunk = list(zip(kinds[at:till], ids[at:till], arrivals[at:till], strict=True))
            records.append((ids_key(self.partition, seq), dumped(chunk)))
            self._chunks[seq] = arrivals[min(till, len(ids)) - 1]
            seq += 1
        self._fresh_ids = ([], [], [])
        horizon = self.view.dedup_horizon
        for seq in [s for s, newest in self._chunks.items() if newest < horizon]:
            records.append((ids_key(self.partition, seq), None))
            del self._chunks[seq]
        meta = {"arrival": self.arrival, "cut": self.view.cut, "offset": self.next_offset,
                "views": self.project.fingerprints}
        records.append((meta_key(self.partition), dumped(meta)))
        return records

    def restore(self, realtime: dict[bytes, bytes], changelog: dict[bytes, bytes]) -> set[str]:
        """Rebuild from the latest committed records of this partition (tombstones removed);
        the views they do not hold as defined now, to rebuild from the event partition."""
        meta = orjson.loads(changelog.get(meta_key(self.partition), b'{"arrival":0,"cut":0}'))
        fingerprints = self.project.fingerprints
        kept = {name for name, fp in meta.get("views", {}).items() if fingerprints.get(name) == fp}
        # the committed state names other views (added, changed, removed): it must be written
        # again, with a heartbeat naming today's, before the serving layer may answer
        self.redefined = meta.get("views", {}) != fingerprints
        cells: list[CellUpdate] = []
        for key, value in realtime.items():
            decoded = orjson.loads(key)
            if len(decoded) == 5 and decoded[0] == self.partition:
                update = decode_update(value, self.project) if decoded[1] in kept else None
                if update is None:
                    self._dropped.append(key)  # a removed or changed view's
                else:
                    cells.append(update)
        held: list[list[Any]] = []
        for seq, ids in self._id_chunks(changelog):
            self._chunks[seq] = ids[-1][-1] if ids else 0
            held += ids
        self.arrival, self.next_offset = meta["arrival"], meta.get("offset")
        newest = max((entry[-1] for entry in held), default=0)
        self.view.load(meta["cut"], newest, cells, held)
        return set(fingerprints) - kept

    def rebuild(self, names: Iterable[str], cut: int,
                records: Iterable[tuple[bytes | None, int]], validator: Validator) -> None:
        """Fold the partition's records up to the restored offset, (value, timestamp) in
        offset order, into the views named, afresh."""
        rebuilt, arrival = self.view.for_views(names, cut), 0
        for value, timestamp in records:
            arrival = next_arrival(arrival, timestamp)
            event = validator.validate_json(value, arrival) if value is not None else None
            if isinstance(event, Event):
                rebuilt.apply(event, arrival)
        self.view.adopt(rebuilt)

    def _id_chunks(self, changelog: dict[bytes, bytes]) -> list[tuple[int, list[Any]]]:
        chunks = []
        for key, value in changelog.items():
            decoded = orjson.loads(key)
            if decoded[0] == self.partition and decoded[1] == "ids":
                chunks.append((decoded[2], orjson.loads(value)))
        return sorted(chunks)


def restore_partitions(
    settings: Settings, project: Project, numbers: list[int], cut: int
) -> dict[int, PartitionState]:
    """The view states of these event partitions, rebuilt from what their last committed
    transactions wrote, with the slices below `cut` dropped (the real-time floor:
    `catalog.KeptVersions.floor`), and the views changed since rebuilt from the event topic."""
    realtime, changelog = realtime_topic(settings.topic), changelog_topic(settings.topic)
    security = kafka_security(settings)
    latest = read_compacted(
        settings.kafka_bootstrap, [(t, p) for t in (realtime, changelog) for p in numbers],
        security=security,
    )
    validator = Validator(project.schemas, settings.max_future_seconds * 1000)
    parts = {}
    for number in numbers:
        part = parts[number] = PartitionState(number, project, settings)
        stale = part.restore(latest[(realtime, number)], latest[(changelog, number)])
        part.follow(cut)
        if stale and part.next_offset:
            records = read_partition(settings.kafka_bootstrap, settings.topic, number,
                                     part.next_offset, security=security)
            part.rebuild(stale, cut, records, validator)
    return parts


def read_partition(
    bootstrap: str, topic: str, partition: int, end: int, timeout_s: float = 300.0,
    security: KafkaSecurity = PLAINTEXT,
) -> Iterable[tuple[bytes | None, int]]:
    """(value, timestamp) of the committed records of one partition before offset `end`,
    from the beginning of what the broker retains."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException
    from confluent_kafka import TopicPartition as Tp

    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": "lambdalake-rebuild",
        "enable.auto.commit": False,
        "enable.partition.eof": True,
        "isolation.level": "read_committed",
        **security.librdkafka(),
    })
    deadline = time.monotonic() + timeout_s
    try:
        consumer.assign([Tp(topic, partition, OFFSET_BEGINNING)])
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"rebuilding views: {topic}/{partition} not read in time")
            for message in consumer.consume(10_000, 0.5):
                error = message.error()
                if error is not None and error.code() == KafkaError._PARTITION_EOF:
                    return  # `end` was committed, so the records before it are all read
                if error is not None:
                    raise KafkaException(error)
                if message.offset() >= end:
                    return
                yield message.value(), message.timestamp()[1]
    finally:
        consumer.close()


def read_compacted(
    bootstrap: str, topic_partitions: list[tuple[str, int]], timeout_s: float = 120.0,
    security: KafkaSecurity = PLAINTEXT,
) -> dict[tuple[str, int], dict[bytes, bytes]]:
    """The latest committed value of every key of each topic partition, read to its end."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException
    from confluent_kafka import TopicPartition as Tp

    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": "lambdalake-restore",
        "enable.auto.commit": False,
        "enable.partition.eof": True,
        "isolation.level": "read_committed",
        **security.librdkafka(),
    })
    latest: dict[tuple[str, int], dict[bytes, bytes]] = {tp: {} for tp in topic_partitions}
    pending = set(topic_partitions)
    deadline = time.monotonic() + timeout_s
    try:
        consumer.assign([Tp(t, p, OFFSET_BEGINNING) for t, p in topic_partitions])
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"restoring speed state: {sorted(pending)} not read in time")
            for message in consumer.consume(10_000, 0.5):
                tp = (message.topic(), message.partition())
                error = message.error()
                if error is not None and error.code() == KafkaError._PARTITION_EOF:
                    pending.discard(tp)
                elif error is not None:
                    raise KafkaException(error)
                elif message.value() is None:
                    latest[tp].pop(message.key(), None)
                else:
                    latest[tp][message.key()] = message.value()
    finally:
        consumer.close()
    return latest
