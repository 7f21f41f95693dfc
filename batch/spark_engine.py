"""The Spark batch engine: PySpark on `local[*]`, a cluster master (`spark://…`), a Spark Connect
server (`sc://…`) or the driver spark-submit started (`SUBMITTED`: EMR Serverless, the job's
entry point `batch/emr_entry.py`); master Parquet read over `file://` or `s3a://`.

The engine uses DataFrame APIs only (no RDD, no SparkContext), so a Spark Connect session
runs it unchanged; the s3a jars are then the server's (`lambdalake.testing.spark`). pyspark
turns the whole process to Connect mode with its first Connect session (the environment
variable `SPARK_CONNECT_MODE_ENABLED`): a process holds Connect sessions or classic ones.

Each view becomes one DataFrame job translated from its definition: the event type's objects
(an S3 store's endpoint and credentials passed as s3a read options), arrival < cut, one copy
per `event_id` within the type (the minimum of a struct led by arrival, partition, offset), the
view's conditions, then group by bucket and keys with each metric as `_AGGREGATES` says for
its kind. The views of one event type share the read and the dedup: the first view's job
keeps the copies (the fields every view of the type reads; memory, then disk) for the
others, and the last one releases them. Read twice, a type's objects cost two passes over
the store, each with its requests per object. Sketches are Spark's own DataSketches
aggregates (`hll_sketch_agg`, `theta_sketch_agg`, `kll_sketch_agg_double`), in the formats
every engine writes.
The master rows read are counted in the same pass (an `Observation`).

Conditions become Column expressions rather than `view.where_sql()`: Spark SQL reads `\\` in
a string literal as an escape (and with `escapedStringLiterals` no longer reads `''` as a
quote), so no SQL text carries every value as DuckDB reads it.

Every object's Parquet footer is read first, with pyarrow, many at once: Spark skips an empty
file without a word and names no object when one is truncated, and a corrupt object must be
reported by its key. When Spark fails anyway, every object is read with pyarrow to find one
whose pages are garbled (`CorruptObject`); if none is, Spark's error propagates.

The footers also tell the objects written with an older schema of the event type: those are
read through `batch.objects.read_rows` (pyarrow, on the driver), which casts, renames and
null-fills them exactly as for the DuckDB engine, and joined to Spark's own read of the rest.
Compacting old objects rewrites them in today's schema and gives Spark the whole read back.
"""

from __future__ import annotations

import functools
import operator
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast
from urllib.parse import urlparse

import pyarrow as pa
from py4j.protocol import Py4JJavaError
from pyspark.errors import PySparkException
from pyspark.sql import Column, DataFrame, Observation, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import from_arrow_schema, from_arrow_type
from pyspark.storagelevel import StorageLevel

from lambdalake import master
from lambdalake.batch.engine import EXACT_SQL, SUBMITTED, aggregate_of, with_rows_read
from lambdalake.batch.objects import read_all, read_rows, written_schema
from lambdalake.events import EventSchema
from lambdalake.monoids import ApproxDistinct, DistinctSet, Monoid, Quantiles
from lambdalake.project import Project
from lambdalake.resources import run_script
from lambdalake.storage import FileStore, ObjectStore, S3Store
from lambdalake.tables import table_schema
from lambdalake.views import View

if TYPE_CHECKING:
    from pyspark.sql._typing import OptionalPrimitiveType

DEFAULT_CONF = {
    "spark.app.name": "lambdalake-batch",
    "spark.ui.showConsoleProgress": "false",  # the run draws its own progress bars
    # Adaptive execution would drop a stage it finds empty, and the rows-read `Observation`
    # with it (its `get` then fails): keep the stage, which costs nothing when it is empty.
    "spark.sql.adaptive.optimizer.excludedRules":
        "org.apache.spark.sql.execution.adaptive.AQEPropagateEmptyRelation",
}
DEDUP_ORDER = ("arrival", "partition", "offset")
CONNECT = "sc://"
_S3A_PROVIDERS = {
    False: "org.apache.hadoop.fs.s3a.SimpleAWSCredentialsProvider",
    True: "org.apache.hadoop.fs.s3a.TemporaryAWSCredentialsProvider",
}


