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
from lambdalake.query import Query, finalize, merged_records, plan
from lambdalake.serving.batch_views import BatchViews, Reading, Snapshot
from lambdalake.serving.models import Freshness
from lambdalake.serving.sql_sandbox import EncodedRows, Worker
from lambdalake.views import View

SQL_MAX_ROWS = 10_000
_MERGED = (
    "CREATE TEMP VIEW merged AS SELECT * FROM batch_rows UNION ALL BY NAME SELECT * FROM cells"
)


class DuckDB:
    def __init__(self) -> None:
        config = {"enable_external_access": False, "autoinstall_known_extensions": False}
        self._connection = duckdb.connect(config=config)
        self._connection.execute("SET TimeZone = 'UTC'")
        self._connection.execute("SET lock_configuration = true")
        self._lock = threading.Lock()

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


def view_rows(duck: DuckDB, reading: Reading, view: View, query: Query) -> list[dict[str, Any]]:
    """One view's answer to a query: merged accumulators, finalized by the kernel."""
    return finalize(view, query, *_merged_rows(duck, reading, view, query))


def layer_rows(
    duck: DuckDB, reading: Reading, view: View, query: Query
) -> dict[str, list[dict[str, Any]]]:
    """The answer of each layer alone, from the same reading: `batch` and `realtime`."""
    layers = {"batch": reading.snapshot.tables[view.name], "realtime": reading.realtime[view.name]}
    empty = layers["batch"].schema.empty_table()
    return {name: finalize(view, query, *_rows_of(duck, table, empty, view, query))
            for name, table in layers.items()}


def _merged_rows(
    duck: DuckDB, reading: Reading, view: View, query: Query
) -> tuple[list[str], list[tuple]]:
    return _rows_of(duck, reading.snapshot.tables[view.name], reading.realtime[view.name],
                    view, query)


def _rows_of(
    duck: DuckDB, batch: pa.Table, cells: pa.Table, view: View, query: Query
) -> tuple[list[str], list[tuple]]:
    sql, params = plan(view, query)
    with duck.cursor({"batch_rows": batch, "cells": cells}) as cursor:
        cursor.execute(_MERGED)
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
