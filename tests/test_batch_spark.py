"""The Spark engine against the DuckDB engine, on `file://` and on S3 through s3a; the nightly
function.

One Spark session (`local[2]`) serves the whole test session; starting one takes 10-30 s
here, and each view computed on it about a second, so the properties run few examples.
"""

from __future__ import annotations

import random
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from batch_lakes import PROJECT, History, assert_same_view, histories, published
from exact import QuantilesOf, exact_quantiles
from hypothesis import given, settings

from lambdalake import catalog, master, sketch_arrays, sketches
from lambdalake.batch.duckdb_engine import DuckDBEngine
from lambdalake.batch.engine import CorruptObject, Engine, rows_read
from lambdalake.batch.engine import engine_named as batch_engine
from lambdalake.batch.incremental import delta_object
from lambdalake.batch.run import BatchError, run_batch
from lambdalake.batch.spark_engine import SparkEngine, first_copies, view_frame
from lambdalake.events import Event
from lambdalake.functions import environment
from lambdalake.functions.runtime.function import FunctionError, LocalFunction
from lambdalake.functions.runtime.template import load_template
from lambdalake.master import Archived
from lambdalake.monoids import ApproxDistinct
from lambdalake.settings import Settings
from lambdalake.storage import FileStore, ObjectStore, S3Store
from lambdalake.views import View
from lambdalake.viewstate import ViewState

SPARK_CONF = {
    "spark.ui.enabled": "false",
    "spark.sql.shuffle.partitions": "4",
    "spark.default.parallelism": "2",
    "spark.driver.memory": "1g",
}
DUCKDB = DuckDBEngine()
SCHEDULED_EVENT = {
    "version": "0",
    "id": "53dc4d37-cffa-4f76-80c9-8b7d4a4d2eaa",
    "detail-type": "Scheduled Event",
    "source": "aws.events",
    "account": "123456789012",
    "time": "2026-11-24T02:00:00Z",
    "region": "us-east-1",
    "resources": ["arn:aws:events:us-east-1:123456789012:rule/lambdalake-NightlyBatch"],
    "detail": {},
}


@pytest.fixture(scope="session")
def spark() -> Iterator[SparkEngine]:
    engine = SparkEngine("local[2]", SPARK_CONF)
    yield engine
    engine.spark.stop()


@pytest.fixture(scope="session")
def bucket(s3_server: str) -> str:
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="lake")
    return "lake"


def assert_engines_agree(spark: SparkEngine, store: ObjectStore, cut: int) -> None:
    for view in PROJECT.views.values():
        keys = master.data_keys(store, view.event_type)
        got = spark.compute(PROJECT, view, store, keys, cut)
        want = DUCKDB.compute(PROJECT, view, store, keys, cut)
        assert_same_view(view, got, want)
        assert rows_read(got) == rows_read(want)


def archive_all(history: History, store: ObjectStore) -> None:
    for stage in range(len(history.cuts)):
        history.archive(store, stage)


# -- the same answers ----------------------------------------------------------------------


@pytest.mark.spark
@settings(max_examples=3, deadline=None)
@given(histories(stages=2))
def test_spark_and_duckdb_agree_on_a_file_store(spark: SparkEngine, history: History) -> None:
    with tempfile.TemporaryDirectory() as folder:
        store = FileStore(Path(folder))
        archive_all(history, store)
        assert_engines_agree(spark, store, history.cuts[-1])


@pytest.mark.spark
@settings(max_examples=3, deadline=None)
@given(histories(stages=2))
def test_a_spark_run_reads_and_publishes_on_s3(
    spark: SparkEngine, s3_server: str, bucket: str, history: History
) -> None:
    store = S3Store(f"s3://{bucket}/{uuid.uuid4().hex}", s3_server)
    archive_all(history, store)
    manifest = run_batch(history.settings(), PROJECT, store, spark)
    assert manifest.engine == "spark" and manifest.cut == history.cuts[-1]
    for name, table in published(store, manifest).items():
        view = PROJECT.views[name]
        keys = master.data_keys(store, view.event_type)
        assert_same_view(view, table, DUCKDB.compute(PROJECT, view, store, keys, manifest.cut))