@dataclass(frozen=True)
class Aggregate:
    """A kind in Spark: the value it folds per event (from the field's column and Arrow
    type), and its aggregate over the column of those values (by name)."""

    value: Callable[[Column, pa.DataType], Column]
    aggregate: Callable[[Monoid, str], Column]


def _field(column: Column, arrow_type: pa.DataType) -> Column:
    return column


def _exact(sql: str) -> Aggregate:
    return Aggregate(_field, lambda metric, name: F.expr(sql.format(f"`{name}`")))


def _summed(column: Column, arrow_type: pa.DataType) -> Column:
    """A decimal summed at 38 digits, as DuckDB does (Spark would widen by 10 only)."""
    if pa.types.is_decimal(arrow_type):
        return column.cast(from_arrow_type(pa.decimal128(38, arrow_type.scale)))
    return column


def sketch_input(column: Column, arrow_type: pa.DataType) -> Column:
    """A value as Spark's hash sketch aggregates must see it to hash as DataSketches (and
    `lambdalake.sketches`) do: integers and booleans as bigint; a double as its canonical
    bits (-0.0 as 0.0, one NaN), which DataSketches hashes exactly as it hashes the double
    (Spark's `hll_sketch_agg` takes no doubles).
    """
    if pa.types.is_floating(arrow_type):
        bits = F.java_method(F.lit("java.lang.Double"), F.lit("doubleToLongBits"), column + 0.0)
        return F.when(column.isNotNull(), bits.cast("bigint"))
    if pa.types.is_integer(arrow_type) or pa.types.is_boolean(arrow_type):
        return column.cast("bigint")
    return column


_AGGREGATES: dict[str, Aggregate] = {
    **{kind: _exact(sql) for kind, sql in EXACT_SQL.items()},
    "sum": Aggregate(_summed, _exact(EXACT_SQL["sum"]).aggregate),
    "approx_distinct": Aggregate(
        sketch_input, lambda m, name: F.hll_sketch_agg(F.col(name), cast(ApproxDistinct, m).lg_k)
    ),
    "distinct_set": Aggregate(
        sketch_input, lambda m, name: F.theta_sketch_agg(F.col(name), cast(DistinctSet, m).lg_k)
    ),
    "quantiles": Aggregate(
        lambda column, _: column.cast("double"),
        lambda m, name: F.kll_sketch_agg_double(F.col(name), cast(Quantiles, m).k),
    ),
}


