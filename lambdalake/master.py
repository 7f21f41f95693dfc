"""The master dataset: immutable Parquet files of validated events, and archive watermarks.

Layout under the store root:
  master/type=<type>/p=<partition>/<first offset>-<last offset>.parquet
  master/_watermarks/p=<partition>.json   {"next_offset": n, "watermark": ms}
A file is named by its partition and offset range, so a retried archive batch rewrites the
same object. The watermark says every record of the partition arriving before it has been
archived; the batch cut is the slice boundary at or below the smallest watermark.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from lambdalake.events import ARROW_TYPES, Event, EventSchema
from lambdalake.storage import ObjectStore

PREFIX = "master"
WATERMARKS = f"{PREFIX}/_watermarks"
META_FIELDS = [
    pa.field("event_id", pa.string(), nullable=False),
    pa.field("ts", pa.int64(), nullable=False),
    pa.field("arrival", pa.int64(), nullable=False),
    pa.field("partition", pa.int32(), nullable=False),
    pa.field("offset", pa.int64(), nullable=False),
]


@dataclass(frozen=True, slots=True)
class Archived:
    """An event with where and when it arrived on the bus."""

    event: Event
    partition: int
    offset: int
    arrival: int


def arrow_schema(schema: EventSchema) -> pa.Schema:
    fields = [pa.field(n, ARROW_TYPES[schema.field_type(n)]) for n in schema.fields]
    return pa.schema(META_FIELDS + fields)


def type_prefix(event_type: str) -> str:
    return f"{PREFIX}/type={event_type}/"


def object_key(event_type: str, partition: int, first: int, last: int) -> str:
    return f"{type_prefix(event_type)}p={partition}/{first:020d}-{last:020d}.parquet"


def to_parquet(schema: EventSchema, rows: list[Archived]) -> bytes:
    columns: dict[str, list] = {
        "event_id": [r.event.event_id for r in rows],
        "ts": [r.event.ts for r in rows],
        "arrival": [r.arrival for r in rows],
        "partition": [r.partition for r in rows],
        "offset": [r.offset for r in rows],
    }
    for name in schema.fields:
        columns[name] = [r.event.fields.get(name) for r in rows]
    table = pa.Table.from_pydict(columns, schema=arrow_schema(schema))
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def write_batch(
    store: ObjectStore, schemas: dict[str, EventSchema], partition: int, rows: list[Archived]
) -> list[str]:
    """Write one partition's batch as one Parquet object per event type; return the keys."""
    if not rows:
        return []
    first, last = rows[0].offset, rows[-1].offset
    by_type: dict[str, list[Archived]] = {}
    for row in rows:
        by_type.setdefault(row.event.type, []).append(row)
    keys = []
    for event_type, typed in sorted(by_type.items()):
        key = object_key(event_type, partition, first, last)
        store.put(key, to_parquet(schemas[event_type], typed))
        keys.append(key)
    return keys


def write_watermark(store: ObjectStore, partition: int, next_offset: int, watermark: int) -> None:
    body = {"next_offset": next_offset, "watermark": watermark}
    store.put(f"{WATERMARKS}/p={partition}.json", json.dumps(body).encode())


def watermarks(store: ObjectStore) -> dict[int, dict[str, int]]:
    found = {}
    for key in store.list(f"{WATERMARKS}/"):
        partition = int(key.rsplit("p=", 1)[1].removesuffix(".json"))
        found[partition] = json.loads(store.get(key))
    return found


def choose_cut(marks: Iterable[int], slice_ms: int) -> int:
    """The largest slice boundary that every partition has been archived past (0 if none)."""
    marks = list(marks)
    if not marks:
        return 0
    lowest = min(marks)
    return lowest - lowest % slice_ms


def data_keys(store: ObjectStore, event_type: str) -> list[str]:
    return [k for k in store.list(type_prefix(event_type)) if k.endswith(".parquet")]
