"""A Kinesis event-source mapping, as AWS Lambda polls a stream's shards.

Per shard, in lineage order (a child only once each parent is finished: closed and every
record delivered), from its checkpoint: batches of up to `BatchSize` records (and 6 MB of
payload), sent once full or once the batching window has passed since records began
waiting, as the AWS Kinesis event (`data` base64, `sequenceNumber`,
`approximateArrivalTimestamp`, `eventID` = `shardId:sequenceNumber`). KPL aggregates are
delivered as they are, one record, as Lambda delivers them. Retries, bisection, partial
batch responses (`ReportBatchItemFailures`: the answer's `batchItemFailures` name records by
sequence number; the batch is checkpointed before the lowest and retried from it), record
age and the on-failure destination are the shared `mapping.Delivery`'s.

Where a shard starts without a checkpoint: a shard of the stream when the mapping is first
created starts at `StartingPosition` (LATEST is pinned as AT_TIMESTAMP of that moment, so a
restart before the first record skips nothing); a shard that appears later (a child) starts
at TRIM_HORIZON. Checkpoints are files under the runtime's folder, one per shard: the last
sequence number delivered, and whether the shard is finished.

The archiver hears, through `ShardHooks`, that a shard is finished (with its children), and
that an open shard is read to its end (`idle`, at most once a second, with a time every
later record arrives at or after: now less `SEAL_MARGIN_MS`, for the service's clock and
the moment a record becomes readable).
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from lambdalake import kinesis
from lambdalake.eventlog import now_ms
from lambdalake.functions.runtime.function import LocalFunction
from lambdalake.functions.runtime.mapping import (
    BatchPolling,
    first_failed,
    within_payload,
)
from lambdalake.functions.runtime.template import KinesisSource
from lambdalake.kinesis import KinesisRecord, Position, Shard, ShardReader
from lambdalake.loops import Loops
from lambdalake.storage import FileStore, NotFound

SEAL_MARGIN_MS = 2_000
_LIST_EVERY_SECONDS = 1.0
_IDLE_EVERY_SECONDS = 1.0
_RECORD_JSON_BYTES = 400  # a record's event JSON beyond its base64 data
REGION = "us-east-1"

log = logging.getLogger("lambdalake.functions.kinesis_source")


class ShardHooks(NamedTuple):
    idle: Callable[[str, str, int], None]  # (stream, shard id, t)
    finished: Callable[[str, str, list[str]], None]  # (stream, shard id, children)


def kinesis_record(stream_arn: str, record: KinesisRecord) -> dict[str, Any]:
    return {
        "kinesis": {
            "kinesisSchemaVersion": "1.0",
            "partitionKey": record.partition_key,
            "sequenceNumber": record.sequence_number,
            "data": base64.b64encode(record.data).decode(),
            "approximateArrivalTimestamp": record.approximate_arrival_ms / 1000,
        },
        "eventSource": "aws:kinesis",
        "eventVersion": "1.0",
        "eventID": f"{record.shard_id}:{record.sequence_number}",
        "eventName": "aws:kinesis:record",
        "invokeIdentityArn": "arn:aws:iam::123456789012:role/lambdalake-local",
        "awsRegion": REGION,
        "eventSourceARN": stream_arn,
    }


def kinesis_event(stream_arn: str, records: list[KinesisRecord]) -> dict[str, Any]:
    """The AWS Kinesis event of one shard's records."""
    return {"Records": [kinesis_record(stream_arn, r) for r in records]}


class ShardFeed:
    """One shard's records as the delivery sees them."""

    def __init__(self, mapping: KinesisMapping, shard_id: str):
        self.mapping, self.shard_id = mapping, shard_id

    def event(self, records: list[KinesisRecord]) -> dict[str, Any]:
        return kinesis_event(self.mapping.stream_arn, records)

    def commit(self, records: list[KinesisRecord]) -> None:
        self.mapping.checkpoint(self.shard_id, records[-1].sequence_number)

    def failed_from(self, records: list[KinesisRecord], answer: Any) -> int:
        return first_failed([record.sequence_number for record in records], answer)

    def failure(self, records: list[KinesisRecord]) -> tuple[str, dict[str, Any]]:
        first, last = records[0], records[-1]
        key = f"{self.shard_id}/{first.sequence_number}-{last.sequence_number}.json"
        return key, {"KinesisBatchInfo": {
            "shardId": self.shard_id, "startSequenceNumber": first.sequence_number,
            "endSequenceNumber": last.sequence_number,
            "approximateArrivalOfFirstRecord": first.approximate_arrival_ms,
            "approximateArrivalOfLastRecord": last.approximate_arrival_ms,
            "batchSize": len(records), "streamArn": self.mapping.stream_arn}}

    def age_seconds(self, records: list[KinesisRecord]) -> float:
        return (now_ms() - records[0].approximate_arrival_ms) / 1000


class _Shard:
    """A shard being read: its reader, the records waiting for a batch, since when."""

    def __init__(self, reader: ShardReader, feed: ShardFeed):
        self.reader, self.feed = reader, feed
        self.waiting: list[KinesisRecord] = []
        self.since = 0.0
        self.next_idle = 0.0