class SparkEngine:
    name = "spark"

    def __init__(self, master_url: str = "local[*]", conf: Mapping[str, str] | None = None):
        self.master_url, self.conf = master_url, dict(conf or {})
        self._spark: SparkSession | None = None
        # each store's and event type's objects and the schemas they were written with: a
        # master object never changes under its key, so the views of a type read each
        # footer once
        self._written: dict[tuple[str, str, str], dict[str, pa.Schema]] = {}
        self._shared: _SharedEvents | None = None

    @property
    def spark(self) -> SparkSession:
        """The session, started on first use (a JVM start takes seconds)."""
        if self._spark is None:
            self._spark = spark_session(self.master_url, self.conf)
        return self._spark

    def compute(
        self, project: Project, view: View, store: ObjectStore, keys: list[str], cut: int
    ) -> pa.Table:
        event_schema = project.schemas[view.event_type]
        schema = master.arrow_schema(event_schema)
        target = table_schema(project, view)
        if not keys:
            return with_rows_read(target.empty_table(), 0)
        written = self._written_schemas(store, view.event_type, keys)
        current = [key for key in keys if written[key] == schema]
        older = [key for key in keys if written[key] != schema]
        try:
            table, read = self._run(project, view, store, (current, older), cut)
        except (Py4JJavaError, PySparkException):
            self._release()
            read_all(store, keys, lambda part: part.to_table().num_rows)  # which one?
            raise
        order = [(name, "ascending") for name in ("bucket", *view.keys)]
        return with_rows_read(table.cast(target).sort_by(order), read)

    def _written_schemas(
        self, store: ObjectStore, event_type: str, keys: list[str]
    ) -> dict[str, pa.Schema]:
        objects = (store.url, getattr(store, "endpoint_url", None) or "", event_type)
        known = self._written.get(objects, {})
        unread = [key for key in keys if key not in known]
        read = dict(zip(unread, read_all(store, unread, written_schema), strict=True))
        self._written[objects] = {key: known.get(key) or read[key] for key in keys}
        return self._written[objects]

    def _run(
        self,
        project: Project,
        view: View,
        store: ObjectStore,
        keys: tuple[list[str], list[str]],
        cut: int,
    ) -> tuple[pa.Table, int]:
        """The view's table as Spark computes it over the objects in today's schema and
        those written with an older one, and the master rows read below the cut."""
        schema = master.arrow_schema(project.schemas[view.event_type])
        source = (store.url, getattr(store, "endpoint_url", None), view.event_type,
                  tuple(map(tuple, keys)), cut)
        shared = self._shared
        if shared is None or shared.source != source:
            self._release()
            views = [v for v in project.views.values() if v.event_type == view.event_type]
            events, read = self._first_copies(store, keys, project.schemas[view.event_type],
                                              views, cut)
            shared = self._shared = _SharedEvents(source, events, read, len(views))
        table = view_frame(view, schema, shared.events).toArrow()
        if shared.rows_read is None:  # the first job over the copies read the master rows
            shared.rows_read = shared.read.get["rows"]
        rows_read = shared.rows_read
        shared.uses_left -= 1
        if shared.uses_left <= 0:
            self._release()
        return table, rows_read

    def _first_copies(
        self,
        store: ObjectStore,
        keys: tuple[list[str], list[str]],
        event_schema: EventSchema,
        views: list[View],
        cut: int,
    ) -> tuple[DataFrame, Observation]:
        """The first copy of each event below the cut, with the fields `views` read, and the
        `Observation` counting the master rows its first job reads; kept (memory, then
        disk) when more than one view is computed from it."""
        read = observation(self.spark)
        rows = self._read(store, keys, event_schema).where(F.col("arrival") < cut)
        rows = rows.observe(read, F.count(F.lit(1)).alias("rows"))
        events = first_copies(rows, set().union(*(v.fields_read() for v in views)))
        if len(views) > 1:
            events = events.persist(StorageLevel.MEMORY_AND_DISK)
        return events, read

    def _release(self) -> None:
        if self._shared is not None:
            self._shared.events.unpersist()
            self._shared = None

    def _read(
        self, store: ObjectStore, keys: tuple[list[str], list[str]], event_schema: EventSchema
    ) -> DataFrame:
        current, older = keys
        spark_schema = from_arrow_schema(master.arrow_schema(event_schema))
        frames = []
        if current:
            reader = self.spark.read.schema(spark_schema).options(**s3a_options(store))
            frames.append(reader.parquet(*(f"{store_uri(store)}/{key}" for key in current)))
        if older:
            frames.append(self.spark.createDataFrame(read_rows(store, older, event_schema)))
        return functools.reduce(lambda one, other: one.unionByName(other), frames)


def observation(spark: SparkSession) -> Observation:
    """An `Observation` of the session's kind: a Spark Connect session takes only its own,
    which `Observation()` gives only in a process started in Connect mode."""
    if type(spark).__module__.startswith("pyspark.sql.connect"):
        from pyspark.sql.connect.observation import Observation as ConnectObservation

        # stands in for the classic one, as pyspark's own `Observation()` does in Connect mode
        return cast(Observation, ConnectObservation())
    return Observation()


@dataclass
class _SharedEvents:
    """The first copies of a type's events over one read (`source`: the store, the type, the
    objects, the cut), for the views of the type not yet computed from them."""

    source: tuple[object, ...]
    events: DataFrame
    read: Observation
    uses_left: int
    rows_read: int | None = None


def first_copies(rows: DataFrame, fields: set[str]) -> DataFrame:
    """One row per `event_id`: its first copy (the smallest arrival, partition, offset) with
    `ts` and `fields`.

    The minimum of a struct is a sort-based aggregate: grouped straight away, Spark sorts
    every row twice, for a partial aggregate before the shuffle (which removes next to
    nothing: copies of an id are rare) and again after it. Shuffled by id first, once.
    """
    first = F.min(F.struct(*DEDUP_ORDER, "ts", *sorted(fields))).alias("first")
    by_id = rows.repartition("event_id").groupBy("event_id")
    return by_id.agg(first).select("first.*").drop(*DEDUP_ORDER)


