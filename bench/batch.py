"""Batch engines on the same master Parquet data (the example project), at 1M and 10M events.

The data is generated here, vectorized, shaped like `lambdalake.synthetic`: 97% pageviews,
skewed urls and users, late events, 1% producer retries (the same event id again, later,
maybe on another partition), 4 partitions, over 30 days, in objects of up to 100k rows laid
out as the archiver lays them out. Measured on it, as master rows read per second:

- the DuckDB engine (`batch.duckdb_engine`) and a hand-written DuckDB SQL query computing the
  same views (same dedup rule, same exact metrics) with DuckDB's own `approx_count_distinct`
  where the views keep sketches;
- the Spark engine (`batch.spark_engine`, `local[*]`) and a hand-written PySpark DataFrame
  job computing the same views, sketches with `hll_sketch_agg`, on the same session.
  The references are written as a person would write them, not from the engines' plans: the
  dedup each of the usual ways (DuckDB: `QUALIFY row_number()`, `DISTINCT ON`; Spark: a
  `row_number()` window, the minimum of a struct per id), a reference's time being its
  fastest way's, then one GROUP BY per view;
- the DuckDB engine over the Spark engine, and how each engine's time grows from the first
  size to the last (10x the rows: linear is 10);
- an incremental run over a full run (`run_batch`) for a day of new data on top of the last
  size, the two versions checked equal: the DuckDB engine's in the JSON, the Spark engine's
  printed too. History's objects are in the id index (`batch.id_index`) as earlier runs
  left them; each timed incremental run indexes the day's objects itself.

    .venv/bin/python bench/batch.py [--sizes 1000000 10000000] [--runs 3] [--folder DIR]

Every time is the median of 3 runs (`--runs`), with min and max under `runs` in the JSON.
The last line printed is one JSON object with the six headline figures.
"""
# ruff: noqa: E402 (the package imports must follow the sys.path fix below)

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and this file, named batch.py,
# would shadow the `batch` package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]

import argparse
import binascii
import json
import math
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyspark.sql import Window
from pyspark.sql import functions as F

from lambdalake import catalog, example, master, sketches, synthetic
from lambdalake.batch import id_index
from lambdalake.batch.duckdb_engine import DuckDBEngine
from lambdalake.batch.engine import Engine, rows_read
from lambdalake.batch.run import rollback, run_batch
from lambdalake.batch.spark_engine import SparkEngine
from lambdalake.project import Project
from lambdalake.settings import Settings
from lambdalake.storage import FileStore

DAY = 86_400_000
DAYS = 30
START = 1_767_225_600_000  # 2026-01-01
PARTITIONS = 4
ROWS_PER_OBJECT = 100_000
USERS = 5_000
T = TypeVar("T")
SPARK_CONF = {
    "spark.driver.memory": "6g",
    "spark.sql.shuffle.partitions": "8",
    "spark.ui.enabled": "false",
}
PAGEVIEWS = example.project.views["pageviews_by_url_hour"]
REVENUE = example.project.views["revenue_by_sku_day"]
# The two views the hand-written references compute, so the ratios compare like with like.
project = Project.of(example.project.schemas.values(), [PAGEVIEWS, REVENUE])


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- the data ------------------------------------------------------------------------------


@dataclass
class Lake:
    store: FileStore
    end: int  # every arrival is below it: the cut
    offsets: np.ndarray  # next offset per partition

    def keys(self, event_type: str) -> list[str]:
        return master.data_keys(self.store, event_type)


