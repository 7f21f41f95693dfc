"""The Kafka speed layer seen by the serving layer: the compacted realtime topic, read from its
beginning (read committed), kept in `RealtimeCells`.

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
import uuid
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from lambdalake.kafka_security import PLAINTEXT, KafkaSecurity
from lambdalake.kafka_topics import realtime_topic
from lambdalake.loops import Loop, Loops
from lambdalake.monoids import merge_all
from lambdalake.realtime import RealtimeCells, decode_update
from lambdalake.viewstate import CellKey, CellUpdate

log = logging.getLogger("lambdalake.serving.feed")
BATCH = 10_000


class RealtimeFeed:
    def __init__(self, bootstrap: str, topic: str, cells: RealtimeCells,
                 loops: Loops | None = None, security: KafkaSecurity = PLAINTEXT):
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
        self._parts: dict[tuple[str, CellKey], dict[int, tuple[Any, ...]]] = {}
        self._heartbeats: dict[int, int] = {}
        self._digests: dict[int, str | None] = {}  # partition -> views its heartbeat names
        self._partitions: list[int] = []
        self._at_end: set[int] = set()
        self._pruned_below = 0
        self.loop = Loop("realtime-feed", self._step)
        if loops is not None:
            loops.add(self.loop)

    def start(self) -> None:
        self.assign()
        self.loop.start()

    def assign(self) -> None:
        topic = self.consumer.list_topics(self.topic, timeout=30).topics[self.topic]
        if topic.error is not None:
            raise KafkaException(topic.error)
        self._partitions = sorted(topic.partitions)
        self.consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING)
                              for p in self._partitions])

    def stop(self) -> None:
        self.loop.stop()
        self.consumer.close()

    def _step(self) -> float:
        self.poll_once()
        return 0.0

    def poll_once(self, timeout: float = 0.1) -> int:
        """Apply what the topic has; the number of records read."""
        messages = self.consumer.consume(BATCH, timeout)
        updates: list[CellUpdate] = []
        for message in messages:
            error = message.error()
            if error is not None and error.code() == KafkaError._PARTITION_EOF:
                self._at_end.add(message.partition())
            elif error is not None:
                raise KafkaException(error)
            else:
                self._read(message.key(), message.value(), updates)
        self.cells.upsert(updates)
        self._prune()
        digest = self.cells.project.digest
        current = all(d == digest for d in self._digests.values())
        if len(self._at_end) == len(self._partitions) and current:
            self.cells.restored.set()
        return len(messages)

    def _read(self, key: bytes, value: bytes | None, updates: list[CellUpdate]) -> None:
        decoded = orjson.loads(key)
        if len(decoded) == 1:
            self._heartbeat(decoded[0], orjson.loads(value) if value else None)
        elif value is not None:
            update = decode_update(value, self.cells.project)
            if update is not None:
                updates.append(self._merged(decoded[0], update))

    def _heartbeat(self, partition: int, beat: Any) -> None:
        """`{"caught_up_at": ms, "views": digest}`, or a bare ms from before views changed."""
        beat = beat if isinstance(beat, dict) else {"caught_up_at": beat or 0}
        self._heartbeats[partition] = beat["caught_up_at"]
        self._digests[partition] = beat.get("views")
        if len(self._heartbeats) >= len(self._partitions):
            self.cells.caught_up_at = min(self._heartbeats.values())

    def _merged(self, source: int, update: CellUpdate) -> CellUpdate:
        cell = (update.slice, update.bucket, update.key)
        parts = self._parts.setdefault((update.view, cell), {})
        parts[source] = update.values
        if len(parts) == 1:
            return update
        metrics = self.cells.project.views[update.view].metrics.values()
        values = tuple(
            merge_all(metric, [v[i] for v in parts.values()]) for i, metric in enumerate(metrics)
        )
        return CellUpdate(update.view, *cell, values)

    def _prune(self) -> None:
        """Forget partition values of slices every kept batch version covers."""
        cut = self.cells.cut
        if cut > self._pruned_below:
            self._pruned_below = cut
            for cell in [c for c in self._parts if c[1][0] < cut]:
                del self._parts[cell]
