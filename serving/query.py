"""Merged queries in DuckDB: the kernel's plan over `merged` = batch rows ⊕ real-time cells.

One in-memory DuckDB database, locked down (no file or network access, no extensions), and
a cursor per thread, made once (a cursor is a connection: making one per query cost as much
as a small query): relations registered on a cursor are visible to that cursor only.
Statements sent to POST /sql never run here: they run in a sandbox worker (sql_sandbox).
"""

from __future__ import annotations

import itertools
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import duckdb
import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from lambdalake.monoids import Monoid
from lambdalake.query import (
    Page,
    Query,
    finalize,
    finalize_page,
    merged_records,
    page,
    paged_plan,
    plan,
)
from lambdalake.realtime import Sliced
from lambdalake.serving.batch_views import BatchViews, Reading, Snapshot
from lambdalake.serving.models import Freshness
from lambdalake.serving.sql_sandbox import DuckDBConfig, EncodedRows, Worker
from lambdalake.views import View

SQL_MAX_ROWS = 10_000
_MERGED = "merged AS (SELECT * FROM {batch} UNION ALL BY NAME SELECT * FROM cells)"
# Real-time cells a query scans from Arrow at most, past those a DuckDB table holds: a scan
# of Arrow costs each query, a table is built once for every query until the cells change.
CELLS_IN_ARROW = 4096
# The delta table of the cells' copy grows to 1 / _DELTA_SHARE of its base at most (`_CellsCopy`)
_DELTA_SHARE = 4
# Relations a thread's cursor keeps registered after a query (`_Current`), until a table of
# another schema takes the name: registering an Arrow table costs about as much as a small
# query, and the real-time cells change at every publish of the speed layer.
_KEPT_REGISTERED = frozenset({"cells"})
# A sketch in a cached table is a reference to its row in the Arrow column it was copied
# from, held beside (`DuckDB._sketches`): 12 bytes, which DuckDB keeps inline, so gathering
# lists of them costs about what lists of integers do, far less than lists of the sketches
# (a day's top 20, DuckDB's CPU: 7.0 ms in two steps over sketches, 4.3 in one over
# references; 28 days: 57 -> 35 ms). `_REF_TAG` (no DataSketches sketch starts with it:
# its first byte counts its preamble), then the source's number (3 bytes) and the row (8
# bytes), little-endian.
_REF_TAG = 0xFF
_REFERENCE = np.dtype([("tag", "u1"), ("source", "u1", 3), ("row", "<u8")])
_SOURCES = 1 << 24
Sketches = dict[str, pa.Array]  # a source's sketch columns, by name


@dataclass
class _Current:
    """An Arrow table registered once on a cursor, which each query sets: DuckDB reads the
    stream anew at each scan (registering the cells' table again at each change cost ~0.4 ms
    of CPU per query and cursor)."""

    table: pa.Table

    def __arrow_c_schema__(self) -> object:
        return self.table.schema.__arrow_c_schema__()

    def __arrow_c_stream__(self, requested_schema: object = None) -> object:
        return self.table.__arrow_c_stream__(requested_schema)


@dataclass
class _BatchTable:
    """A batch version's view as two DuckDB tables: ordered by its dimensions then bucket
    (`by_keys`), for queries filtering dimensions; by bucket then dimensions (`by_bucket`),
    for time ranges over every key (a top N): each reads few row groups of its own."""

    by_keys: str
    by_bucket: str
    source: int  # its sketches' (`_REF_TAG`)
    readers: int = 0
    retired: bool = False

    def name(self, keyed: bool) -> str:
        return self.by_keys if keyed else self.by_bucket


@dataclass(eq=False)
class _CellsTable:
    """Real-time cells copied into a DuckDB table, ordered by dimensions then bucket: the
    slices `parts` (the very objects, which stay the same until a cell of theirs changes)
    put together."""

    name: str
    parts: tuple[pa.Table, ...]
    source: int  # its sketches' (`_REF_TAG`)
    readers: int = 0
    retired: bool = False


