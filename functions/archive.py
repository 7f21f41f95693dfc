"""Archiving: stream batches (the AWS MSK / self-managed Kafka event, or the Kinesis event)
into the master dataset.

Per topic-partition of a batch, every record is validated again (producers may write to the
bus directly), by the same check of its bytes as the speed layer's. Valid records become
Parquet objects; the others, and any a Parquet column cannot hold (a record an older
version accepted), with the reason, a dead-letter object
`master/_dead_letter/p=<partition>/<first>-<last>.jsonl`: counted, never dropped, never
blocking. Then the partition's watermark moves to the last record's arrival: every record
arriving before it is archived. The handler raises only when the store fails, so a retried
batch is one the store failed, never one a record fails on every try. Objects are named by
offsets, so a retried batch rewrites the same objects, and a watermark never moves back.

On Kinesis (`Records[].kinesis`, parsed with Powertools' event data classes) the same, per
shard: KPL aggregates are de-aggregated; a record's arrival is its shard's running maximum
of `approximateArrivalTimestamp` (`lambdalake.kinesis`), kept in the shard's watermark with
the last sequence number archived and a running ordinal (the master rows' `offset`). Records
at or below that sequence number were archived before (a batch redelivered after its
checkpoint was lost) and are skipped; objects are named by shard and sequence range, so a
retried batch rewrites the same objects. The first batch of a shard lists the stream: its
arrival starts at its parents' last arrival, and its parents, which Lambda finishes before a
child, are marked finished with their children (the batch cut, `master.shard_bounds`).
A batch is archived in chunks; when the store fails part way, the handler answers
`batchItemFailures` from the first record not archived (the template's mapping declares
`ReportBatchItemFailures`, which this handler needs: without it that answer is ignored).
"""

from __future__ import annotations

import base64
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from aws_lambda_powertools.utilities.data_classes import KinesisStreamEvent
from aws_lambda_powertools.utilities.data_classes.kinesis_stream_event import (
    KinesisStreamRecord,
    KinesisStreamRecordPayload,
)
from prometheus_client import Counter

from lambdalake import kinesis, master
from lambdalake.events import Event, EventSchema, Problem, Validator
from lambdalake.functions.environment import PerColdStart
from lambdalake.project import load_project
from lambdalake.settings import Settings
from lambdalake.storage import NotFound, ObjectStore, open_store

DEAD_LETTER = master.DEAD_LETTER
KINESIS_CHUNK_RECORDS = 2_000  # Kinesis records archived (objects and watermark) at a time
RECORDS = Counter("lambdalake_archive_records_total", "Records archived, by outcome", ["outcome"])

log = logging.getLogger("lambdalake.functions.archive")


