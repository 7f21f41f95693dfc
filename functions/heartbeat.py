"""The watermark heartbeat: a schedule (`rate(1 minute)`) that keeps idle partitions from
stalling the batch cut.

The archiver moves a partition's watermark only when it archives records of it; the cut is the
lowest watermark, so one idle partition would hold it back for ever. Each beat asks the bus,
per partition, for its end and a seal time t (every record at or past the end arrives at t or
later, `Sealable.seal`). A partition whose watermark says everything below that end is archived
(`next_offset == end`) is drained: its watermark moves to t. The move is a compare-and-swap
on the watermark object, so an archive batch landing meanwhile is never overwritten by it.
Locally, the stream mapping's drain hook does the same (`archive.ON_DRAINED`).

Buses plug in through `SEALABLE_PARTITIONS`: by `Settings.bus`, what lists the partitions as
`Sealable`s (the embedded log's and Kafka's here; Kinesis shards register theirs).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from lambdalake import master
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


SEALABLE_PARTITIONS: dict[str, Callable[[Settings], Iterable[Sealable]]] = {
    "embedded": _embedded,
    "kafka": _kafka,
}


# built once per cold start: a warm environment keeps its bus clients between beats
partitions = PerColdStart(lambda settings: list(SEALABLE_PARTITIONS[settings.bus](settings)))
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
    body = json.dumps({"next_offset": end, "watermark": t}).encode()
    try:
        store.replace(key, body, tag) if current else store.create(key, body)
    except PreconditionFailed:  # the archiver wrote it meanwhile: its watermark stands
        return False
    return True
