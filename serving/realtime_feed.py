"""The speed layer seen by the serving layer, kept in `RealtimeCells`: on Kafka the compacted
realtime topic, read from its beginning (read committed) (`RealtimeFeed`); on Kinesis each
shard's state in the object store (`StoreFeed`), holding the same records. Both apply them
alike (`FeedRecords`).

The speed layer publishes the whole value of a cell per event partition (key
`[partition, view, slice, bucket, key]`); the value served is the monoid merge of the latest
value of every partition. `[partition]` records say when that partition was last read to
its end; `caught_up_at` is the oldest of them once every partition has reported.
`cells.restored` is set once every partition of the topic was read to its end and each
one's latest heartbeat (if it has one) names this project's views as defined now
(`Project.digest`): the cells then hold at least everything the speed layer had committed
when the feed started, computed with today's view definitions (after a view changed, the
speed layer's first transaction, with the rebuilt views, brings that heartbeat). Cells of a
view defined otherwise (changed or removed) are ignored.
Tombstones (cells the speed layer dropped below the real-time floor) change nothing here:
those cells leave when the serving layer's own floor passes them (`RealtimeCells.drop_below`).

    feed = RealtimeFeed(settings.kafka_bootstrap, settings.topic, cells,
                        security=kafka_security(settings))
    feed.start()    # a loop (`lambdalake.loops`) in a daemon thread
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import orjson

from lambdalake.kafka_security import PLAINTEXT, KafkaSecurity
from lambdalake.kafka_topics import realtime_topic
from lambdalake.kinesis import shard_index
from lambdalake.loops import Loops
from lambdalake.monoids import merge_all
from lambdalake.polling import Poller
from lambdalake.realtime import RealtimeCells, decode_update
from lambdalake.shard_state import (
    Head,
    Record,
    read_delta,
    read_head,
    read_snapshot,
    shards_with_state,
)
from lambdalake.storage import NotFound, ObjectStore
from lambdalake.viewstate import CellKey, CellUpdate

log = logging.getLogger("lambdalake.serving.feed")
BATCH = 10_000
LIST_EVERY_S = 2.0  # how often the Kinesis feed looks for shards it has not seen
READERS = 8  # shards whose state the Kinesis feed reads at once


class FeedRecords:
    """What every feed of the speed layer keeps of its records: the latest value of each cell
    per source partition (or shard), merged into `cells`, and the heartbeats."""

    def __init__(self, cells: RealtimeCells):
        self.cells = cells
        self._parts: dict[tuple[str, CellKey], dict[int, tuple[Any, ...]]] = {}
        self._heartbeats: dict[int, int] = {}
        self._digests: dict[int, str | None] = {}  # partition -> views its heartbeat names
        self._finished: set[int] = set()  # Kinesis shards closed and read to their end
        self._pruned_below = 0

    def read(self, records: Iterable[tuple[bytes, bytes | None]],
             sources: int) -> list[CellUpdate]:
        """Records of `sources` partitions, in order: cell values and heartbeats. The merged
        value of every cell they changed, merged once however many partitions' values came:
        a transaction of each partition brings the same hot cells."""
        changed: dict[tuple[str, CellKey], None] = {}  # in order, once each
        for key, value in records:
            decoded = orjson.loads(key)
            if len(decoded) == 1:
                self.heartbeat(decoded[0], orjson.loads(value) if value else None, sources)
            elif value is not None:
                update = decode_update(value, self.cells.project)
                if update is not None:
                    cell = (update.view, (update.slice, update.bucket, update.key))
                    self._parts.setdefault(cell, {})[decoded[0]] = update.values
                    changed[cell] = None
        return [self._merged(view, cell) for view, cell in changed]

    def heartbeat(self, partition: int, beat: Any, sources: int) -> None:
        """`{"caught_up_at": ms, "views": digest}` (`"finished": true` once a Kinesis shard is
        read to its end: it no longer holds the lag back), or a bare ms from before views
        changed."""
        beat = beat if isinstance(beat, dict) else {"caught_up_at": beat or 0}
        self._digests[partition] = beat.get("views")
        if beat.get("finished"):
            self._finished.add(partition)
            self._heartbeats.pop(partition, None)
        else:
            self._heartbeats[partition] = beat["caught_up_at"]
        if self._heartbeats and len(self._heartbeats) + len(self._finished) >= sources:
            self.cells.caught_up_at = min(self._heartbeats.values())

    def current(self) -> bool:
        """Whether every heartbeat read names the project's views as defined now."""
        digest = self.cells.project.digest
        return all(d == digest for d in self._digests.values())

    def _merged(self, view: str, cell: CellKey) -> CellUpdate:
        parts = self._parts[view, cell]
        if len(parts) == 1:
            return CellUpdate(view, *cell, next(iter(parts.values())))
        metrics = self.cells.project.views[view].metrics.values()
        values = tuple(
            merge_all(metric, [v[i] for v in parts.values()]) for i, metric in enumerate(metrics)
        )
        return CellUpdate(view, *cell, values)

    def prune(self) -> None:
        """Forget partition values of slices every kept batch version covers."""
        cut = self.cells.cut
        if cut > self._pruned_below:
            self._pruned_below = cut
            for cell in [c for c in self._parts if c[1][0] < cut]:
                del self._parts[cell]