@dataclass(frozen=True)
class Archiver:
    store: ObjectStore
    schemas: dict[str, EventSchema]
    validator: Validator
    kinesis_endpoint_url: str | None = None
    _clients: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings) -> Archiver:
        schemas = load_project(settings.project).schemas
        store = open_store(settings.store_url, settings.s3_endpoint_url)
        return cls(store, schemas, Validator(schemas, settings.max_future_seconds * 1000),
                   settings.kinesis_endpoint_url)

    def check(self, record: dict[str, Any]) -> Event | list[Problem]:
        """The record's event, validated as at its arrival (so a retry decides the same), by
        the speed layer's own check of the same bytes."""
        if record.get("value") is None:
            return [Problem("$", "record has no value")]
        try:
            value = base64.b64decode(record["value"], validate=True)
        except ValueError:
            return [Problem("$", "record value is not base64")]
        return self.validator.validate_json(value, now_ms=record["timestamp"])

    def archive(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        """Archive one partition's records (in offset order); return what was written. A
        record refused by validation, or by the master dataset's columns, is dead-lettered
        with its reason; only a failure of the store raises (and is retried)."""
        partition, first, last = records[0]["partition"], records[0], records[-1]
        rows: list[master.Archived] = []
        dead: list[dict[str, Any]] = []
        for record in records:
            result = self.check(record)
            if isinstance(result, Event):
                rows.append(master.Archived(result, partition, record["offset"],
                                            record["timestamp"]))
            else:
                reason = "; ".join(f"{p.field}: {p.error}" for p in result)
                dead.append({**record, "reason": reason})
        keys, unstorable = master.write_batch(self.store, self.schemas, partition, rows)
        if unstorable:
            by_offset = {record["offset"]: record for record in records}
            dead += [{**by_offset[u.row.offset], "reason": u.reason} for u in unstorable]
            dead.sort(key=lambda d: d["offset"])
        if dead:
            key = f"{DEAD_LETTER}/p={partition}/{first['offset']:020d}-{last['offset']:020d}.jsonl"
            self.store.put(key, "".join(json.dumps(d) + "\n" for d in dead).encode())
            keys.append(key)
            log.warning("records dead-lettered", extra={"partition": partition,
                                                        "records": len(dead), "key": key})
        advance_watermark(partition, last["offset"] + 1, last["timestamp"])
        RECORDS.labels("archived").inc(len(rows) - len(unstorable))
        RECORDS.labels("dead_letter").inc(len(dead))
        return {"archived": len(rows) - len(unstorable), "dead_lettered": len(dead),
                "objects": keys}


    # ------------------------------------------------------------ Kinesis

    def kinesis_client(self) -> Any:
        if "kinesis" not in self._clients:
            self._clients["kinesis"] = kinesis.client(self.kinesis_endpoint_url)
        return self._clients["kinesis"]

    def shard_mark(self, stream: str, shard_id: str) -> dict[str, Any]:
        """The shard's watermark; a shard met for the first time starts one
        (`master.start_shard_mark`: Lambda finishes a parent before it hands out a child)."""
        try:
            return dict(json.loads(self.store.get(master.shard_mark_key(shard_id))))
        except NotFound:
            listed = {s.shard_id: s for s in kinesis.list_shards(self.kinesis_client(), stream)}
            return master.start_shard_mark(self.store, listed, shard_id)

    def put_mark(self, mark: dict[str, Any]) -> None:
        master.put_shard_mark(self.store, mark)

    def archive_shard(self, stream: str, shard_id: str,
                      records: list[KinesisStreamRecord]) -> tuple[dict[str, Any], str | None]:
        """Archive one shard's records in sequence order; what was written, and the sequence
        number of the first record not archived (None: all were)."""
        mark = self.shard_mark(stream, shard_id)
        done = mark["sequence"]
        fresh = [r for r in records if done is None or kinesis.sequence_key(
            r.kinesis.sequence_number) > kinesis.sequence_key(done)]
        summary: dict[str, Any] = {"archived": 0, "dead_lettered": 0, "objects": []}
        for start in range(0, len(fresh), KINESIS_CHUNK_RECORDS):
            chunk = fresh[start:start + KINESIS_CHUNK_RECORDS]
            try:
                written = self._archive_chunk(mark, chunk)
            except Exception:  # the store: the rest is retried, from this chunk on
                log.exception("archiving failed; reporting the rest as failed", extra={
                    "shard": shard_id, "from": chunk[0].kinesis.sequence_number})
                return summary, chunk[0].kinesis.sequence_number
            summary = {key: summary[key] + written[key] for key in summary}
        return summary, None

    def _archive_chunk(self, mark: dict[str, Any],
                       chunk: list[KinesisStreamRecord]) -> dict[str, Any]:
        shard_id = mark["shard"]
        partition = kinesis.shard_index(shard_id)
        offset, arrival = mark["next_offset"], mark["arrival"]
        rows: list[master.Archived] = []
        origins: dict[int, _Origin] = {}  # by offset: where each user record came from
        dead: list[dict[str, Any]] = []
        for record in chunk:
            payload = record.kinesis
            approximate = kinesis.arrival_ms(payload.approximate_arrival_timestamp)
            arrival = kinesis.next_arrival(arrival, approximate)
            for sub, (key, value, problem) in enumerate(_user_records(payload)):
                origins[offset] = _Origin(shard_id, payload, sub, key, value, arrival)
                result = [problem] if problem else self.validator.validate_json(value, arrival)
                if isinstance(result, Event):
                    rows.append(master.Archived(result, partition, offset, arrival))
                else:
                    dead.append(origins[offset].letter(_reasons(result)))
                offset += 1
        span = master.sequence_span(chunk[0].kinesis.sequence_number,
                                    chunk[-1].kinesis.sequence_number)
        keys, unstorable = master.write_batch(self.store, self.schemas, partition, rows, span)
        dead += [origins[u.row.offset].letter(u.reason) for u in unstorable]
        if dead:
            keys.append(self._dead_letter(partition, span, dead))
        mark.update(next_offset=offset, arrival=arrival,
                    watermark=max(mark["watermark"], arrival),
                    sequence=chunk[-1].kinesis.sequence_number)
        self.put_mark(mark)
        return self._counted(len(rows) - len(unstorable), dead, keys)

    def _dead_letter(self, partition: int, span: str, dead: list[dict[str, Any]]) -> str:
        dead.sort(key=lambda d: (kinesis.sequence_key(d["sequenceNumber"]),
                                 d["subSequenceNumber"]))
        key = f"{DEAD_LETTER}/p={partition}/{span}.jsonl"
        self.store.put(key, "".join(json.dumps(d) + "\n" for d in dead).encode())
        log.warning("records dead-lettered", extra={"partition": partition,
                                                    "records": len(dead), "key": key})
        return key

    @staticmethod
    def _counted(archived: int, dead: list[dict[str, Any]], keys: list[str]) -> dict[str, Any]:
        RECORDS.labels("archived").inc(archived)
        RECORDS.labels("dead_letter").inc(len(dead))
        return {"archived": archived, "dead_lettered": len(dead), "objects": keys}


@dataclass(frozen=True, slots=True)
class _Origin:
    """Where a user record came from: what its dead letter says."""

    shard_id: str
    payload: KinesisStreamRecordPayload
    sub_sequence: int
    partition_key: str
    value: bytes
    arrival: int

    def letter(self, reason: str) -> dict[str, Any]:
        data = base64.b64encode(self.value).decode() if self.value else self.payload.data
        return {"shardId": self.shard_id, "sequenceNumber": self.payload.sequence_number,
                "subSequenceNumber": self.sub_sequence, "partitionKey": self.partition_key,
                "data": data, "timestamp": self.arrival, "reason": reason}


def _reasons(problems: list[Problem]) -> str:
    return "; ".join(f"{p.field}: {p.error}" for p in problems)


def _user_records(
    payload: KinesisStreamRecordPayload,
) -> list[tuple[str, bytes, Problem | None]]:
    """(partition key, data, None) for each user record of a Kinesis record (several for a
    KPL aggregate); (key, b"", why) when its data is not base64."""
    try:
        data = base64.b64decode(payload.data, validate=True)
    except ValueError:
        return [(payload.partition_key, b"", Problem("$", "record data is not base64"))]
    parts = kinesis.deaggregate(data) or [(payload.partition_key, data)]
    return [(key, value, None) for key, value in parts]


archiver = PerColdStart(Archiver.from_settings)


def handler(event: dict[str, Any], context: object) -> dict[str, Any]:
    if "Records" in event:
        return archive_kinesis(KinesisStreamEvent(event))
    summary: dict[str, Any] = {"archived": 0, "dead_lettered": 0, "objects": []}
    for records in event["records"].values():
        if records:
            written = archiver().archive(records)
            summary = {key: summary[key] + written[key] for key in summary}
    return summary


def archive_kinesis(event: KinesisStreamEvent) -> dict[str, Any]:
    """Archive a Kinesis batch shard by shard; `batchItemFailures` names, per shard, the
    first record not archived."""
    by_shard: dict[str, list[KinesisStreamRecord]] = {}
    for record in event.records:
        by_shard.setdefault(record.event_id.split(":", 1)[0], []).append(record)
    summary: dict[str, Any] = {"archived": 0, "dead_lettered": 0, "objects": []}
    failures = []
    for shard_id, records in by_shard.items():
        stream = records[0].event_source_arn.rsplit("/", 1)[-1]
        written, failed_from = archiver().archive_shard(stream, shard_id, records)
        summary = {key: summary[key] + written[key] for key in summary}
        if failed_from is not None:
            failures.append({"itemIdentifier": failed_from})
    return summary | {"batchItemFailures": failures}


def shard_idle(stream: str, shard_id: str, t: int) -> None:
    """The shard is read to its end and every later record arrives at `t` or after (the
    local mapping's seal of an idle shard): its watermark moves to `t`."""
    mark = archiver().shard_mark(stream, shard_id)
    if t > mark["watermark"]:
        archiver().put_mark(mark | {"watermark": t})


def shard_finished(stream: str, shard_id: str, children: list[str]) -> None:
    """The shard is closed and every record of it archived."""
    mark = archiver().shard_mark(stream, shard_id)
    if not mark.get("finished"):
        archiver().put_mark(mark | {"finished": True, "children": children})


def advance_watermark(partition: int, next_offset: int, watermark: int) -> None:
    """Move the partition's watermark forward; a stale (retried, late) one never lowers it."""
    store = archiver().store
    try:
        current = json.loads(store.get(f"{master.WATERMARKS}/p={partition}.json"))
    except NotFound:
        current = None
    if current and (current["watermark"], current["next_offset"]) >= (watermark, next_offset):
        return
    master.write_watermark(store, partition, next_offset, watermark)


ON_DRAINED = {f"{__name__}.handler": advance_watermark}  # for the local runtime's mappings
ON_SHARD = {f"{__name__}.handler": (shard_idle, shard_finished)}  # its Kinesis mappings
