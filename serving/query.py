"""Merged queries in DuckDB: the kernel's plan over `merged` = batch rows ⊕ real-time cells.

One in-memory DuckDB database, locked down (no file or network access, no extensions), and
a cursor per request: relations registered on a cursor are visible to that cursor only.
Statements sent to POST /sql never run here: they run in a sandbox worker (sql_sandbox).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import duckdb
import orjson
import pyarrow as pa

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
from lambdalake.serving.batch_views import BatchViews, Reading, Snapshot
from lambdalake.serving.models import Freshness
from lambdalake.serving.sql_sandbox import EncodedRows, Worker
from lambdalake.views import View

SQL_MAX_ROWS = 10_000
_MERGED = (
    "CREATE TEMP VIEW merged AS SELECT * FROM {batch} UNION ALL BY NAME SELECT * FROM cells"
)


@dataclass
class _BatchTable:
    name: str
    readers: int = 0
    retired: bool = False


class DuckDB:
    def __init__(self) -> None:
        config = {"enable_external_access": False, "autoinstall_known_extensions": False}
        self._connection = duckdb.connect(config=config)
        self._connection.execute("SET TimeZone = 'UTC'")
        self._connection.execute("SET lock_configuration = true")
        self._lock = threading.Lock()
        self._batch: dict[tuple[str, str], _BatchTable] = {}
        self._tables_made = 0

    def cache(self, snapshot: Snapshot) -> None:
        """Copy a batch version's views into DuckDB tables ordered by their keys, before it is
        served: queries then filter native, ordered columns rather than scan Arrow each time.
        The tables of the versions it replaces go once no query reads them."""
        if snapshot.version is None:
            return
        for view, table in snapshot.tables.items():
            key = (snapshot.version, view)
            with self._lock:
                known = key in self._batch
                self._tables_made += not known
                name = f"batch_{self._tables_made}"
            if not known:
                self._create(name, table)
                with self._lock:
                    self._batch[key] = _BatchTable(name)
        with self._lock:
            for key, held in list(self._batch.items()):
                held.retired = key[0] != snapshot.version
                self._drop_unread(key)

    def _create(self, name: str, table: pa.Table) -> None:
        order = ", ".join(f'"{column}"' for column in [*table.column_names[1:], "bucket"]
                          if not pa.types.is_binary(table.schema.field(column).type)
                          and not pa.types.is_large_binary(table.schema.field(column).type))
        with self.cursor({"source": table}) as cursor:
            cursor.execute(f'CREATE TABLE "{name}" AS SELECT * FROM source ORDER BY {order}')

    def _drop_unread(self, key: tuple[str, str]) -> None:
        held = self._batch[key]
        if held.retired and not held.readers:
            del self._batch[key]
            self._connection.execute(f'DROP TABLE "{held.name}"')

    @contextmanager
    def batch_table(self, snapshot: Snapshot, view: str) -> Iterator[str | pa.Table]:
        """The view's batch part of `snapshot`: its cached table's name while the caller reads
        it, or the Arrow table when it is not cached."""
        key = (snapshot.version or "", view)
        with self._lock:
            held = self._batch.get(key)
            if held is not None:
                held.readers += 1
        if held is None:
            yield snapshot.tables[view]
            return
        try:
            yield held.name
        finally:
            with self._lock:
                held.readers -= 1
                self._drop_unread(key)

    @contextmanager
    def cursor(
        self, relations: Mapping[str, pa.Table] = MappingProxyType({})
    ) -> Iterator[duckdb.DuckDBPyConnection]:
        with self._lock:
            cursor = self._connection.cursor()
        try:
            for name, table in relations.items():
                cursor.register(name, table)
            yield cursor
        finally:
            cursor.close()

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
    layers = {"batch": reading.snapshot.tables[view.name], "realtime": reading.realtime[view.name]}
    empty = layers["batch"].schema.empty_table()
    return {name: finalize(view, query, *_rows_of(duck, table, empty, plan(view, query)))
            for name, table in layers.items()}


def _merged_rows(
    duck: DuckDB, reading: Reading, view: View, query: Query,
    planned: tuple[str, list[Any]] | None = None,
) -> tuple[list[str], list[tuple]]:
    with duck.batch_table(reading.snapshot, view.name) as batch:
        return _rows_of(duck, batch, reading.realtime[view.name], planned or plan(view, query))


def _rows_of(
    duck: DuckDB, batch: str | pa.Table, cells: pa.Table, planned: tuple[str, list[Any]]
) -> tuple[list[str], list[tuple]]:
    """Rows of the planned SQL over batch (a cached table's name, or Arrow) ⊕ cells."""
    relations = {"cells": cells} if isinstance(batch, str) else {"batch_rows": batch,
                                                                  "cells": cells}
    with duck.cursor(relations) as cursor:
        cursor.execute(_MERGED.format(batch=f'"{batch}"' if isinstance(batch, str)
                                      else "batch_rows"))
        result = cursor.execute(*planned)
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