@dataclass(eq=False)
class _CellsCopy:
    """A view's real-time cells in DuckDB: the older slices in a base table, and those settled
    since in a delta table, or none. A slice settling rebuilds the delta alone, and the base
    only once the delta would outgrow a quarter of it (`_DELTA_SHARE`): rebuilding every cell
    at each was a quarter of a serving replica's CPU under ingestion (100k cells, a new slice
    a second)."""

    tables: tuple[_CellsTable, ...]
    parts: tuple[pa.Table, ...]  # the tables' slices, in order
    _rest: tuple[Sliced, pa.Table] | None = None

    @classmethod
    def of(cls, tables: tuple[_CellsTable, ...]) -> _CellsCopy:
        return cls(tables, tuple(part for table in tables for part in table.parts))

    def rest(self, cells: Sliced) -> pa.Table:
        """The slices of `cells` past `parts` as one Arrow table: the very same object for
        as long as `cells` is (so a cursor holding it registered need not register it)."""
        kept = self._rest
        if kept is None or kept[0] is not cells:
            rest = cells.parts[len(self.parts):]
            kept = self._rest = (cells, pa.concat_tables(rest) if rest
                                 else cells.table.schema.empty_table())
        return kept[1]

    def starts(self, parts: tuple[pa.Table, ...]) -> bool:
        """Whether these slices, unchanged, are the first of `parts`."""
        return len(self.parts) <= len(parts) and all(
            mine is theirs for mine, theirs in zip(self.parts, parts, strict=False))

    def hold(self, readers: int) -> None:
        for table in self.tables:
            table.readers += readers