def generate(n: int, start: int, days: int, rng: np.random.Generator, offsets: np.ndarray):
    """`n` bus records arriving over `days` from `start`: one Arrow table per event type."""
    unique = n - n // 100
    arrival = start + rng.integers(0, days * DAY, unique)
    late = rng.random(unique) < 0.05
    jitter = np.where(late, rng.integers(0, 2 * 3_600_000, unique), rng.integers(0, 5_000, unique))
    ts = arrival - jitter
    ids = binascii.hexlify(rng.bytes(16 * unique))
    ids = pa.FixedSizeBinaryArray.from_buffers(pa.binary(32), unique, [None, pa.py_buffer(ids)])
    source = np.concatenate([np.arange(unique), rng.integers(0, unique, n - unique)])
    retried = arrival[source[unique:]] + rng.integers(0, 60_000, n - unique)  # a minute later
    arrival = np.concatenate([arrival, retried])
    partition = rng.integers(0, PARTITIONS, n).astype(np.int32)
    order = np.lexsort((arrival, partition))
    source, arrival, partition = source[order], arrival[order], partition[order]
    first = np.searchsorted(partition, np.arange(PARTITIONS))
    offset = offsets[partition] + np.arange(n) - first[partition]
    offsets += np.bincount(partition, minlength=PARTITIONS)
    meta = {
        "event_id": ids.cast(pa.binary()).cast(pa.string()).take(source),
        "ts": ts[source],
        "arrival": arrival,
        "partition": partition,
        "offset": offset,
    }
    purchase = (rng.random(unique) < 0.03)[source]
    fields = _fields(rng, unique, source)
    return {
        event_type: pa.table(
            {**meta, **fields}, schema=master.arrow_schema(project.schemas[event_type])
        ).filter(pa.array(purchase if event_type == "purchase" else ~purchase))
        for event_type in ("pageview", "purchase")
    }


def _fields(rng: np.random.Generator, unique: int, source: np.ndarray) -> dict[str, pa.Array]:
    def pick(names: list, index: np.ndarray) -> pa.Array:
        return pa.DictionaryArray.from_arrays(index[source], pa.array(names)).dictionary_decode()

    users = [f"user-{i}" for i in range(USERS)]
    url = np.minimum((rng.pareto(1.0, unique) + 1).astype(np.int64) - 1, len(synthetic.URLS) - 1)
    sku = np.minimum(rng.exponential(1 / 0.15, unique).astype(np.int64), len(synthetic.SKUS) - 1)
    referrers = rng.integers(0, len(synthetic.REFERRERS), unique)
    return {
        "url": pick(synthetic.URLS, url),
        "user_id": pick(users, (rng.pareto(1.2, unique) + 1).astype(np.int64) % USERS),
        "referrer": pa.array(np.array(synthetic.REFERRERS, dtype=object)[referrers[source]]),
        "duration_ms": rng.exponential(20_000, unique).astype(np.int64)[source],
        "sku": pick(synthetic.SKUS, sku),
        # cents, to the decimal(18,2) the purchase's amount is (the float cast rounds)
        "amount": pa.array(np.round(rng.uniform(2, 200, unique), 2)[source]).cast(
            pa.decimal128(18, 2), safe=False
        ),
    }


def write(lake: Lake, tables: dict[str, pa.Table]) -> None:
    """Objects of up to ROWS_PER_OBJECT rows per type and partition, named as the archiver
    names them; then every partition's watermark at the lake's end."""
    for event_type, table in tables.items():
        for p in range(PARTITIONS):
            rows = table.filter(pc.equal(table["partition"], p))
            for at in range(0, rows.num_rows, ROWS_PER_OBJECT):
                chunk = rows.slice(at, ROWS_PER_OBJECT)
                first, last = chunk["offset"][0].as_py(), chunk["offset"][-1].as_py()
                path = lake.store.root / master.object_key(event_type, p, first, last)
                path.parent.mkdir(parents=True, exist_ok=True)
                pq.write_table(chunk, path, compression="zstd")
    for p in range(PARTITIONS):
        master.write_watermark(lake.store, p, int(lake.offsets[p]), lake.end)


def make_lake(folder: Path, n: int, seed: int) -> Lake:
    started = time.perf_counter()
    lake = Lake(FileStore(folder), START + DAYS * DAY, np.zeros(PARTITIONS, np.int64))
    write(lake, generate(n, START, DAYS, np.random.default_rng(seed), lake.offsets))
    say(f"  {n:,} events written in {time.perf_counter() - started:.1f} s")
    return lake


# -- the engines and the hand-written references -------------------------------------------