@pytest.mark.spark
@pytest.mark.parametrize("users", [30, 3_000])  # an exact (list / set) sketch, an HLL one
def test_spark_sketches_merge_with_duckdb_and_python_sketches(spark, tmp_path, users):
    names = [f"user-{i}" for i in range(users)]
    by_spark, by_duckdb, by_python = (
        names[: users // 2], names[users // 3 : 2 * users // 3], names[users // 2 :]
    )
    metric = PROJECT.views["pageviews_by_url_hour"].metrics["visitors"]
    assert isinstance(metric, ApproxDistinct)
    from_spark = visitors(spark, tmp_path / "spark", by_spark)
    assert sketches.estimate(from_spark) == sketches.estimate(built(by_spark))
    parts = [from_spark, visitors(DUCKDB, tmp_path / "duckdb", by_duckdb)]
    merged = metric.merge_all([*parts, metric.merge_all(metric.lift(n) for n in by_python)])
    assert sketches.estimate(merged) == sketches.estimate(built(names))
    if users < 385:
        assert metric.result(merged) == users


def visitors(engine: Engine, folder: Path, users: list[str]) -> bytes:
    """The `visitors` sketch an engine computes over one pageview per user."""
    store = FileStore(folder)
    write_pageviews(store, users)
    view = PROJECT.views["pageviews_by_url_hour"]
    table = engine.compute(PROJECT, view, store, master.data_keys(store, "pageview"), 10**9)
    [sketch] = table["visitors"].to_pylist()
    return sketch


def built(users: list[str]) -> bytes:
    return sketch_arrays.build_sketches([0] * len(users), users)[0]


def write_pageviews(store: ObjectStore, users: list[str], durations: list[int] | None = None):
    fields = [{"url": "/", "user_id": u} for u in users]
    for one, duration in zip(fields, durations or [], strict=False):
        one["duration_ms"] = duration
    rows = [Archived(Event(f"e{i}", "pageview", 0, f), 0, i, 1_000) for i, f in enumerate(fields)]
    master.write_batch(store, PROJECT.schemas, 0, rows)


@pytest.mark.spark
@pytest.mark.parametrize("n", [150, 6_000])  # exact sketches; a Theta beyond 4096, KLL beyond k
def test_quantiles_and_distinct_sets_merge_across_spark_duckdb_and_the_speed_layer(
    spark, tmp_path, n
):
    """batch (Spark) ⊕ batch (DuckDB) ⊕ real-time (the speed layer's fold) = a recompute."""
    view = PROJECT.views["durations_by_url_hour"]
    users = [f"user-{i}" for i in range(n)]
    durations = [(i * 7919) % 100_000 for i in range(n)]  # distinct, in no order
    thirds = [slice(0, n // 3), slice(n // 3, 2 * n // 3), slice(2 * n // 3, n)]
    parts = [
        durations_cell(engine, tmp_path / engine.name, users[part], durations[part])
        for engine, part in zip((spark, DUCKDB), thirds, strict=False)
    ]
    parts.append(speed_cell(view, users[thirds[2]], durations[thirds[2]]))
    merged = [metric.merge_all(column) for metric, column in
              zip(view.metrics.values(), zip(*parts, strict=True), strict=True)]
    quantiles, viewers = view.metrics["duration_ms"], view.metrics["viewers"]
    assert merged[1] == built_theta(users)  # the same bytes as one sketch of every user
    if n <= 4096:
        assert viewers.result(merged[1]) == n
    answer = quantiles.result(merged[0], RANKS)
    if n <= 200:
        assert answer == exact_quantiles(durations, RANKS)
    assert answer == QuantilesOf(tuple(durations))  # within KLL's rank error


RANKS = (0.0, 0.01, 0.25, 0.5, 0.9, 0.99, 1.0)


def durations_cell(engine: Engine, folder: Path, users: list[str], durations: list[int]):
    """The one cell of `durations_by_url_hour` an engine computes over these pageviews."""
    store = FileStore(folder)
    write_pageviews(store, users, durations)
    view = PROJECT.views["durations_by_url_hour"]
    table = engine.compute(PROJECT, view, store, master.data_keys(store, "pageview"), 10**9)
    [row] = table.select(list(view.metrics)).to_pylist()
    return list(row.values())


def speed_cell(view: View, users: list[str], durations: list[int]) -> list[bytes]:
    """The same cell as the speed layer folds it, event by event."""
    state = ViewState(PROJECT, 60_000, 86_400_000)
    for i, (user, duration) in enumerate(zip(users, durations, strict=True)):
        event = Event(f"rt{i}", "pageview", 0, {"url": "/", "user_id": user,
                                                 "duration_ms": duration})
        state.apply(event, 1_000)
    [update] = [u for u in state.drain() if u.view == view.name]
    return list(update.values)


def built_theta(users: list[str]) -> bytes:
    return sketch_arrays.build_theta_array([0] * len(users), users).to_pylist()[0]


@pytest.mark.spark
@settings(max_examples=3, deadline=None)
@given(histories(stages=3))
def test_incremental_spark_runs_equal_full_recomputes(spark: SparkEngine, history: History):
    with (
        tempfile.TemporaryDirectory() as one,
        tempfile.TemporaryDirectory() as two,
    ):
        chained, full = FileStore(Path(one)), FileStore(Path(two))
        for stage in range(len(history.cuts)):
            history.archive(chained, stage)
            history.archive(full, stage)
            got = run_batch(history.settings(), PROJECT, chained, spark, incremental=True)
            want = run_batch(history.settings(), PROJECT, full, DUCKDB)
            assert (got.base_version is None) == (stage == 0)
            expected = published(full, want)
            for name, table in published(chained, got).items():
                assert_same_view(PROJECT.views[name], table, expected[name])


@pytest.mark.spark
def test_the_spark_dedup_sorts_the_rows_once(spark, tmp_path, capsys):
    """The dedup's aggregate is sort-based: grouped by id without a shuffle first, Spark
    sorted every row twice (before and after the shuffle): a seventh of the CPU at 1M events."""
    store = FileStore(tmp_path)
    write_pageviews(store, ["a", "b"])
    [key] = master.data_keys(store, "pageview")
    rows = spark.spark.read.parquet(f"file://{store.arrow_path(key)}")
    view = PROJECT.views["pageviews_by_url_hour"]
    events = first_copies(rows, view.fields_read())
    view_frame(view, master.arrow_schema(PROJECT.schemas["pageview"]), events).explain()
    plan = capsys.readouterr().out
    assert "SortAggregate" in plan and plan.count("Sort [event_id") == 1, plan


@pytest.mark.spark
def test_the_views_of_a_type_read_its_objects_once(spark, tmp_path):
    """The pageview views after the first are computed from its copies, kept by Spark: the
    objects gone from the store, they still answer; once every one is computed the copies
    are released, and the next run reads the store again."""
    store = FileStore(tmp_path)
    write_pageviews(store, ["a", "b", "a"], [10, 20, 30])
    keys = master.data_keys(store, "pageview")
    first, *others = (v for v in PROJECT.views.values() if v.event_type == "pageview")
    want = {view.name: DUCKDB.compute(PROJECT, view, store, keys, 2_000)
            for view in (first, *others)}
    assert_same_view(first, spark.compute(PROJECT, first, store, keys, 2_000), want[first.name])
    for key in keys:
        Path(store.arrow_path(key)).unlink()
    for view in others:
        got = spark.compute(PROJECT, view, store, keys, 2_000)
        assert_same_view(view, got, want[view.name])
        assert rows_read(got) == 3
    with pytest.raises(Exception, match="(?i)not exist|no such file|FileNotFound"):
        spark.compute(PROJECT, first, store, keys, 2_000)


@pytest.mark.spark
def test_views_computed_across_two_lakes_in_turn_each_equal_duckdb(spark, tmp_path):
    """A view of another lake between two of one lake's views: the kept copies are never
    those of the wrong lake, and each answer equals DuckDB's."""
    stores = [FileStore(tmp_path / name) for name in ("one", "two")]
    write_pageviews(stores[0], ["a", "b", "a"], [10, 20, 30])
    write_pageviews(stores[1], ["c"], [40])
    first, second, *_ = (v for v in PROJECT.views.values() if v.event_type == "pageview")
    for store, view in [(stores[0], first), (stores[1], first), (stores[0], second),
                        (stores[1], second)]:
        keys = master.data_keys(store, "pageview")
        got = spark.compute(PROJECT, view, store, keys, 2_000)
        assert_same_view(view, got, DUCKDB.compute(PROJECT, view, store, keys, 2_000))


# -- corrupt objects -----------------------------------------------------------------------


CORRUPTIONS = {
    "truncated": lambda data: data[: len(data) // 2],
    "empty": lambda data: b"",  # Spark alone would read it as no rows, without a word
    "not parquet": lambda data: b"PAR1" + b"\x00" * 64,
    # a sound footer over garbled pages: Spark fails, naming no object
    "garbled pages": lambda data: data[:4] + bytes(b ^ 0x5A for b in data[4:64]) + data[64:],
}


@pytest.mark.spark
@pytest.mark.parametrize("how", CORRUPTIONS)
def test_the_spark_engine_names_a_corrupt_object(spark, tmp_path, how):
    store = FileStore(tmp_path)
    write_pageviews(store, ["a", "b"])
    [key] = master.data_keys(store, "pageview")
    store.put(key, CORRUPTIONS[how](store.get(key)))
    view = PROJECT.views["pageviews_by_url_hour"]
    with pytest.raises(CorruptObject, match=key) as raised:
        spark.compute(PROJECT, view, store, [key], 10**9)
    assert raised.value.key == key


# -- the engine factory and the nightly function -------------------------------------------


def test_the_cli_engine_factory_builds_a_spark_engine_for_a_master_url():
    engine = batch_engine("spark", "spark://spark-master:7077")
    assert isinstance(engine, SparkEngine) and engine.master_url == "spark://spark-master:7077"
    assert batch_engine("spark").master_url == "local[*]"
    with pytest.raises(ValueError, match="use duckdb or spark"):
        batch_engine("flink")


@pytest.fixture
def lake(tmp_path: Path) -> FileStore:
    return FileStore(tmp_path / "lake")


def nightly(lake: FileStore, event: dict, **overrides: str) -> dict:
    """The template's NightlyBatch function invoked on `event`, with settings for `lake`."""
    config = History(1, [], [], []).settings(
        store=lake.url, project="batch_lakes:PROJECT", **overrides
    )
    return invoke_nightly(config, event)


def invoke_nightly(settings: Settings, event: dict = SCHEDULED_EVENT) -> dict:
    """The template's NightlyBatch function invoked on `event` with `settings`."""
    environment.bind(settings)
    try:
        return LocalFunction(load_template().functions["NightlyBatch"]).invoke(event)
    finally:
        environment.bind(None)


def test_the_nightly_function_fails_when_there_is_nothing_to_run(lake):
    with pytest.raises(FunctionError) as failed:
        nightly(lake, SCHEDULED_EVENT)
    assert isinstance(failed.value.__cause__, BatchError)
    assert "no archive watermark yet" in str(failed.value)
    assert catalog.current(lake) is None


def test_the_nightly_function_takes_only_schedule_events(lake):
    with pytest.raises(FunctionError, match="EventBridge Scheduled Event"):
        nightly(lake, {"source": "aws.s3", "detail-type": "Object Created", "detail": {}})


@pytest.mark.spark
def test_spark_reads_a_large_delta_object(spark, tmp_path):
    """An incremental run's delta of a day (65,000 pageviews) was written with Parquet's LZ4,
    whose pages Spark's reader failed on ("all input must be consumed") in the engine's
    dedup: the delta is written as the master dataset is, in zstd."""
    store, schema = FileStore(tmp_path), PROJECT.schemas["pageview"]
    rng = random.Random(7)
    rows = [
        Archived(Event(uuid.UUID(int=rng.getrandbits(128)).hex, "pageview", 3_600_000 + i,
                       {"url": f"/p/{rng.randrange(500)}", "user_id": f"u{rng.randrange(5000)}",
                        "referrer": rng.choice([None, "search", "ad"]),
                        "duration_ms": rng.randrange(60_000)}),
                 i % 4, i, 3_600_000 + i)
        for i in range(65_000)
    ]
    master.write_batch(store, PROJECT.schemas, 0, rows)
    keys = master.data_keys(store, "pageview")
    view = PROJECT.views["pageviews_by_url_hour"]
    with delta_object(store, schema, keys, (0, 2**62), "v1") as (key, read):
        table = spark.compute(PROJECT, view, store, [key], 2**62)
    assert read == 65_000 and sum(table["pageviews"].to_pylist()) == 65_000