class DuckDB:
    def __init__(self, cells_in_arrow: int = CELLS_IN_ARROW) -> None:
        # One thread: a query runs in its caller's thread alone. The API answers many at
        # once; splitting each over DuckDB's workers as well cost ~10% more CPU per answer.
        config: DuckDBConfig = {"enable_external_access": False,
                                "autoinstall_known_extensions": False, "threads": 1}
        self._connection = duckdb.connect(config=config)
        self._connection.execute("SET TimeZone = 'UTC'")
        self._connection.execute("SET lock_configuration = true")
        self._lock = threading.Lock()
        self._batch: dict[tuple[str, str], _BatchTable] = {}
        self._tables_made = 0
        self._cells_in_arrow = cells_in_arrow
        self._copies: dict[str, _CellsCopy] = {}  # per view, its cells' newest copy
        self._cells: dict[str, list[_CellsTable]] = {}  # per view, every table not dropped
        self._building: set[str] = set()  # views whose cells table is being built
        self._cursors = threading.local()
        self._sketches: dict[int, Sketches] = {}  # per source number

    def cache(self, snapshot: Snapshot) -> None:
        """Copy a batch version's views into DuckDB tables ordered two ways (`_BatchTable`),
        before it is served: queries then filter native, ordered columns rather than scan
        Arrow each time. The tables of the versions it replaces go once no query reads them."""
        if snapshot.version is None:
            return
        for view, table in snapshot.tables.items():
            key = (snapshot.version, view)
            with self._lock:
                known = key in self._batch
                self._tables_made += not known
                name, source = f"batch_{self._tables_made}", self._tables_made % _SOURCES
            if not known:
                held = _BatchTable(f"{name}_by_keys", f"{name}_by_bucket", source)
                referenced = self._referenced(table, source)
                self._create(held.by_keys, referenced, by_bucket=False)
                self._create(held.by_bucket, referenced, by_bucket=True)
                with self._lock:
                    self._batch[key] = held
        with self._lock:
            for key, held in list(self._batch.items()):
                held.retired = key[0] != snapshot.version
                self._drop_unread(key)

    def _referenced(self, table: pa.Table, source: int) -> pa.Table:
        """`table` with each sketch column's values replaced by references (`_REF_TAG`) to
        them, which are kept as the source numbered `source` until its tables are dropped."""
        references = np.empty(table.num_rows, _REFERENCE)
        references["tag"] = _REF_TAG
        references["source"] = list(source.to_bytes(3, "little"))
        references["row"] = np.arange(table.num_rows)
        offsets = np.arange(0, _REFERENCE.itemsize * (table.num_rows + 1), _REFERENCE.itemsize,
                            dtype=np.int32)
        buffers = [None, pa.py_buffer(offsets), pa.py_buffer(references.tobytes())]
        all_rows = pa.Array.from_buffers(pa.binary(), table.num_rows, buffers)
        sketches: Sketches = {}
        for index, field in enumerate(table.schema):
            if _is_sketch(field):
                sketches[field.name] = table.column(index).combine_chunks()
                nulls = sketches[field.name].is_null()
                table = table.set_column(index, field, pc.if_else(
                    nulls, pa.scalar(None, field.type), all_rows.cast(field.type)))
        with self._lock:
            self._sketches[source] = sketches
        return table

    def dereference(self, columns: list[str], rows: list[tuple], sources: list[int]) -> None:
        """Put the sketches in place of the references in the gathered lists of `rows`, the
        answer of a query over the cached tables of `sources` (while it reads them)."""
        with self._lock:
            held = {source: self._sketches[source] for source in sources}
        names = {name for sketches in held.values() for name in sketches}
        for index, name in enumerate(columns):
            if name in names:
                _put_sketches([row[index] for row in rows], held, name)

    def _create(self, name: str, table: pa.Table, *, by_bucket: bool) -> None:
        columns = [c for c in table.column_names[1:] if not _is_sketch(table.schema.field(c))]
        columns = ["bucket", *columns] if by_bucket else [*columns, "bucket"]
        order = ", ".join(f'"{column}"' for column in columns)
        with self.cursor({"source": table}) as cursor:
            cursor.execute(f'CREATE TABLE "{name}" AS SELECT * FROM source ORDER BY {order}')

    def _drop_unread(self, key: tuple[str, str]) -> None:
        held = self._batch[key]
        if held.retired and not held.readers:
            del self._batch[key]
            del self._sketches[held.source]
            for name in (held.by_keys, held.by_bucket):
                self._connection.execute(f'DROP TABLE "{name}"')

    @contextmanager
    def batch_table(
        self, snapshot: Snapshot, view: str, keyed: bool = False
    ) -> Iterator[tuple[str | pa.Table, int | None]]:
        """The view's batch part of `snapshot`: the name of its cached table ordered for a
        query filtering dimensions (`keyed`) or not, and its source of sketches, while the
        caller reads it; or the Arrow table (and None) when it is not cached."""
        key = (snapshot.version or "", view)
        with self._lock:
            held = self._batch.get(key)
            if held is not None:
                held.readers += 1
        if held is None:
            yield snapshot.tables[view], None
            return
        try:
            yield held.name(keyed), held.source
        finally:
            with self._lock:
                held.readers -= 1
                self._drop_unread(key)

    @contextmanager
    def cells_tables(
        self, view: str, cells: Sliced
    ) -> Iterator[tuple[tuple[_CellsTable, ...], pa.Table]]:
        """The view's real-time cells as the DuckDB tables holding the older slices (maybe
        none) and the Arrow table of the others, while the caller reads them. The copy is
        rebuilt (`_build_cells`), by one query while the others read the one before, once
        more than `cells_in_arrow` cells are left to Arrow (cells changed since), of the
        slices but the newest (`_settled`)."""
        held, build = self._hold_cells(view, cells)
        if build:
            held = self._build_cells(view, cells, held)
        if held is None:
            yield (), cells.table
            return
        try:
            yield held.tables, held.rest(cells)
        finally:
            with self._lock:
                held.hold(-1)
                self._drop_unread_cells(view)

    def _hold_cells(self, view: str, cells: Sliced) -> tuple[_CellsCopy | None, bool]:
        """The view's copy if it holds the first slices of `cells` unchanged, else None; and
        whether to build a new one. The copy is held for reading unless a new one is built."""
        with self._lock:
            copy = self._copies.get(view)
            if copy is not None and not copy.starts(cells.parts):
                copy = None
            copied = _rows(copy.parts) if copy else 0
            build = (cells.table.num_rows - copied > self._cells_in_arrow
                     and _rows(_settled(cells)) > copied and view not in self._building)
            if build:
                self._building.add(view)
            elif copy is not None:
                copy.hold(1)
            return copy, build

    def _build_cells(self, view: str, cells: Sliced, copy: _CellsCopy | None) -> _CellsCopy:
        """A new copy of the settled slices, held for reading: the base of `copy` (the view's
        copy, which holds the first of them) and a new delta of the slices past it, or a new
        base of them all."""
        settled = _settled(cells)
        base = copy.tables[0] if copy else None
        base_rows = _rows(base.parts) if base else 0
        try:
            if base is not None and _DELTA_SHARE * (_rows(settled) - base_rows) <= base_rows:
                built = _CellsCopy.of((base, self._copy_cells(settled[len(base.parts):])))
            else:
                built = _CellsCopy.of((self._copy_cells(settled),))
            with self._lock:
                built.hold(1)
                self._copies[view] = built
                kept = self._cells.setdefault(view, [])
                for table in kept:
                    table.retired = all(table is not mine for mine in built.tables)
                kept += [mine for mine in built.tables if all(mine is not table for table in kept)]
                self._drop_unread_cells(view)
        finally:
            with self._lock:
                self._building.discard(view)
        return built

    def _copy_cells(self, parts: tuple[pa.Table, ...]) -> _CellsTable:
        with self._lock:
            self._tables_made += 1
            copied = _CellsTable(f"cells_{self._tables_made}", parts,
                                 self._tables_made % _SOURCES)
        # ordered as `by_keys`: a query filtering dimensions reads few of its row groups
        self._create(copied.name, self._referenced(pa.concat_tables(parts), copied.source),
                     by_bucket=False)
        return copied

    def _drop_unread_cells(self, view: str) -> None:
        tables = self._cells.get(view, [])
        for held in [held for held in tables if held.retired and not held.readers]:
            tables.remove(held)
            del self._sketches[held.source]
            self._connection.execute(f'DROP TABLE "{held.name}"')

    @contextmanager
    def cursor(
        self, relations: Mapping[str, pa.Table] = MappingProxyType({})
    ) -> Iterator[duckdb.DuckDBPyConnection]:
        cursor = getattr(self._cursors, "cursor", None)
        if cursor is None:
            with self._lock:
                cursor = self._cursors.cursor = self._connection.cursor()
            self._cursors.registered = {}
        registered: dict[str, _Current] = self._cursors.registered
        for name, table in relations.items():
            if name not in _KEPT_REGISTERED:
                cursor.register(name, table)
                continue
            current = registered.get(name)
            if current is None or not current.table.schema.equals(table.schema):
                current = registered[name] = _Current(table)
                cursor.register(name, current)
            current.table = table
        try:
            yield cursor
        finally:
            for name in relations.keys() - _KEPT_REGISTERED:
                cursor.unregister(name)

    def close(self) -> None:
        self._connection.close()


