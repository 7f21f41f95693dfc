"""The DuckDB batch engine: one machine, master Parquet read with pyarrow, views as SQL.

Objects are read through the store's pyarrow filesystem (DuckDB's httpfs extension is not
needed) and registered with DuckDB as Arrow, without a copy. Each view becomes one SQL query:
dedup by `event_id` (within the view's event type: its objects hold no other), filter,
bucket, group, and each metric as `_AGGREGATES` says for its kind. DuckDB has no
DataSketches extension here: a sketch metric comes back from SQL as the list of each group's
values and is turned into DataSketches sketches in bulk by `lambdalake.sketches` (HLL,
Theta, KLL).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from lambdalake import master, sketch_arrays
from lambdalake.batch.engine import EXACT_SQL, aggregate_of, with_rows_read
from lambdalake.batch.objects import read_rows
from lambdalake.events import EventSchema
from lambdalake.monoids import ApproxDistinct, DistinctSet, Monoid, Quantiles
from lambdalake.project import Project
from lambdalake.storage import ObjectStore
from lambdalake.tables import table_schema
from lambdalake.views import View

# Builds one sketch per group from a flat column of values and each value's group id.
SketchBuilder = Callable[[Monoid, np.ndarray, pa.Array, int], pa.Array]


@dataclass(frozen=True)
class Aggregate:
    """A kind in DuckDB: its aggregate over the quoted field, and for a sketch the builder
    that turns the aggregate's per-group list of values into sketches."""

    sql: str
    build: SketchBuilder | None = None


_AGGREGATES: dict[str, Aggregate] = {
    **{kind: Aggregate(sql) for kind, sql in EXACT_SQL.items()},
    # a sketch of the distinct values is the same sketch
    "approx_distinct": Aggregate(
        "list(DISTINCT {})",
        lambda m, groups, values, n: sketch_arrays.build_sketch_array(
            groups, values, cast(ApproxDistinct, m).lg_k, n),
    ),
    "distinct_set": Aggregate(
        "list(DISTINCT {})",
        lambda m, groups, values, n: sketch_arrays.build_theta_array(
            groups, values, cast(DistinctSet, m).lg_k, n),
    ),
    "quantiles": Aggregate(
        "list({})",
        lambda m, groups, values, n: sketch_arrays.build_kll_array(
            groups, values, cast(Quantiles, m).k, n),
    ),
}


# The dedup: each event_id's first copy by (arrival, partition, offset). The window sorts
# every row it gets with its columns, and about 1% of ids repeat, so it gets only the rows
# whose id hash repeats: a row whose hash is unique is the only copy of its id. A collision
# sends a unique id through the window, where it is still first, so the dedup stays exact.
_DEDUP = """
    repeated AS (
        SELECT hash(event_id) AS id_hash FROM master_rows GROUP BY id_hash HAVING count(*) > 1
    ),
    events AS (
        SELECT master_rows.* FROM master_rows
        ANTI JOIN repeated ON hash(master_rows.event_id) = repeated.id_hash
        UNION ALL (
            SELECT master_rows.* FROM master_rows
            SEMI JOIN repeated ON hash(master_rows.event_id) = repeated.id_hash
            QUALIFY row_number() OVER (
                PARTITION BY event_id ORDER BY arrival, "partition", "offset"
            ) = 1
        )
    )"""


@dataclass(frozen=True)
class ViewQuery:
    """A view as SQL over the relation `master_rows`, and its sketch metrics by name."""

    sql: str
    sketches: dict[str, Monoid]


class DuckDBEngine:
    name = "duckdb"

    def __init__(self) -> None:
        # One in-memory database for the engine's life (opening one takes ~0.1 s); each
        # computation gets its own connection to it, so engines may compute in parallel.
        self._database = duckdb.connect()

    def compute(
        self, project: Project, view: View, store: ObjectStore, keys: list[str], cut: int
    ) -> pa.Table:
        columns = [f.name for f in master.META_FIELDS] + sorted(view.fields_read())
        rows = read_master(store, keys, project.schemas[view.event_type], columns, cut)
        query = compile_view(view)
        with self._database.cursor() as con:
            con.register("master_rows", rows)
            result = con.sql(query.sql).to_arrow_table()
        for name, metric in query.sketches.items():
            index = result.schema.get_field_index(name)
            result = result.set_column(index, name, _sketch_column(metric, result[name]))
        return with_rows_read(result.cast(table_schema(project, view)), rows.num_rows)


def compile_view(view: View) -> ViewQuery:
    groups = [f"ts - ts % {view.bucket_ms} AS bucket", *map(_quote, view.keys)]
    metrics = [f"{_metric_sql(m)} AS {_quote(name)}" for name, m in view.metrics.items()]
    positions = ", ".join(str(i + 1) for i in range(len(groups)))
    sql = f"""
        WITH {_DEDUP}
        SELECT {", ".join(groups + metrics)}
        FROM events
        WHERE {view.where_sql()}
        GROUP BY {positions}
        ORDER BY {positions}
    """
    built = {n: m for n, m in view.metrics.items() if _aggregate(m).build is not None}
    return ViewQuery(sql, built)


def _aggregate(metric: Monoid) -> Aggregate:
    return aggregate_of(_AGGREGATES, metric, "duckdb")


def _metric_sql(metric: Monoid) -> str:
    return _aggregate(metric).sql.format(_quote(metric.field) if metric.field else "")


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _sketch_column(metric: Monoid, values: pa.ChunkedArray) -> pa.Array:
    """One sketch per row from a column of per-group value lists."""
    lists = values.combine_chunks()
    group_ids = pc.list_parent_indices(lists).to_numpy()
    build = _aggregate(metric).build
    assert build is not None, "compile_view keeps only the metrics a builder sketches"
    built = build(metric, group_ids, pc.list_flatten(lists), len(lists))
    return built.cast(pa.binary())


def read_master(
    store: ObjectStore, keys: list[str], schema: EventSchema, columns: list[str], cut: int
) -> pa.Table:
    """The rows with arrival < cut of every object in `keys`, in `columns` of the event
    type's schema today (`objects.read_rows`: old objects cast, renamed, null-filled)."""
    return read_rows(store, keys, schema, columns, ds.field("arrival") < cut)
