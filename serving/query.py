"""Merged queries in DuckDB: the kernel's plan over `merged` = batch rows ⊕ real-time cells.

One in-memory DuckDB database, locked down (no file or network access, no extensions), and
a cursor per request: relations registered on a cursor are visible to that cursor only.
"""

from __future__ import annotations

import base64
import math
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from functools import singledispatch
from types import MappingProxyType
from typing import Any
from uuid import UUID

import duckdb
import pyarrow as pa
from datasketches import compact_theta_sketch, kll_doubles_sketch, theta_intersection

from lambdalake.monoids import DistinctSet, Monoid, Quantiles
from lambdalake.query import Query, QueryError, finalize, merged_records, plan
from lambdalake.views import View
from serving.batch_views import BatchViews, Reading, Snapshot

SQL_MAX_ROWS = 10_000
SQL_TIMEOUT_SECONDS = 10.0
_MERGED = (
    "CREATE TEMP VIEW merged AS SELECT * FROM batch_rows UNION ALL BY NAME SELECT * FROM cells"
)


class DuckDB:
    def __init__(self) -> None:
        config = {"enable_external_access": False, "autoinstall_known_extensions": False}
        self._connection = duckdb.connect(config=config)
        _register_sketch_functions(self._connection)
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


def _merged_rows(
    duck: DuckDB, reading: Reading, view: View, query: Query
) -> tuple[list[str], list[tuple]]:
    sql, params = plan(view, query)
    relations = {"batch_rows": reading.snapshot.tables[view.name],
                 "cells": reading.realtime[view.name]}
    with duck.cursor(relations) as cursor:
        cursor.execute(_MERGED)
        result = cursor.execute(sql, params)
        return [column[0] for column in result.description], result.fetchall()


@dataclass(frozen=True)
class SqlResult:
    columns: list[str]
    rows: list[list[Any]]
    truncated: bool
    snapshot: Snapshot


def run_sql(duck: DuckDB, views: BatchViews, sql: str) -> SqlResult:
    """Read-only SQL over tables named after the views: merged rows at each view's own bucket,
    `bucket` a UTC timestamp, each metric as `_SQL_COLUMNS` shows it. At most SQL_MAX_ROWS rows."""
    defined = views.project.views
    named = [name for name in defined if re.search(rf"\b{name}\b", sql, re.IGNORECASE)]
    with duck.cursor() as cursor:
        _check_read_only(cursor, sql)
        reading = views.read(named)
        for name in named:
            cursor.register(name, _sql_table(duck, reading, views, defined[name]))
        timer = threading.Timer(SQL_TIMEOUT_SECONDS, cursor.interrupt)
        timer.start()
        try:
            result = cursor.execute(sql)
            rows = result.fetchmany(SQL_MAX_ROWS + 1)
        except duckdb.InterruptException:
            raise QueryError("sql", f"took longer than {SQL_TIMEOUT_SECONDS:g} s") from None
        except duckdb.Error as exc:
            raise QueryError("sql", str(exc)) from None
        finally:
            timer.cancel()
        columns = [column[0] for column in result.description]
    truncated = len(rows) > SQL_MAX_ROWS
    answer = [[jsonable(value) for value in row] for row in rows[:SQL_MAX_ROWS]]
    return SqlResult(columns, answer, truncated, reading.snapshot)


def _check_read_only(cursor: duckdb.DuckDBPyConnection, sql: str) -> None:
    try:
        statements = cursor.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryError("sql", str(exc)) from None
    if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
        raise QueryError("sql", "must be one read-only statement: SELECT or WITH ... SELECT")


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
_THETA, _KLL = DistinctSet(), Quantiles()


def _register_sketch_functions(connection: duckdb.DuckDBPyConnection) -> None:
    """SQL functions over the sketches /sql shows (DuckDB has no DataSketches extension)."""
    functions = {
        "theta_union": (_THETA.merge_all, ["BLOB[]"], "BLOB"),
        "theta_intersection": (_theta_intersection, ["BLOB[]"], "BLOB"),
        "theta_estimate": (lambda sketch: _THETA.result(sketch), ["BLOB"], "BIGINT"),
        "kll_merge": (_KLL.merge_all, ["BLOB[]"], "BLOB"),
        "kll_quantile": (_kll_quantile, ["BLOB", "DOUBLE"], "DOUBLE"),
    }
    for name, (function, parameters, returns) in functions.items():
        connection.create_function(name, function, parameters, returns)


def _theta_intersection(sketches: list[bytes | None]) -> bytes:
    """The sketch of the values in every one of `sketches` (a null sketch: no values)."""
    intersection = theta_intersection()
    for sketch in sketches:
        intersection.update(compact_theta_sketch.deserialize(sketch or _THETA.zero()))
    return intersection.get_result().serialize() if sketches else _THETA.zero()


def _kll_quantile(sketch: bytes, rank: float) -> float | None:
    if not 0 <= rank <= 1:
        raise ValueError(f"kll_quantile: rank must be between 0 and 1, got {rank}")
    kll = kll_doubles_sketch.deserialize(sketch)
    return None if kll.is_empty() else kll.get_quantile(rank, inclusive=True)


@singledispatch
def jsonable(value: Any) -> Any:
    """A DuckDB result value as JSON: timestamps in ISO 8601 UTC, bytes in base64."""
    return value


@jsonable.register
def _(value: float) -> float | None:
    return value if math.isfinite(value) else None


@jsonable.register
def _(value: datetime) -> str:
    aware = value if value.tzinfo else value.replace(tzinfo=UTC)
    return aware.astimezone(UTC).isoformat().replace("+00:00", "Z")


@jsonable.register(date)
@jsonable.register(time)
def _(value: date | time) -> str:
    return value.isoformat()


@jsonable.register
def _(value: timedelta) -> float:
    return value.total_seconds()


@jsonable.register
def _(value: Decimal) -> int | float:
    return int(value) if value == value.to_integral_value() else float(value)


@jsonable.register
def _(value: bytes) -> str:
    return base64.b64encode(value).decode()


@jsonable.register
def _(value: UUID) -> str:
    return str(value)


@jsonable.register(list)
@jsonable.register(tuple)
def _(value: list | tuple) -> list:
    return [jsonable(item) for item in value]


@jsonable.register
def _(value: dict) -> dict:
    return {str(key): jsonable(item) for key, item in value.items()}
