"""The master dataset: immutable Parquet files of validated events, and archive watermarks.

Layout under the store root:
  master/type=<type>/p=<partition>/<first offset>-<last offset>.parquet
      (on Kinesis: p=<shard number>/<first sequence number>-<last sequence number>.parquet)
  master/_watermarks/p=<partition>.json   {"next_offset": n, "watermark": ms}
      (on Kinesis also the shard's id, its parents, its running `arrival`, the last
      `sequence` archived, and once closed and read to its end `finished` and `children`)
  master/_rewrites/<id>.json              a committed rewrite (compaction, erasure): the
                                          objects it replaces and those standing for them
  master/_schemas/<type>.json   {"schemas": [fields, ...]}: every schema objects were written
                                with, oldest first (`lambdalake.evolution` compares them)
A file is named by its partition and offset range, so a retried archive batch rewrites the
same object. The watermark says every record of the partition arriving before it has been
archived; the batch cut is the slice boundary at or below the smallest watermark.

On Kinesis the shards change: the cut is bounded by every shard the stream lists, less a
finished shard once each of its children has a watermark (a child's records never arrive
before its parents' last ones, and its watermark starts there). A listed shard without a
watermark yet is bounded by the running arrival of its archived ancestors; one with no
listed parent and no watermark has not been archived at all: no cut yet.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from lambdalake.events import Event, EventSchema
from lambdalake.evolution import refuse_breaking_changes
from lambdalake.project import Project
from lambdalake.settings import Settings
from lambdalake.storage import NotFound, ObjectStore, PreconditionFailed
from lambdalake.tables import field_arrow_type

PREFIX = "master"
WATERMARKS = f"{PREFIX}/_watermarks"
DEAD_LETTER = f"{PREFIX}/_dead_letter"
MARKERS = f"{PREFIX}/_rewrites"  # committed rewrites (`lambdalake.rewrite`)
STAGED = ".rw-"  # in the name of an object a rewrite wrote: visible only while a marker names it
SCHEMAS = f"{PREFIX}/_schemas"
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
    fields = [pa.field(n, field_arrow_type(schema.field_type(n))) for n in schema.fields]
    return pa.schema(META_FIELDS + fields)


def type_prefix(event_type: str) -> str:
    return f"{PREFIX}/type={event_type}/"


def object_key(event_type: str, partition: int, first: int, last: int,
               span: str | None = None) -> str:
    return f"{type_prefix(event_type)}p={partition}/{span or offset_span(first, last)}.parquet"


def offset_span(first: int, last: int) -> str:
    return f"{first:020d}-{last:020d}"


def sequence_span(first: str, last: str) -> str:
    """A Kinesis batch's name: its first and last sequence numbers."""
    return f"{first:0>20}-{last:0>20}"


# What a column raises for a value it cannot hold (ValueError: a lone surrogate in a string).
_CONVERSION_ERRORS = (pa.ArrowException, OverflowError, TypeError, ValueError)


@dataclass(frozen=True, slots=True)
class Unstorable:
    """A row that a column of its event type cannot hold, and why: the same on every try."""

    row: Archived
    reason: str


def _columns(schema: EventSchema, rows: list[Archived]) -> list[list[Any]]:
    """The rows' values, column by column in `arrow_schema` order."""
    columns: list[list[Any]] = [
        [r.event.event_id for r in rows],
        [r.event.ts for r in rows],
        [r.arrival for r in rows],
        [r.partition for r in rows],
        [r.offset for r in rows],
    ]
    return columns + [[r.event.fields.get(name) for r in rows] for name in schema.fields]


def to_table(schema: EventSchema, rows: list[Archived]) -> tuple[pa.Table, list[Unstorable]]:
    """The rows as an Arrow table of their type, less the rows a column cannot hold. Values
    are looked at one by one only when a whole column fails; when none of them is at fault,
    the failure is not the rows' and is raised."""
    arrow = arrow_schema(schema)
    arrays: list[pa.Array] = []
    refused: dict[int, str] = {}
    for field, values in zip(arrow, _columns(schema, rows), strict=True):
        try:
            arrays.append(pa.array(values, field.type))
        except _CONVERSION_ERRORS:
            unconvertible = _unconvertible(field, values)
            if not unconvertible:
                raise
            refused = unconvertible | refused  # a row keeps the reason found first
            kept = [None if i in refused else value for i, value in enumerate(values)]
            arrays.append(pa.array(kept, field.type))
    table = pa.Table.from_arrays(arrays, schema=arrow)
    if refused:
        table = table.filter(pa.array([i not in refused for i in range(len(rows))]))
    return table, [Unstorable(rows[i], reason) for i, reason in sorted(refused.items())]


