"""The watermark heartbeat: a schedule (`rate(1 minute)`) that keeps idle partitions from
stalling the batch cut.

The archiver moves a partition's watermark only when it archives records of it; the cut is the
lowest watermark, so one idle partition would hold it back for ever. Each beat asks the bus,
per partition, for its end and a seal time t (every record at or past the end arrives at t or
later, `Sealable.seal`). A partition whose watermark says everything below that end is archived
(`next_offset == end`) is drained: its watermark moves to t. The move is a compare-and-swap
on the watermark object, so an archive batch landing meanwhile is never overwritten by it.
Locally, the stream mapping's drain hook does the same (`archive.ON_DRAINED`).

On Kinesis (`KinesisShard`), per shard listed at each beat: an open shard is drained when a
GetRecords after the last sequence number its watermark archived finds nothing and nothing
behind; `next_offset` is then the end, and t is taken before that call, as on Kafka. A
closed shard is never sealed: its watermark is its last arrival until its children are
archived, and the cut then skips it. An idle shard the archiver never met (Lambda invokes it
only with records) gets its watermark started as the archiver starts one
(`master.start_shard_mark`), once each parent still listed is closed and archived to its end.

Buses plug in through `SEALABLE_PARTITIONS`: by `Settings.bus`, what lists the partitions as
`Sealable`s (the embedded log's, Kafka's and Kinesis's).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from lambdalake import master
from lambdalake.eventlog import now_ms
from lambdalake.functions.environment import PerColdStart
from lambdalake.functions.schedule import require_scheduled
from lambdalake.settings import Settings
from lambdalake.storage import NotFound, ObjectStore, PreconditionFailed, open_store

log = logging.getLogger("lambdalake.functions.heartbeat")


class Sealable(Protocol):
    """A partition of the bus (a Kafka partition, a Kinesis shard) as the heartbeat sees it."""

    @property
    def index(self) -> int:
        """The partition's number in the archive's watermarks (`master/_watermarks/p=N`)."""

    def seal(self) -> tuple[int, int]:
        """(end, t): the partition's end offset, and a time every record at or past it
        arrives at or after."""


def _embedded(settings: Settings) -> Iterable[Sealable]:
    from lambdalake.bus import events_topic

    return events_topic(settings).partitions


def _kafka(settings: Settings) -> Iterable[Sealable]:
    from lambdalake.functions.runtime.kafka_source import KafkaTopic

    return KafkaTopic(settings.kafka_bootstrap, settings.topic).partitions


NOT_DRAINED = -1  # an end no watermark's next_offset ever equals


class KinesisShard:
    """A Kinesis shard as the heartbeat sees it; `listed` is the stream's listing it is in."""

    def __init__(self, kinesis: Any, stream: str, shard: Any, listed: dict[str, Any],
                 store: ObjectStore, clock_skew_ms: int = 1_000):
        self.kinesis, self.stream, self.shard, self.listed = kinesis, stream, shard, listed
        self.store, self.clock_skew_ms = store, clock_skew_ms

    @property
    def index(self) -> int:
        return int(self.shard.index)

    def seal(self) -> tuple[int, int]:
        t = now_ms() - self.clock_skew_ms
        if self.shard.closed:
            return NOT_DRAINED, t
        mark = self._mark()
        if mark is None or not self._read_to_end(self.shard, mark.get("sequence")):
            return NOT_DRAINED, t
        return int(mark["next_offset"]), t

    def _mark(self) -> dict[str, Any] | None:
        """The shard's watermark; started here when the archiver never met the shard and its
        parents are done (None while one is not)."""
        try:
            return dict(json.loads(self.store.get(master.shard_mark_key(self.shard.shard_id))))
        except NotFound:
            pass
        for parent in self.shard.parents:
            if parent in self.listed and not self._parent_done(self.listed[parent]):
                return None
        return master.start_shard_mark(self.store, self.listed, self.shard.shard_id)

    def _parent_done(self, parent: Any) -> bool:
        if not parent.closed:
            return False
        try:
            mark = json.loads(self.store.get(master.shard_mark_key(parent.shard_id)))
        except NotFound:
            mark = {}
        return bool(mark.get("finished")) or self._read_to_end(parent, mark.get("sequence"))

    def _read_to_end(self, shard: Any, sequence: str | None) -> bool:
        """Whether nothing follows `sequence` in the shard (None: nothing at all is in it)."""
        from lambdalake import kinesis

        position = (kinesis.Position.after(sequence) if sequence
                    else kinesis.Position.trim_horizon())
        reader = kinesis.ShardReader(self.kinesis, self.stream, shard, position)
        return not reader.read(limit=1) and reader.millis_behind == 0


class KinesisShards:
    """The stream's shards, listed again at each iteration (a beat): shards split and merge."""

    def __init__(self, settings: Settings):
        from lambdalake import kinesis

        self.kinesis = kinesis.client(settings.kinesis_endpoint_url)
        self.stream = settings.kinesis_stream
        self.store = open_store(settings.store_url, settings.s3_endpoint_url)

    def __iter__(self) -> Iterator[Sealable]:
        from lambdalake import kinesis

        listed = {s.shard_id: s for s in kinesis.list_shards(self.kinesis, self.stream)}
        for shard in kinesis.in_lineage_order(listed.values()):
            yield KinesisShard(self.kinesis, self.stream, shard, listed, self.store)


SEALABLE_PARTITIONS: dict[str, Callable[[Settings], Iterable[Sealable]]] = {
    "embedded": _embedded,
    "kafka": _kafka,
    "kinesis": KinesisShards,
}


# built once per cold start: a warm environment keeps its bus clients between beats (Kinesis
# lists its shards at each beat)
partitions = PerColdStart(lambda settings: SEALABLE_PARTITIONS[settings.bus](settings))
store = PerColdStart(lambda settings: open_store(settings.store_url, settings.s3_endpoint_url))


def handler(event: dict[str, Any], context: object) -> dict[str, Any]:
    require_scheduled(event, "watermark_heartbeat")
    advanced = [p.index for p in partitions() if advance_if_drained(store(), p)]
    log.info("watermark heartbeat", extra={"advanced": advanced})
    return {"advanced": advanced}


def advance_if_drained(store: ObjectStore, partition: Sealable) -> bool:
    """Move a drained partition's watermark to its seal time; whether it moved."""
    end, t = partition.seal()
    key = f"{master.WATERMARKS}/p={partition.index}.json"
    try:
        data, tag = store.get_tagged(key)
        current: dict[str, int] | None = json.loads(data)
    except NotFound:
        current, tag = None, ""
    archived = current["next_offset"] if current else 0
    if archived != end or (current and current["watermark"] >= t):
        return False
    # what else the watermark holds (a Kinesis shard's sequence, arrival, lineage) stays
    body = json.dumps({**(current or {}), "next_offset": end, "watermark": t}).encode()
    try:
        store.replace(key, body, tag) if current else store.create(key, body)
    except PreconditionFailed:  # the archiver wrote it meanwhile: its watermark stands
        return False
    return True