class KinesisMapping(BatchPolling[KinesisRecord]):
    def __init__(
        self,
        function: LocalFunction,
        source: KinesisSource,
        kinesis_client: Any,
        stream: str,
        folder: Path,
        hooks: ShardHooks | None = None,
        backoff_seconds: float = 0.5,
        poll_seconds: float = 0.2,
        loops: Loops | None = None,
    ):
        super().__init__(function, source, folder, backoff_seconds, poll_seconds, loops)
        self.source, self.kinesis, self.stream, self.hooks = (
            source, kinesis_client, stream, hooks)
        summary = kinesis_client.describe_stream_summary(StreamName=stream)
        self.stream_arn: str = summary["StreamDescriptionSummary"]["StreamARN"]
        self.checkpoints = FileStore(folder / "kinesis" / function.name / stream)
        self.shards: dict[str, _Shard] = {}
        self.listed: list[Shard] = []
        self._next_listing = 0.0
        self.created = self._created()

    # ------------------------------------------------------------ checkpoints

    def _created(self) -> dict[str, Any]:
        """The mapping's creation: when, and the shards it found (they take StartingPosition)."""
        try:
            return dict(json.loads(self.checkpoints.get("mapping.json")))
        except NotFound:
            pass
        initial = [s.shard_id for s in kinesis.list_shards(self.kinesis, self.stream)]
        created = {"created_ms": now_ms(), "initial_shards": initial}
        self.checkpoints.put("mapping.json", json.dumps(created).encode())
        return created

    def checkpoint(self, shard_id: str, sequence: str | None, finished: bool = False) -> None:
        body = {"sequence": sequence, "finished": finished}
        self.checkpoints.put(f"shards/{shard_id}.json", json.dumps(body).encode())

    def checkpoint_of(self, shard_id: str) -> dict[str, Any] | None:
        try:
            return dict(json.loads(self.checkpoints.get(f"shards/{shard_id}.json")))
        except NotFound:
            return None

    def finished(self) -> set[str]:
        return {key.rsplit("/", 1)[1].removesuffix(".json")
                for key in self.checkpoints.list("shards/")
                if json.loads(self.checkpoints.get(key))["finished"]}

    def _start_position(self, shard_id: str) -> Position:
        checkpoint = self.checkpoint_of(shard_id)
        if checkpoint is not None and checkpoint["sequence"] is not None:
            return Position.after(checkpoint["sequence"])
        if shard_id not in self.created["initial_shards"]:
            return Position.trim_horizon()  # a child: read whole, after its parents
        kind = self.source.starting_position
        if kind == "LATEST":
            return Position.at_timestamp(self.created["created_ms"])
        if kind == "AT_TIMESTAMP":
            return Position.at_timestamp(int((self.source.starting_timestamp or 0) * 1000))
        return Position.trim_horizon()

    # ------------------------------------------------------------ polling

    def poll_once(self) -> int:
        """One pass over the readable shards; the number of records delivered."""
        try:
            if time.monotonic() >= self._next_listing:
                self._list()
            return sum(self._poll(shard) for shard in list(self.shards.values()))
        except Exception:
            self.shards.clear()  # read again from the checkpoints: nothing skipped
            raise

    def _list(self) -> None:
        self._next_listing = time.monotonic() + _LIST_EVERY_SECONDS
        self.listed = kinesis.list_shards(self.kinesis, self.stream)
        by_id = {shard.shard_id: shard for shard in self.listed}
        for shard in kinesis.readable(self.listed, self.finished()):
            if shard.shard_id in self.shards:
                if self.shards[shard.shard_id].reader.shard != shard:  # e.g. closed since
                    self.shards[shard.shard_id].reader.reopen(shard)
            else:
                reader = ShardReader(self.kinesis, self.stream, shard,
                                     self._start_position(shard.shard_id), deaggregate=False)
                self.shards[shard.shard_id] = _Shard(reader, ShardFeed(self, shard.shard_id))
        for gone in set(self.shards) - set(by_id):
            del self.shards[gone]

    def _poll(self, shard: _Shard) -> int:
        reader, fresh = shard.reader, None
        sealed_at = now_ms() - SEAL_MARGIN_MS  # taken before the read it is about
        if len(shard.waiting) < self.source.batch_size and not reader.finished:
            fresh = reader.read(self.source.batch_size - len(shard.waiting))
            if fresh and not shard.waiting:
                shard.since = time.monotonic()
            shard.waiting += fresh
        if not shard.waiting:
            self._caught_up(shard, sealed_at if fresh == [] else None)
            return 0
        full = len(shard.waiting) >= self.source.batch_size
        window = self.source.batching_window_seconds
        if not full and not reader.finished and time.monotonic() - shard.since < window:
            return 0
        batch = within_payload(shard.waiting, lambda record: record.data, _RECORD_JSON_BYTES)
        shard.waiting = shard.waiting[len(batch):]
        shard.since = time.monotonic()
        self.delivery.deliver(shard.feed, batch)
        return len(batch)

    def _caught_up(self, shard: _Shard, sealed_at: int | None) -> None:
        """Nothing waiting: a closed shard read to its end is finished; an open one that a
        read just found empty, with nothing behind, is idle as of `sealed_at`."""
        reader, shard_id = shard.reader, shard.reader.shard.shard_id
        if reader.finished:
            last = self.checkpoint_of(shard_id)
            self.checkpoint(shard_id, last["sequence"] if last else None, finished=True)
            if self.hooks is not None:
                self.hooks.finished(self.stream, shard_id,
                                    kinesis.children(self.listed, shard_id))
            del self.shards[shard_id]
            self._next_listing = 0.0  # its children are readable now
            return
        now = time.monotonic()
        if (self.hooks is None or sealed_at is None or reader.millis_behind
                or now < shard.next_idle):
            return
        shard.next_idle = now + _IDLE_EVERY_SECONDS
        self.hooks.idle(self.stream, shard_id, sealed_at)