class RealtimeFeed(Poller):
    idle_seconds = 0.0  # `consume` itself waits for records

    def __init__(self, bootstrap: str, topic: str, cells: RealtimeCells,
                 loops: Loops | None = None, security: KafkaSecurity = PLAINTEXT):
        from confluent_kafka import Consumer  # the `kafka` extra: imported when a feed is made

        self.cells, self.topic = cells, realtime_topic(topic)
        self.consumer = Consumer({
            "bootstrap.servers": bootstrap,
            "group.id": f"lambdalake-serving-{uuid.uuid4().hex}",  # never joins nor commits
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "isolation.level": "read_committed",
            "fetch.wait.max.ms": 50,
            **security.librdkafka(),
        })
        self.records = FeedRecords(cells)
        self._partitions: list[int] = []
        self._at_end: set[int] = set()
        super().__init__("realtime-feed", loops)

    def start(self) -> None:
        self.assign()
        super().start()

    def assign(self) -> None:
        from confluent_kafka import OFFSET_BEGINNING, KafkaException, TopicPartition

        topic = self.consumer.list_topics(self.topic, timeout=30).topics[self.topic]
        if topic.error is not None:
            raise KafkaException(topic.error)
        self._partitions = sorted(topic.partitions)
        self.consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING)
                              for p in self._partitions])

    def stop(self) -> None:
        super().stop()
        self.consumer.close()

    def poll_once(self, timeout: float = 0.1) -> int:
        """Apply what the topic has; the number of records read."""
        from confluent_kafka import KafkaError, KafkaException

        # Wakes at the first record, then takes what has come with it: a consume of many
        # waits its whole timeout for a full batch, and so would hold a fresh update back.
        messages = self.consumer.consume(1, timeout)
        messages += self.consumer.consume(BATCH - 1, 0)
        records = []
        for message in messages:
            error = message.error()
            if error is not None and error.code() == KafkaError._PARTITION_EOF:
                self._at_end.add(message.partition())
            elif error is not None:
                raise KafkaException(error)
            else:
                records.append((message.key(), message.value()))
        self.cells.upsert(self.records.read(records, len(self._partitions)))
        self.records.prune()
        if len(self._at_end) == len(self._partitions) and self.records.current():
            self.cells.restored.set()
        return len(messages)


class StoreFeed(Poller):
    """The Kinesis speed layer seen by the serving layer: each shard's head, snapshot and
    deltas in the object store (`lambdalake.shard_state`), which are also the speed layer's
    state, so every replica reads them and nothing is lost across a restart. Read as the Kafka
    feed reads the compacted topic: a shard's snapshot, then each delta once, in order (a new
    snapshot is read whole again: values are whole cell values, so reading one twice is safe).
    `cells.restored` is set once every shard with state at start was read to its head."""

    def __init__(self, store: ObjectStore, stream: str, cells: RealtimeCells,
                 loops: Loops | None = None, poll_s: float = 0.1):
        self.store, self.stream, self.cells = store, stream, cells
        self.records = FeedRecords(cells)
        self._tags: dict[str, str] = {}  # shard -> the head's tag last read
        self._read: dict[str, tuple[dict[str, str], set[str]]] = {}  # snapshot, deltas read
        self._shards: list[str] = []
        self._listed_at = 0.0
        self._reads = ThreadPoolExecutor(READERS, thread_name_prefix="feed-reads")
        self._listing: Future[list[str]] | None = None
        super().__init__("realtime-feed", loops)
        self.busy_seconds = self.idle_seconds = poll_s

    def stop(self) -> None:
        super().stop()
        self._reads.shutdown(wait=True)

    def poll_once(self) -> int:
        """Apply what changed in every shard's state; the number of deltas read."""
        self._list_shards()
        # the reads of every shard at once (I/O); then applied in order, in this thread
        changes = [c for c in self._reads.map(self._changes, self._shards) if c is not None]
        updates: list[CellUpdate] = []
        for shard_id, head, tag, records, read in changes:
            updates += self.records.read(records, len(self._shards))
            beat = head.heartbeat or {"caught_up_at": 0}
            self.records.heartbeat(shard_index(shard_id), beat, len(self._shards))
            self._read[shard_id] = (head.snapshot, read)
            self._tags[shard_id] = tag
        self.cells.upsert(updates)
        self.records.prune()
        if self.records.current():
            self.cells.restored.set()
        return len(changes)

    def _list_shards(self) -> None:
        """Look for new shards every LIST_EVERY_S, from a thread (a listing reads every
        delta's key): the first time, before anything is read."""
        if self._listing is None and time.monotonic() - self._listed_at >= LIST_EVERY_S:
            self._listed_at = time.monotonic()
            self._listing = self._reads.submit(shards_with_state, self.store, self.stream)
        if self._listing is not None and (self._listing.done() or not self._shards):
            self._shards, self._listing = self._listing.result(), None

    def _changes(self, shard_id: str) -> tuple[str, Head, str, list[Record], set[str]] | None:
        """What the shard's state holds that this feed has not read: (shard, head, its tag,
        records, the deltas read once these are applied); None when nothing changed."""
        found = read_head(self.store, self.stream, shard_id)
        if found is None or found[1] == self._tags.get(shard_id):
            return None
        head, tag = found
        snapshot, seen = self._read.get(shard_id, ({}, set()))
        records: list[Record] = []
        try:
            if head.snapshot != snapshot:
                records += read_snapshot(self.store, head, "realtime")
                seen = set()
            for key in head.deltas:
                if key not in seen:
                    records += read_delta(self.store, key)["realtime"]
        except NotFound:
            return None  # a newer snapshot replaced what the head named: read the next head
        return shard_id, head, tag, records, set(head.deltas)
