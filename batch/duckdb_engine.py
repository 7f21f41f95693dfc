"""The DuckDB batch engine: one machine, master Parquet read with pyarrow, views as SQL.

Objects are read through the store's pyarrow filesystem (DuckDB's httpfs extension is not
needed) and registered with DuckDB as Arrow, without a copy. Each view becomes one SQL query:
dedup by `event_id` (within the view's event type: its objects hold no other), filter,
bucket, group, and the exact metrics by their monoid kind.
Approximate distinct counts come back from SQL as the list of each group's distinct values
and are turned into DataSketches HLL sketches in bulk by `lambdalake.sketches`.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
from lambdalake.batch.engine import CorruptObject, with_rows_read

from lambdalake import master, sketches
from lambdalake.monoids import ApproxDistinct, Monoid
from lambdalake.project import Project, table_schema
from lambdalake.storage import ObjectStore
from lambdalake.views import View

_PARQUET = ds.ParquetFileFormat()
_READERS = 16  # objects read at once: on S3 each read is mostly waiting for the network
_EXACT = {
    "count": "count(*)",
    "sum": "coalesce(sum({field}), 0)",  # the Sum monoid's zero, also when every value is null
    "min": "min({field})",
    "max": "max({field})",
}


@dataclass(frozen=True)
class ViewQuery:
    """A view as SQL over the relation `master_rows`, and its sketch columns (name -> lgK)."""

    sql: str
    sketches: dict[str, int]


class DuckDBEngine:
    name = "duckdb"

    def __init__(self) -> None:
        # One in-memory database for the engine's life (opening one takes ~0.1 s); each
        # computation gets its own connection to it, so engines may compute in parallel.
        self._database = duckdb.connect()

    def compute(
        self, project: Project, view: View, store: ObjectStore, keys: list[str], cut: int
    ) -> pa.Table:
        schema = master.arrow_schema(project.schemas[view.event_type])
        columns = [f.name for f in master.META_FIELDS] + sorted(view.fields_read())
        rows = read_master(store, keys, schema, columns, cut)
        query = compile_view(view)
        with self._database.cursor() as con:
            con.register("master_rows", rows)
            result = con.sql(query.sql).to_arrow_table()
        for name, lg_k in query.sketches.items():
            index = result.schema.get_field_index(name)
            result = result.set_column(index, name, _sketch_column(result[name], lg_k))
        return with_rows_read(result.cast(table_schema(project, view)), rows.num_rows)


def compile_view(view: View) -> ViewQuery:
    groups = [f"ts - ts % {view.bucket_ms} AS bucket", *map(_quote, view.keys)]
    metrics = [f"{_metric_sql(m)} AS {_quote(name)}" for name, m in view.metrics.items()]
    positions = ", ".join(str(i + 1) for i in range(len(groups)))
    sql = f"""
        WITH events AS (
            SELECT * FROM master_rows
            QUALIFY row_number() OVER (
                PARTITION BY event_id ORDER BY arrival, "partition", "offset"
            ) = 1
        )
        SELECT {", ".join(groups + metrics)}
        FROM events
        WHERE {view.where_sql()}
        GROUP BY {positions}
        ORDER BY {positions}
    """
    approx = {n: m.lg_k for n, m in view.metrics.items() if isinstance(m, ApproxDistinct)}
    return ViewQuery(sql, approx)


def _metric_sql(metric: Monoid) -> str:
    if isinstance(metric, ApproxDistinct):  # a sketch of the distinct values is the same
        return f"list(DISTINCT {_quote(metric.field)})"
    template = _EXACT.get(metric.kind)
    if template is None:
        raise ValueError(f"the duckdb engine cannot compute {metric.kind!r} metrics")
    return template.format(field=_quote(metric.field) if metric.field else "")


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _sketch_column(values: pa.ChunkedArray, lg_k: int) -> pa.Array:
    """One HLL sketch per row from a column of per-group value lists."""
    lists = values.combine_chunks()
    group_ids = pc.list_parent_indices(lists).to_numpy()
    built = sketches.build_sketch_array(group_ids, pc.list_flatten(lists), lg_k, len(lists))
    return built.cast(pa.binary())


def read_master(
    store: ObjectStore, keys: list[str], schema: pa.Schema, columns: list[str], cut: int
) -> pa.Table:
    """The rows with arrival < cut of every object in `keys`, in `columns` of `schema`.

    Columns an older object lacks read as nulls.
    """
    reader = _ObjectReader(store, schema, columns, cut)
    with ThreadPoolExecutor(_READERS) as pool:
        parts = list(pool.map(reader.read, keys))
    empty = pa.schema([schema.field(c) for c in columns]).empty_table()
    return pa.concat_tables([empty, *parts])


class _ObjectReader:
    def __init__(self, store: ObjectStore, schema: pa.Schema, columns: list[str], cut: int):
        self.store, self.schema, self.columns, self.cut = store, schema, columns, cut
        self.filesystem, self.root = store.arrow()

    def read(self, key: str) -> pa.Table:
        path = f"{self.root}/{key}"
        try:
            return self._scan(_PARQUET.make_fragment(path, filesystem=self.filesystem))
        except FileNotFoundError:
            raise
        except (pa.ArrowException, OSError):
            # pyarrow reports garbled data and a failed network read alike (OSError), and
            # only corruption may be skipped: fetch the bytes through the store (its own
            # retries; its errors propagate), then parse them again.
            data = self.store.get(key)
        try:
            return self._scan(_PARQUET.make_fragment(pa.BufferReader(data)))
        except (pa.ArrowException, OSError) as exc:
            raise CorruptObject(key, str(exc)) from exc

    def _scan(self, fragment: ds.Fragment) -> pa.Table:
        return fragment.to_table(
            schema=self.schema, columns=self.columns, filter=ds.field("arrival") < self.cut
        )
