"""Incremental runs: the serving version merged with the views over what arrived since its cut.

Every metric is a monoid, so a view over the events with arrival < C2 is the view over those
with arrival < C1 (the base version, published) merged with the view over the rest; views are
grouped by bucket and keys, so the merge is a group-by over both tables.

"The rest" must keep the dedup: an `event_id` counts once within its event type (the delta
and the history it is checked against are one type's), as its copy with the smallest
(arrival, partition, offset). The delta is the master rows with C1 <= arrival < C2 less every
row whose event id has a copy arriving before C1 (the base counted that copy). History is
checked through the id index the batch keeps (`batch.id_index`: per master object, the
64-bit hashes of its ids, built once per object): the objects whose hashes hold one of the
delta's are the only ones whose `event_id` column is read (below C1), and the ids found in
both are looked up exactly there, so a hash collision costs a read, never an answer.
Scanning every older id instead was most of an incremental run (the ids are incompressible
strings); per-version id sets were the other choice, but would have had to stay in step with
every version, rollback and retention, where an object's hashes never change.

The delta is written as one Parquet object per event type, under `views/_delta/v=<version>/`
in the run's own store, so every engine, a Spark cluster too, reads it as master data through
the ordinary `Engine.compute` (which dedups within the delta). It is deleted once the views
are computed; a killed run's is deleted as an orphan by `prune_versions`.

A base is used only if it covers the whole master dataset below its cut (its run skipped no
corrupt object) and has every view of the project computed with today's definition (its
fingerprint in the manifest, `Manifest.covers`: keys, bucket, filter, metrics, field types);
otherwise the run recomputes in full, so a changed view is rebuilt from the master dataset.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from lambdalake import catalog
from lambdalake.batch import id_index
from lambdalake.batch.engine import with_rows_read
from lambdalake.batch.objects import read_all, read_rows
from lambdalake.catalog import Manifest
from lambdalake.events import EventSchema
from lambdalake.monoids import Monoid
from lambdalake.project import Project
from lambdalake.query import gathered, merge_sql
from lambdalake.storage import NotFound, ObjectStore
from lambdalake.tables import table_schema
from lambdalake.views import View

SCRATCH = "_delta"  # views/_delta/v=<version>/<event type>.parquet, like a view's files
ID_GROUP = 64  # master objects whose event ids are looked up together

log = logging.getLogger("lambdalake.batch")


def usable_base(store: ObjectStore, project: Project) -> Manifest | None:
    """The serving version if an incremental run may build on it (None: recompute in full)."""
    base = catalog.current(store)
    reason = _unusable(store, project, base) if base else "nothing published yet"
    if reason:
        log.warning("incremental run recomputes in full", extra={"reason": reason})
        return None
    return base


def _unusable(store: ObjectStore, project: Project, base: Manifest) -> str | None:
    if _skipped(store, base.version):
        return f"{base.version} left corrupt master objects out"
    for name in project.views:
        if not base.covers(project, name):
            return f"{base.version} has no view {name} as defined now"
    return None


def _skipped(store: ObjectStore, version: str) -> bool:
    try:
        run = json.loads(store.get(f"{catalog.RUNS}/{version}.json"))
    except NotFound:  # a run whose record failed to write: it may have skipped objects
        return True
    return bool(run.get("skipped"))


@contextmanager
def delta_object(
    store: ObjectStore,
    schema: EventSchema,
    keys: list[str],
    window: tuple[int, int],
    version: str,
) -> Iterator[tuple[str, int]]:
    """The delta of one event type over `window` (C1, C2) written to the store, while in use.

    Yields its key and the master rows read in the window (duplicate copies included).
    Raises `CorruptObject` for a master object that is not readable Parquet.
    """
    rows, read = delta_rows(store, schema, keys, window)
    id_index.prune(store, schema.name, keys)
    key = f"{catalog.PREFIX}/{SCRATCH}/v={version}/{schema.name}.parquet"
    sink = pa.BufferOutputStream()
    pq.write_table(rows, sink, compression="zstd", compression_level=1)  # scratch, read once
    store.put(key, sink.getvalue().to_pybytes())
    try:
        yield key, read
    finally:
        store.delete(key)


def delta_rows(
    store: ObjectStore, schema: EventSchema, keys: list[str], window: tuple[int, int]
) -> tuple[pa.Table, int]:
    """The rows with C1 <= arrival < C2 whose event id has no copy before C1, in today's
    schema of the type (older objects adapted); rows read."""
    since, cut = window
    arrival = ds.field("arrival")
    rows = read_rows(store, keys, schema, where=(arrival >= since) & (arrival < cut))
    counted = counted_before(store, keys, since, pc.unique(rows["event_id"]))
    return rows.filter(pc.invert(pc.is_in(rows["event_id"], value_set=counted))), rows.num_rows


def counted_before(
    store: ObjectStore, keys: list[str], since: int, ids: pa.Array
) -> pa.ChunkedArray:
    """Those of `ids` with a copy arriving before `since`.

    The id index (`batch.id_index`) names the objects that may hold one of `ids`; only
    those are read, their `event_id` column below `since`, and looked up exactly.
    """
    candidates = _holding(store, keys, ids) if len(ids) else []
    older = ds.field("arrival") < since
    parts = read_all(store, candidates, lambda part: part.to_table(columns=["event_id"],
                                                                   filter=older))
    column = pa.chunked_array([c for p in parts for c in p["event_id"].chunks], pa.string())
    return pc.filter(column, pc.is_in(column, value_set=ids))


def _holding(store: ObjectStore, keys: list[str], ids: pa.Array) -> list[str]:
    """The objects in `keys` whose index holds the hash of one of `ids`; their entries are
    loaded `ID_GROUP` objects at a time, so all history's hashes are never held at once."""
    wanted = id_index.HashLookup(id_index.hash_ids(ids))
    holding = []
    for at in range(0, len(keys), ID_GROUP):
        group = keys[at : at + ID_GROUP]
        hashes = id_index.object_hashes(store, group)
        holding += [key for key, held in zip(group, hashes, strict=True) if wanted.holds_any(held)]
    return holding