def _unconvertible(field: pa.Field, values: list[Any]) -> dict[int, str]:
    found = {}
    for index, value in enumerate(values):
        try:
            pa.array([value], field.type)
        except _CONVERSION_ERRORS as exc:
            found[index] = f"{field.name}: cannot be stored as {field.type}: {exc}"
    return found


def to_parquet(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def write_batch(
    store: ObjectStore, schemas: dict[str, EventSchema], partition: int, rows: list[Archived],
    span: str | None = None,
) -> tuple[list[str], list[Unstorable]]:
    """Write one partition's batch as one Parquet object per event type; return the keys,
    and the rows left out because their columns cannot hold them. `span` names the objects
    (default: the rows' offset range)."""
    if not rows:
        return [], []
    by_type: dict[str, list[Archived]] = {}
    for row in rows:
        by_type.setdefault(row.event.type, []).append(row)
    keys, unstorable = [], []
    for event_type, typed in sorted(by_type.items()):
        record_schema(store, schemas[event_type])
        table, refused = to_table(schemas[event_type], typed)
        unstorable += refused
        if table.num_rows:
            key = object_key(event_type, partition, rows[0].offset, rows[-1].offset, span)
            store.put(key, to_parquet(table))
            keys.append(key)
    return keys, unstorable


def write_watermark(store: ObjectStore, partition: int, next_offset: int, watermark: int) -> None:
    body = {"next_offset": next_offset, "watermark": watermark}
    store.put(f"{WATERMARKS}/p={partition}.json", json.dumps(body).encode())


def watermarks(store: ObjectStore) -> dict[int, dict[str, Any]]:
    found = {}
    for key in store.list(f"{WATERMARKS}/"):
        partition = int(key.rsplit("p=", 1)[1].removesuffix(".json"))
        found[partition] = json.loads(store.get(key))
    return found


class NoWatermark(LookupError):
    """A partition or shard has not been archived at all yet: no cut can be chosen."""


def partition_bounds(marks: dict[int, dict[str, Any]], partitions: int) -> list[int]:
    """The watermarks bounding the cut on the embedded log or Kafka: every partition's."""
    missing = sorted(set(range(partitions)) - set(marks))
    if missing:
        listed = ", ".join(map(str, missing))
        raise NoWatermark(f"no archive watermark yet for partition(s) {listed}")
    return [mark["watermark"] for mark in marks.values()]


def shard_bounds(marks: dict[int, dict[str, Any]], listed: Iterable[Any]) -> list[int]:
    """The watermarks bounding the cut on Kinesis, from the stream's shards as listed now
    (`lambdalake.kinesis.Shard`s): see the module's docstring."""
    shards = {shard.shard_id: shard for shard in listed}
    by_id = {mark["shard"]: mark for mark in marks.values() if "shard" in mark}
    bounds, missing = [], []
    for shard_id, shard in shards.items():
        mark = by_id.get(shard_id)
        if mark is None:
            floor = shard_floor(shard, shards, by_id)
            if floor is not None:
                bounds.append(floor)
            elif not any(parent in shards for parent in shard.parents):
                missing.append(shard_id)
            continue
        children = mark.get("children", [])
        if mark.get("finished") and all(child in by_id for child in children):
            continue
        bounds.append(mark["watermark"])
    if missing:
        raise NoWatermark(f"no archive watermark yet for shard(s) {', '.join(missing)}")
    return bounds


def shard_floor(shard: Any, shards: dict[str, Any], by_id: dict[str, dict[str, Any]]) -> int | None:
    """What a shard not archived yet will never arrive below: the running arrival of an
    ancestor (a child's arrivals start at its parents' last). Not its watermark: an idle
    parent's seal says nothing of its children's records. None: no ancestor archived."""
    found = []
    for parent in shard.parents:
        if parent in by_id:
            found.append(by_id[parent]["arrival"])
        elif parent in shards:
            floor = shard_floor(shards[parent], shards, by_id)
            found += [] if floor is None else [floor]
    return max(found, default=None)


def shard_mark_key(shard_id: str) -> str:
    from lambdalake.kinesis import shard_index

    return f"{WATERMARKS}/p={shard_index(shard_id)}.json"


def start_shard_mark(store: ObjectStore, listed: dict[str, Any], shard_id: str) -> dict[str, Any]:
    """Start the watermark of a shard met for the first time (`listed`: the stream's shards as
    listed now, by id): its arrival starts at its parents' last arrival, and its parents, which
    are finished before a child is read, are marked finished with their children. Written only
    if absent: a watermark written meanwhile (the archiver's, the heartbeat's) is returned."""
    from lambdalake.kinesis import children

    marks = {m["shard"]: m for m in watermarks(store).values() if "shard" in m}
    shard = listed.get(shard_id)
    parents = list(shard.parents) if shard else []
    for parent in parents:
        if parent in marks:
            put_shard_mark(store, marks[parent] | {
                "finished": True, "children": children(listed.values(), parent)})
    floor = (shard_floor(shard, listed, marks) if shard else None) or 0
    mark = {"shard": shard_id, "parents": parents, "next_offset": 0, "watermark": floor,
            "arrival": floor, "sequence": None}
    try:
        store.create(shard_mark_key(shard_id), json.dumps(mark).encode())
    except PreconditionFailed:
        return dict(json.loads(store.get(shard_mark_key(shard_id))))
    return mark


def put_shard_mark(store: ObjectStore, mark: dict[str, Any]) -> None:
    store.put(shard_mark_key(mark["shard"]), json.dumps(mark).encode())


def cut_bounds(store: ObjectStore, settings: Settings) -> list[int]:
    """The watermarks bounding the next cut (`NoWatermark` when some part of the bus has none
    yet); on Kinesis the stream's shards are listed after the watermarks are read."""
    marks = watermarks(store)
    if settings.bus != "kinesis":
        return partition_bounds(marks, settings.partitions)
    from lambdalake import kinesis

    kinesis_client = kinesis.client(settings.kinesis_endpoint_url)
    return shard_bounds(marks, kinesis.list_shards(kinesis_client, settings.kinesis_stream))


def choose_cut(marks: Iterable[int], slice_ms: int) -> int:
    """The largest slice boundary that every partition has been archived past (0 if none)."""
    marks = list(marks)
    if not marks:
        return 0
    lowest = min(marks)
    return lowest - lowest % slice_ms


def data_keys(store: ObjectStore, event_type: str) -> list[str]:
    """The objects holding the type's events: the one place they are listed. The objects are
    listed before the markers (see `lambdalake.rewrite` for why that order is the safe one)."""
    prefix = type_prefix(event_type)
    listed = [k for k in store.list(prefix) if k.endswith(".parquet")]
    return visible(listed, markers(store), prefix)


@dataclass(frozen=True, slots=True)
class Marker:
    """A committed rewrite: `writes` stand for `replaces` from the moment it exists."""

    id: str
    kind: str
    replaces: tuple[str, ...]
    writes: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"{MARKERS}/{self.id}.json"

    def to_json(self) -> bytes:
        return json.dumps({"id": self.id, "kind": self.kind, "replaces": list(self.replaces),
                           "writes": list(self.writes)}).encode()


def markers(store: ObjectStore) -> list[Marker]:
    found = []
    for key in store.list(f"{MARKERS}/"):
        try:
            body = json.loads(store.get(key))
        except NotFound:  # removed by `recover` since the listing: it had nothing to say
            continue
        found.append(Marker(body["id"], body["kind"], tuple(body["replaces"]),
                            tuple(body["writes"])))
    return found


def is_staged(key: str) -> bool:
    return STAGED in key.rsplit("/", 1)[-1]


def visible(listed: list[str], committed: list[Marker], prefix: str) -> list[str]:
    """The objects a reader uses: `listed` (listed before `committed` was read) with each
    marker applied."""
    replaced = {key for marker in committed for key in marker.replaces}
    written = {key for marker in committed for key in marker.writes if key.startswith(prefix)}
    kept = {key for key in listed if not is_staged(key)} | written
    return sorted(kept - replaced)



_RECORDED: set[tuple[str, str, str]] = set()  # (store, type, fields) this process recorded


def record_schema(store: ObjectStore, schema: EventSchema) -> None:
    """Add the schema to those its type's objects were written with (once per process), by
    compare-and-swap, so concurrent archivers lose none."""
    fields = dict(schema.fields)
    seen = (store.url, schema.name, json.dumps(fields, sort_keys=True))
    if seen in _RECORDED:
        return
    key = f"{SCHEMAS}/{schema.name}.json"
    while True:
        try:
            data, tag = store.get_tagged(key)
        except NotFound:
            data, tag = b'{"schemas": []}', None
        recorded = json.loads(data)["schemas"]
        if fields in recorded:
            break
        body = json.dumps({"schemas": [*recorded, fields]}).encode()
        try:
            store.create(key, body) if tag is None else store.replace(key, body, tag)
            break
        except PreconditionFailed:
            continue
    _RECORDED.add(seen)


def written_schemas(store: ObjectStore) -> dict[str, list[dict[str, str]]]:
    """Event type -> the fields of every schema its master objects were written with."""
    found = {}
    for key in store.list(f"{SCHEMAS}/"):
        event_type = key.rsplit("/", 1)[1].removesuffix(".json")
        found[event_type] = json.loads(store.get(key))["schemas"]
    return found


def check_schemas(store: ObjectStore, project: Project) -> None:
    """Refuse (`SchemaChangeRefused`, naming the view and field) a project whose schemas
    cannot read the master data written before."""
    refuse_breaking_changes(project, written_schemas(store))