def view_frame(view: View, schema: pa.Schema, events: DataFrame) -> DataFrame:
    """The view's rows over the first copies of its type's events (`first_copies`): filter,
    group, metrics by their kind.

    Each metric's input column is projected first, under the metric's name, then aggregated
    (Spark refuses `java_method`, which is not deterministic, inside an aggregate).
    """
    bucket = (F.col("ts") - F.col("ts") % view.bucket_ms).alias("bucket")
    inputs = [metric_input(m, schema).alias(name) for name, m in view.metrics.items()]
    metrics = [_aggregate(m).aggregate(m, name).alias(name) for name, m in view.metrics.items()]
    matching = events.where(condition(view))
    return matching.select(bucket, *view.keys, *inputs).groupBy("bucket", *view.keys).agg(*metrics)


def condition(view: View) -> Column:
    """The view's filter; a null never matches (SQL comparison semantics)."""
    tests = (c.compare(F.col(c.field), F.lit(c.value)) for c in view.where)
    return functools.reduce(operator.and_, tests, F.lit(True))


def metric_input(metric: Monoid, schema: pa.Schema) -> Column:
    """The value a metric folds, per event (1 for a count)."""
    if not metric.field:
        return F.lit(1)
    return _aggregate(metric).value(F.col(metric.field), schema.field(metric.field).type)


def _aggregate(metric: Monoid) -> Aggregate:
    return aggregate_of(_AGGREGATES, metric, "spark")


def store_uri(store: ObjectStore) -> str:
    """The store's root as Spark reads it."""
    root = store.arrow()[1]
    if isinstance(store, FileStore):
        return f"file://{root}"
    if isinstance(store, S3Store):
        return f"s3a://{root}"
    raise ValueError(f"the spark engine reads file:// and s3:// stores, not {store.url}")


def s3a_options(store: ObjectStore) -> dict[str, str]:
    """The S3 store's endpoint, region and credentials as s3a options (none for files)."""
    if not isinstance(store, S3Store):
        return {}
    credentials = store.credentials()
    options = {
        "access.key": credentials.access_key,
        "secret.key": credentials.secret_key,
        "endpoint.region": store.client.meta.region_name or "us-east-1",
        "aws.credentials.provider": _S3A_PROVIDERS[bool(credentials.token)],
    }
    if credentials.token:
        options["session.token"] = credentials.token
    if store.endpoint_url:  # an S3-compatible server (MinIO, moto): path-style requests
        options |= {
            "endpoint": store.endpoint_url,
            "path.style.access": "true",
            "connection.ssl.enabled": str(urlparse(store.endpoint_url).scheme == "https").lower(),
        }
    return {f"fs.s3a.{name}": value for name, value in options.items()}


def spark_session(master_url: str = "local[*]", conf: Mapping[str, str] | None = None):
    """The process's Spark session (`getOrCreate`: an existing one is reused) with the s3a jars.

    On `local[...]` the jars go on the driver's class path; for a cluster in `spark.jars`,
    which ships them to the executors (the AWS SDK bundle is large: copied per session).
    A Spark Connect URL (`sc://host:port`) opens a remote session: the server has its jars.
    `SUBMITTED` joins the session of a driver spark-submit (or EMR Serverless) started.
    """
    builder, defaults = SparkSession.builder, DEFAULT_CONF
    if master_url.startswith(CONNECT):
        builder = builder.remote(master_url)
        # a session on a server takes runtime SQL settings only; the server set its own
        defaults = {name: v for name, v in DEFAULT_CONF.items() if name.startswith("spark.sql.")}
    elif master_url != SUBMITTED:
        builder = builder.master(master_url).config(map=_classpath(master_url))
    for name, value in (defaults | dict(conf or {})).items():
        builder = builder.config(name, value)
    return builder.getOrCreate()


def _classpath(master_url: str) -> dict[str, OptionalPrimitiveType]:
    jars = hadoop_aws_jars()
    if master_url.startswith("local"):
        return {"spark.driver.extraClassPath": os.pathsep.join(jars)}
    return {"spark.jars": ",".join(jars)}


@functools.cache
def hadoop_aws_jars() -> list[str]:
    """hadoop-aws matching pyspark's Hadoop and the AWS SDK, fetched once (`spark_jars.sh`)."""
    return run_script("spark_jars.sh").split(",")
