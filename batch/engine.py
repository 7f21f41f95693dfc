"""The batch engine interface: what every engine (DuckDB, Spark) computes from the master dataset.

An engine turns master Parquet objects into one view's table. The run (`batch.run`) chooses
the cut, lists the objects, decides what a corrupt object means and publishes the result;
the engine only reads and aggregates, so every engine gives the same answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, TypeVar

import pyarrow as pa

from lambdalake.monoids import Monoid
from lambdalake.project import Project
from lambdalake.storage import ObjectStore
from lambdalake.views import View

ROWS_READ = b"lambdalake.rows_read"
# The Spark "master" of a driver that spark-submit (or EMR Serverless) started: the session
# it set up, with its master and jars (`batch/emr_entry.py`).
SUBMITTED = "submitted"
# The exact kinds as SQL aggregates over a quoted column, which DuckDB and Spark SQL read
# alike; each engine's table of kinds takes them from here.
EXACT_SQL = {
    "count": "count(*)",
    "sum": "coalesce(sum({}), 0)",  # the Sum monoid's zero, also when every value is null
    "min": "min({})",
    "max": "max({})",
}

A = TypeVar("A")


def aggregate_of(kinds: Mapping[str, A], metric: Monoid, engine: str) -> A:
    """How `engine` computes `metric`: its entry in the engine's table of kinds."""
    aggregate = kinds.get(metric.kind)
    if aggregate is None:
        raise ValueError(f"the {engine} engine cannot compute {metric.kind!r} metrics")
    return aggregate


class CorruptObject(Exception):
    """A master object that is not readable Parquet (truncated, garbled): its key and why."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"corrupt master object {key}: {reason}")
        self.key, self.reason = key, reason


class Engine(Protocol):
    name: str

    def compute(
        self, project: Project, view: View, store: ObjectStore, keys: list[str], cut: int
    ) -> pa.Table:
        """The view's rows over the events in the master objects `keys` with arrival < cut.

        `keys` hold the view's event type only, so an event is its (type, `event_id`), the
        dedup rule of every layer: each counts once, the copy with the smallest (arrival,
        partition, offset).
        Then `view.where_sql()` filters, rows group by bucket (`ts - ts % view.bucket_ms`)
        and `view.keys`, and each metric aggregates by its monoid kind. The columns are
        exactly `lambdalake.tables.table_schema(project, view)`, rows sorted by bucket and
        keys, and the schema metadata carries the master rows read below the cut (duplicate
        copies included) under `ROWS_READ` (see `with_rows_read`).

        Raises `CorruptObject` for an object that is not readable Parquet; any other error
        (a missing object, the store being down) propagates as it is.
        """
        ...


def with_rows_read(table: pa.Table, rows: int) -> pa.Table:
    return table.replace_schema_metadata({ROWS_READ: str(rows).encode()})


def rows_read(table: pa.Table) -> int:
    return int((table.schema.metadata or {})[ROWS_READ])


class MissingExtra(RuntimeError):
    """An engine whose optional dependencies are not installed; says which extra to install."""


def engine_named(name: str, master: str | None = None) -> Engine:
    """The engine called `name`: duckdb, or spark on `master` (default `local[*]`)."""
    if name == "duckdb":
        from lambdalake.batch.duckdb_engine import DuckDBEngine

        return DuckDBEngine()
    if name == "spark":
        try:
            from lambdalake.batch.spark_engine import SparkEngine
        except ImportError as exc:
            raise MissingExtra(
                f"the Spark engine needs `pip install 'lambdalake[spark]'` ({exc.name} is missing)"
            ) from None
        return SparkEngine(master or "local[*]")
    raise ValueError(f"engine: unknown batch engine {name!r}; use duckdb or spark")