def engine_seconds(engine: Engine, lake: Lake) -> tuple[float, int]:
    """Every view of the project computed by `engine`; (seconds, master rows read)."""
    started, rows = time.perf_counter(), 0
    for view in project.views.values():
        table = engine.compute(project, view, lake.store, lake.keys(view.event_type), lake.end)
        rows += rows_read(table)
    return time.perf_counter() - started, rows


# The hand-written references: the views as a person would write them in each engine's own
# language, without the engine's plan: dedup the natural ways (each variant below), then one
# GROUP BY per view, DuckDB's `approx_count_distinct` and Spark's `hll_sketch_agg` where the
# view keeps an HLL sketch. A reference's time is its fastest variant's, so a slow way of
# writing it never flatters the engine.
DUCKDB_DEDUP = {
    "qualify_row_number": """
        SELECT * FROM read_parquet(?) WHERE arrival < ?
        QUALIFY row_number() OVER (
            PARTITION BY event_id ORDER BY arrival, "partition", "offset") = 1""",
    "distinct_on": """
        SELECT DISTINCT ON (event_id) * FROM read_parquet(?) WHERE arrival < ?
        ORDER BY event_id, arrival, "partition", "offset" """,
}
DUCKDB_VIEWS = {
    "pageview": """
        SELECT ts - ts % 3600000 AS bucket, url, count(*) AS pageviews,
               approx_count_distinct(user_id) AS visitors
        FROM events GROUP BY ALL""",
    "purchase": """
        SELECT ts - ts % 86400000 AS bucket, sku, coalesce(sum(amount), 0) AS revenue,
               count(*) AS orders
        FROM events GROUP BY ALL""",
}


def duckdb_reference(lake: Lake) -> tuple[float, str]:
    """(seconds, variant) of the fastest hand-written DuckDB variant."""
    return min((duckdb_variant(lake, dedup), name) for name, dedup in DUCKDB_DEDUP.items())


def duckdb_variant(lake: Lake, dedup: str) -> float:
    started = time.perf_counter()
    with duckdb.connect() as con:
        for event_type, query in DUCKDB_VIEWS.items():
            files = [lake.store.arrow_path(k) for k in lake.keys(event_type)]
            con.sql(f"WITH events AS ({dedup}) {query}", params=[files, lake.end]).to_arrow_table()
    return time.perf_counter() - started


def spark_first_by_window(rows: Any, *fields: str) -> Any:
    """The textbook dedup: row_number over a window per event id."""
    first = Window.partitionBy("event_id").orderBy("arrival", "partition", "offset")
    return rows.withColumn("n", F.row_number().over(first)).where(F.col("n") == 1)


def spark_first_by_min(rows: Any, *fields: str) -> Any:
    """The aggregate dedup: the smallest (arrival, partition, offset, ...) struct per id."""
    first = F.min(F.struct("arrival", "partition", "offset", "ts", *fields)).alias("e")
    return rows.groupBy("event_id").agg(first).select("e.*")


SPARK_DEDUP = {"window_row_number": spark_first_by_window, "min_struct": spark_first_by_min}


def spark_reference(spark: SparkEngine, lake: Lake) -> tuple[float, str]:
    """(seconds, variant) of the fastest hand-written PySpark variant."""
    return min((spark_variant(spark, lake, dedup), name) for name, dedup in SPARK_DEDUP.items())


def spark_variant(spark: SparkEngine, lake: Lake, dedup: Callable[..., Any]) -> float:
    session = spark.spark
    started = time.perf_counter()

    def events(event_type: str, *fields: str) -> Any:
        files = [f"file://{lake.store.arrow_path(k)}" for k in lake.keys(event_type)]
        rows = session.read.parquet(*files).where(F.col("arrival") < lake.end)
        return dedup(rows, *fields)

    hour = (F.col("ts") - F.col("ts") % 3_600_000).alias("bucket")
    events("pageview", "url", "user_id").groupBy(hour, "url").agg(
        F.count(F.lit(1)).alias("pageviews"), F.hll_sketch_agg("user_id", 12).alias("visitors")
    ).toArrow()
    day = (F.col("ts") - F.col("ts") % DAY).alias("bucket")
    events("purchase", "sku", "amount").groupBy(day, "sku").agg(
        F.coalesce(F.sum("amount"), F.lit(0.0)).alias("revenue"), F.count(F.lit(1)).alias("orders")
    ).toArrow()
    return time.perf_counter() - started