def view_page(duck: DuckDB, reading: Reading, view: View, query: Query) -> Page:
    """One view's answer to a query, the page asked for: ordered and paged in DuckDB when it
    can be (the kernel's `paged_plan`), so only that page's sketches are merged here."""
    paged = paged_plan(view, query)
    if paged is None:
        return page(query, finalize(view, query, *_merged_rows(duck, reading, view, query)))
    return finalize_page(view, query, *_merged_rows(duck, reading, view, query, paged))


def layer_rows(
    duck: DuckDB, reading: Reading, view: View, query: Query
) -> dict[str, list[dict[str, Any]]]:
    """The answer of each layer alone, from the same reading: `batch` and `realtime`."""
    layers = {"batch": reading.snapshot.tables[view.name],
              "realtime": reading.realtime[view.name].table}
    empty = layers["batch"].schema.empty_table()
    return {name: finalize(view, query, *_rows_of(duck, table, empty, plan(view, query)))
            for name, table in layers.items()}


def _merged_rows(
    duck: DuckDB, reading: Reading, view: View, query: Query,
    planned: tuple[str, list[Any]] | None = None,
) -> tuple[list[str], list[tuple]]:
    keyed = bool(query.filters or query.prefixes)
    with (duck.batch_table(reading.snapshot, view.name, keyed) as (batch, source),
          duck.cells_tables(view.name, reading.realtime[view.name]) as (copied, cells)):
        columns, rows = _rows_of(duck, batch, cells, planned or plan(view, query),
                                 [table.name for table in copied])
        sources = [table.source for table in copied]
        duck.dereference(columns, rows, sources if source is None else [source, *sources])
        return columns, rows


def _rows_of(
    duck: DuckDB, batch: str | pa.Table, cells: pa.Table, planned: tuple[str, list[Any]],
    copied: Sequence[str] = (),
) -> tuple[list[str], list[tuple]]:
    """Rows of the planned SQL over batch (a cached table's name, or Arrow) ⊕ cells (Arrow,
    and the cells `copied` into DuckDB tables of these names)."""
    relations = {"cells": cells} if isinstance(batch, str) else {"batch_rows": batch,
                                                                  "cells": cells}
    batch_sql = f'"{batch}"' if isinstance(batch, str) else "batch_rows"
    for name in copied:
        batch_sql += f' UNION ALL BY NAME SELECT * FROM "{name}"'
    sql, params = planned
    merged = _MERGED.format(batch=batch_sql)
    sql = f"WITH {merged}, {sql[5:]}" if sql.startswith("WITH ") else f"WITH {merged} {sql}"
    with duck.cursor(relations) as cursor:
        result = cursor.execute(sql, params)
        return [column[0] for column in result.description], result.fetchall()


@dataclass(frozen=True)
class SqlResult:
    rows: EncodedRows
    snapshot: Snapshot


