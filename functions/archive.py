"""Archiving: stream batches (the AWS MSK / self-managed Kafka event) into the master dataset.

Per topic-partition of a batch, every record is validated again (producers may write to the
bus directly), by the same check of its bytes as the speed layer's. Valid records become
Parquet objects; the others, and any a Parquet column cannot hold (a record an older
version accepted), with the reason, a dead-letter object
`master/_dead_letter/p=<partition>/<first>-<last>.jsonl`: counted, never dropped, never
blocking. Then the partition's watermark moves to the last record's arrival: every record
arriving before it is archived. The handler raises only when the store fails, so a retried
batch is one the store failed, never one a record fails on every try. Objects are named by
offsets, so a retried batch rewrites the same objects, and a watermark never moves back.
"""

from __future__ import annotations

import base64
import json
import logging
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter

from lambdalake import master
from lambdalake.events import Event, EventSchema, Problem, Validator
from lambdalake.functions.environment import PerColdStart
from lambdalake.project import load_project
from lambdalake.settings import Settings
from lambdalake.storage import NotFound, ObjectStore, open_store

DEAD_LETTER = master.DEAD_LETTER
RECORDS = Counter("lambdalake_archive_records_total", "Records archived, by outcome", ["outcome"])

log = logging.getLogger("lambdalake.functions.archive")


@dataclass(frozen=True)
class Archiver:
    store: ObjectStore
    schemas: dict[str, EventSchema]
    validator: Validator

    @classmethod
    def from_settings(cls, settings: Settings) -> Archiver:
        schemas = load_project(settings.project).schemas
        store = open_store(settings.store_url, settings.s3_endpoint_url)
        return cls(store, schemas, Validator(schemas, settings.max_future_seconds * 1000))

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


archiver = PerColdStart(Archiver.from_settings)


def handler(event: dict[str, Any], context: object) -> dict[str, Any]:
    summary: dict[str, Any] = {"archived": 0, "dead_lettered": 0, "objects": []}
    for records in event["records"].values():
        if records:
            written = archiver().archive(records)
            summary = {key: summary[key] + written[key] for key in summary}
    return summary


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
