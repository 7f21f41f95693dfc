"""Merged queries in DuckDB: the kernel's plan over `merged` = batch rows ⊕ real-time cells.

One in-memory DuckDB database, locked down (no file or network access, no extensions), and
a cursor per request: relations registered on a cursor are visible to that cursor only.
"""

from __future__ import annotations

import base64
import math
import re
import threading
from collections.abc import Iterator, Mapping
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
from lambdalake.serving.batch_views import BatchViews, Reading, Snapshot

from lambdalake.events import epoch_ms
from lambdalake.monoids import ApproxDistinct
from lambdalake.query import Query, QueryError, finalize, plan
from lambdalake.views import View

SQL_MAX_ROWS = 10_000
SQL_TIMEOUT_SECONDS = 10.0
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
    sql, params = plan(view, query)
    relations = {"batch_rows": reading.snapshot.tables[view.name],
                 "cells": reading.realtime[view.name]}
    with duck.cursor(relations) as cursor:
        cursor.execute(_MERGED)
        result = cursor.execute(sql, params)
        columns = [column[0] for column in result.description]
        return finalize(view, query, columns, result.fetchall())


@dataclass(frozen=True)
class SqlResult:
    columns: list[str]
    rows: list[list[Any]]
    truncated: bool
    snapshot: Snapshot


def run_sql(duck: DuckDB, views: BatchViews, sql: str) -> SqlResult:
    """Read-only SQL over tables named after the views: merged rows at each view's own bucket,
    `bucket` a UTC timestamp, exact metrics and sketch estimates. At most SQL_MAX_ROWS rows."""
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
    rows = view_rows(duck, reading, view, Query())
    for row in rows:
        row["bucket"] = epoch_ms(row["bucket"])
    return pa.Table.from_pylist(rows, schema=sql_schema(views.schemas[view.name], view))


def sql_schema(table_schema: pa.Schema, view: View) -> pa.Schema:
    """A view's table as /sql sees it: `bucket` a timestamp, sketches as their estimates."""
    schema = table_schema.set(0, pa.field("bucket", pa.timestamp("ms", tz="UTC"), False))
    for name, metric in view.metrics.items():
        if isinstance(metric, ApproxDistinct):
            schema = schema.set(schema.get_field_index(name), pa.field(name, pa.int64()))
    return schema


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