def run_sql(
    duck: DuckDB, views: BatchViews, sql: str, worker: Worker, *,
    params: Sequence[Any] = (), row_format: str = "json", describe: bool = False,
) -> SqlResult:
    """Read-only SQL over tables named after the views: merged rows at each view's own bucket,
    `bucket` a UTC timestamp, each metric as `_SQL_COLUMNS` shows it. Every view is a table,
    so catalog queries (information_schema, DESCRIBE, pg_catalog) see them all; only those
    the statement names are filled. The statement runs in a sandbox worker, which bounds its
    time, memory and answer."""
    defined = views.project.views
    named = [name for name in defined if re.search(rf"\b{name}\b", sql, re.IGNORECASE)]
    reading = views.read(named)
    tables = {name: _sql_table(duck, reading, views, defined[name]) if name in named
              else sql_schema(views.schemas[name], defined[name]).empty_table()
              for name in defined}
    rows = worker.run(sql, tables, params=params, row_format=row_format, describe=describe)
    return SqlResult(rows, reading.snapshot)


def sql_answer_json(result: SqlResult, freshness: Freshness) -> bytes:
    """The SqlAnswer body, its rows spliced in as the worker encoded them."""
    rows = result.rows
    return b"".join([
        b'{"columns":', orjson.dumps(rows.columns), b',"rows":', rows.rows,
        b',"truncated":', orjson.dumps(rows.truncated),
        b',"freshness":', freshness.model_dump_json().encode(), b"}",
    ])


def _sql_table(duck: DuckDB, reading: Reading, views: BatchViews, view: View) -> pa.Table:
    query = Query()
    rows = merged_records(view, query, *_merged_rows(duck, reading, view, query))
    for row in rows:
        for name, metric in view.metrics.items():
            row[name] = _SQL_COLUMNS[metric.kind].value(metric, row[name])
    return pa.Table.from_pylist(rows, schema=sql_schema(views.schemas[view.name], view))


def sql_schema(table_schema: pa.Schema, view: View) -> pa.Schema:
    """A view's table as /sql sees it: `bucket` a timestamp, each metric as `_SQL_COLUMNS`."""
    schema = table_schema.set(0, pa.field("bucket", pa.timestamp("ms", tz="UTC"), False))
    for name, metric in view.metrics.items():
        index = schema.get_field_index(name)
        arrow_type = _SQL_COLUMNS[metric.kind].arrow_type or schema.field(index).type
        schema = schema.set(index, pa.field(name, arrow_type))
    return schema


@dataclass(frozen=True)
class _SqlColumn:
    """How /sql shows a kind: its merged accumulator as is, or turned into `value`."""

    arrow_type: pa.DataType | None = None  # None: the accumulator's own
    value: Callable[[Monoid, Any], Any] = lambda metric, acc: acc


# Approximate distinct counts show their estimates; quantiles and distinct sets their
# sketches, for the functions below (a union or intersection of estimates means nothing).
_SQL_COLUMNS = {
    "count": _SqlColumn(),
    "sum": _SqlColumn(),
    "min": _SqlColumn(),
    "max": _SqlColumn(),
    "approx_distinct": _SqlColumn(pa.int64(), lambda metric, acc: metric.result(acc)),
    "quantiles": _SqlColumn(),
    "distinct_set": _SqlColumn(),
}


def _settled(cells: Sliced) -> tuple[pa.Table, ...]:
    """The slices a copy of the cells holds: all but the newest, which the speed layer keeps
    changing (a copy holding it was of no use after the next publish: the copy was rebuilt,
    50 ms of CPU, at nearly every publish, and queries meanwhile scanned every cell)."""
    return cells.parts[:-1]


def _rows(parts: tuple[pa.Table, ...]) -> int:
    return sum(part.num_rows for part in parts)


def _is_sketch(field: pa.Field) -> bool:
    return pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type)


def _put_sketches(lists: list[list[bytes | None] | None], sources: dict[int, Sketches],
                  name: str) -> None:
    """Replace each reference (`_REF_TAG`) in `lists` by the sketch `name` it points at, in
    place: the references decoded at once, one take per source."""
    references = [value for values in lists if values for value in values
                  if value is not None and len(value) == _REFERENCE.itemsize
                  and value[0] == _REF_TAG]
    if not references:
        return
    decoded = np.frombuffer(b"".join(references), _REFERENCE)
    numbers = decoded["source"].astype(np.int64) @ np.array([1, 1 << 8, 1 << 16])
    sketch_of: dict[bytes | None, bytes | None] = {}
    for source in np.unique(numbers).tolist():
        chosen = numbers == source
        taken = sources[source][name].take(pa.array(decoded["row"][chosen])).to_pylist()
        sketch_of.update(zip(itertools.compress(references, chosen.tolist()), taken, strict=True))
    for values in lists:
        if values:
            values[:] = [sketch_of.get(value, value) for value in values]