@dataclass
class Figures:
    """Seconds per run of each measure (the median of the runs is the figure)."""

    rows: int
    duckdb: list[float]
    duckdb_reference: list[float]
    spark: list[float]
    spark_reference: list[float]
    variants: dict[str, list[str]]  # the fastest reference variant of each run

    def median(self, measure: str) -> float:
        return statistics.median(getattr(self, measure))

    def ratio(self, engine: str) -> float:
        return self.median(f"{engine}_reference") / self.median(engine)

    def line(self) -> str:
        def rate(measure: str) -> str:
            seconds = self.median(measure)
            return (f"{self.rows / seconds:,.0f} rows/s ({seconds:.1f} s; "
                    f"{min(getattr(self, measure)):.1f}-{max(getattr(self, measure)):.1f})")

        return (
            f"{self.rows:,} rows, median of {len(self.duckdb)}: duckdb engine {rate('duckdb')}, "
            f"reference {rate('duckdb_reference')}, ratio {self.ratio('duckdb'):.2f}; "
            f"spark engine {rate('spark')}, reference {rate('spark_reference')}, ratio "
            f"{self.ratio('spark'):.2f}; fastest references {self.variants}"
        )

    def runs(self) -> dict[str, Any]:
        return {measure: spread(getattr(self, measure))
                for measure in ("duckdb", "duckdb_reference", "spark", "spark_reference")}


def spread(seconds: list[float]) -> dict[str, Any]:
    return {"median_s": round(statistics.median(seconds), 3), "min_s": round(min(seconds), 3),
            "max_s": round(max(seconds), 3)}


def measure(lake: Lake, spark: SparkEngine, duck: DuckDBEngine, runs: int) -> Figures:
    figures = Figures(0, [], [], [], [], {"duckdb": [], "spark": []})
    for _ in range(runs):
        seconds, figures.rows = engine_seconds(duck, lake)
        figures.duckdb.append(seconds)
        reference, variant = duckdb_reference(lake)
        figures.duckdb_reference.append(reference)
        figures.variants["duckdb"].append(variant)
        spark_seconds, spark_rows = engine_seconds(spark, lake)
        assert spark_rows == figures.rows, (spark_rows, figures.rows)
        figures.spark.append(spark_seconds)
        reference, variant = spark_reference(spark, lake)
        figures.spark_reference.append(reference)
        figures.variants["spark"].append(variant)
    say("  " + figures.line())
    return figures


# -- incremental over full -----------------------------------------------------------------


def incremental_speedups(
    lake: Lake, engines: list[Engine], seed: int, runs: int
) -> list[tuple[list[float], list[float]]]:
    """A full run at the lake's end, then a day of new data: per engine, `runs` incremental
    runs on that version and full runs (all from the same base; results checked equal):
    (incremental seconds, full seconds)."""
    settings = Settings(store=lake.store.url, partitions=PARTITIONS, versions_kept=100)
    base = run_batch(settings, project, lake.store, engines[0])
    history = indexed_history(lake)
    per_day = int(sum(lake.offsets)) // DAYS
    day = generate(per_day, lake.end, 1, np.random.default_rng(seed), lake.offsets)
    lake.end += DAY
    write(lake, day)
    say(f"  a day of new data: {per_day:,} events")
    new = [key for key in all_keys(lake) if key not in history]
    return [incremental_over_full(lake, settings, engine, base, new, runs) for engine in engines]


def all_keys(lake: Lake) -> list[str]:
    return [key for event_type in project.schemas for key in lake.keys(event_type)]


def indexed_history(lake: Lake) -> set[str]:
    """The id index as the incremental runs before the base left it: every object indexed
    (untimed). Timed, the first incremental run after an upgrade indexing all of history:
    printed, not in the figure (it happens once)."""
    keys = all_keys(lake)
    seconds = timed(lambda: id_index.object_hashes(lake.store, keys))[1]
    say(f"  the id index of all history built in {seconds:.1f} s (once, not in the figures)")
    return set(keys)