def merge(
    project: Project, view: View, store: ObjectStore, base: Manifest, delta: pa.Table, read: int
) -> pa.Table:
    """The base version's rows of `view` merged with `delta` (the view over the delta)."""
    previous = pa.concat_tables(
        pq.read_table(pa.BufferReader(store.get(key))) for key in base.views[view.name].files
    )
    groups = ", ".join(_quote(name) for name in ("bucket", *view.keys))
    metrics = ", ".join(
        f"{merge_sql(m, _quote(n))} AS {_quote(n)}" for n, m in view.metrics.items()
    )
    positions = ", ".join(str(i + 1) for i in range(len(view.keys) + 1))
    sql = f"""
        SELECT {groups}, {metrics}
        FROM (SELECT * FROM previous UNION ALL SELECT * FROM delta)
        GROUP BY {positions}
        ORDER BY {positions}
    """
    with duckdb.connect() as con:
        con.register("previous", previous)
        con.register("delta", delta.replace_schema_metadata(None))
        merged = con.sql(sql).to_arrow_table()
    target = table_schema(project, view)
    for name, metric in view.metrics.items():
        if gathered(metric):
            index = merged.schema.get_field_index(name)
            column = _union(metric, merged[name], target.field(name).type)
            merged = merged.set_column(index, name, column)
    return with_rows_read(merged.cast(target), read)


def _union(metric: Monoid, parts: pa.ChunkedArray, arrow_type: pa.DataType) -> pa.Array:
    """One accumulator per row from its list of them. A lone one (the groups the delta does
    not touch, most of them) is taken as it is, column-wise; only the others are merged."""
    lists = parts.combine_chunks()
    several = np.flatnonzero(pc.list_value_length(lists).to_numpy(zero_copy_only=False) > 1)
    merged = pa.array([metric.merge_all(lists[int(i)].as_py()) for i in several], arrow_type)
    order = np.arange(len(lists))
    order[several] = len(lists) + np.arange(len(several))
    return pa.concat_arrays([pc.list_element(lists, 0).cast(arrow_type), merged]).take(order)


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