def incremental_over_full(
    lake: Lake, settings: Settings, engine: Engine, base: catalog.Manifest, new: list[str],
    runs: int,
) -> tuple[list[float], list[float]]:
    """Each incremental run indexes the day's objects itself, as it would in steady state."""
    incremental_s, full_s = [], []
    for _ in range(runs):
        rollback(settings, lake.store, base.version)
        for key in new:
            lake.store.delete(id_index.entry_key(key))
        incremental, seconds = timed(
            lambda: run_batch(settings, project, lake.store, engine, incremental=True)
        )
        assert incremental.base_version == base.version
        incremental_s.append(seconds)
        rollback(settings, lake.store, base.version)
        full, seconds = timed(lambda: run_batch(settings, project, lake.store, engine))
        full_s.append(seconds)
        assert_same_versions(lake.store, incremental, full)
        say(f"  {engine.name}: incremental run {incremental_s[-1]:.1f} s "
            f"({incremental.rows_read:,} rows read), full run {full_s[-1]:.1f} s "
            f"({full.rows_read:,} rows read): {full_s[-1] / incremental_s[-1]:.1f}x")
    return incremental_s, full_s


def timed(run: Callable[[], T]) -> tuple[T, float]:
    started = time.perf_counter()
    manifest = run()
    return manifest, time.perf_counter() - started


def assert_same_versions(store: FileStore, left: catalog.Manifest, right: catalog.Manifest):
    for name, view in project.views.items():
        a, b = (pq.read_table(store.arrow_path(m.views[name].files[0])) for m in (left, right))
        assert a.select(["bucket", *view.keys]) == b.select(["bucket", *view.keys]), name
        for metric in view.metrics:
            x, y = a[metric].to_pylist(), b[metric].to_pylist()
            if a.schema.field(metric).type == pa.binary():
                x, y = list(map(sketches.estimate, x)), list(map(sketches.estimate, y))
            assert all(math.isclose(p, q, rel_tol=1e-9) for p, q in zip(x, y, strict=True))


# -- main ----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[1_000_000, 10_000_000])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--folder", type=Path, help="Where the data goes (default: a temp dir)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="lambdalake-bench-", dir=args.folder))
    duck, spark = DuckDBEngine(), SparkEngine("local[*]", SPARK_CONF)
    say(f"load before: {os.getloadavg()}")
    try:
        small, _ = run_size(folder, args.sizes[0], spark, duck, 0, args.runs)
        large, lake = run_size(folder, args.sizes[1], spark, duck, 1, args.runs)
        say(f"incremental over full, a day on top of {args.sizes[1]:,}:")
        (incremental, full), _ = incremental_speedups(lake, [duck, spark], 99, args.runs)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    per_10x = 10 / (args.sizes[1] / args.sizes[0])  # time growth scaled to 10x the rows
    print(json.dumps({
        "duckdb_ratio": round(large.ratio("duckdb"), 3),
        "spark_ratio": round(large.ratio("spark"), 3),
        "duckdb_over_spark": round(large.median("spark") / large.median("duckdb"), 3),
        "duckdb_growth_10x": round(large.median("duckdb") / small.median("duckdb") * per_10x, 3),
        "spark_growth_10x": round(large.median("spark") / small.median("spark") * per_10x, 3),
        "incremental_speedup": round(statistics.median(full) / statistics.median(incremental), 3),
        "runs": {"count": args.runs, "small": small.runs(), "large": large.runs(),
                 "reference_variants": large.variants,
                 "incremental": spread(incremental), "full": spread(full)},
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }))


def run_size(
    folder: Path, n: int, spark: SparkEngine, duck: DuckDBEngine, seed: int, runs: int
) -> tuple[Figures, Lake]:
    say(f"{n:,} events:")
    lake = make_lake(folder / f"{n}-{seed}", n, seed)
    if seed == 0:  # warm the JVM up on the first size, untimed
        spark_reference(spark, lake)
    return measure(lake, spark, duck, runs), lake


if __name__ == "__main__":
    main()
