"""The batch layer: every published view equals a plain-Python recompute from the raw events.

The master dataset is built the way the archiver builds it (`master.write_batch`, watermarks)
from random bus histories: several partitions, producer retries (the same event again, maybe on
another partition; another event under its id, of its type or another), late events, archive
batches retried over overlapping offset ranges, and records not archived yet. Then atomic
publish, retention, rollback, corrupt objects and the run history.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from batch_lakes import SLICE_MS, URLS, FaultyStore, events, published
from exact import exact_quantiles
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.progress import Progress

from lambdalake import catalog, master
from lambdalake.batch.duckdb_engine import DuckDBEngine
from lambdalake.batch.engine import CorruptObject
from lambdalake.batch.run import BatchError, batch_lease, prune_versions, rollback, run_batch
from lambdalake.catalog import Manifest
from lambdalake.events import Event, EventSchema
from lambdalake.example import PAGEVIEW
from lambdalake.example import PURCHASE as EXAMPLE_PURCHASE
from lambdalake.example import project as example
from lambdalake.master import Archived
from lambdalake.monoids import ApproxDistinct, Count, DistinctSet, Max, Min, Quantiles, Sum
from lambdalake.project import Project
from lambdalake.settings import Settings
from lambdalake.storage import FileStore, ObjectStore
from lambdalake.tables import table_schema
from lambdalake.views import Condition, View

# Engine agreement over doubles and their sketches: `amount` as a float here (the example's is
# decimal(18,2), which tests/test_decimals.py covers in every engine).
PURCHASE = EventSchema("purchase", {**EXAMPLE_PURCHASE.fields, "amount": "float"})

# Hypothesis examples each get a fresh store; on tmpfs the store's fsyncs cost nothing.
SCRATCH = "/dev/shm" if Path("/dev/shm").is_dir() else None
ENGINE = DuckDBEngine()

# The example views, and views that reach the rest of the SQL translation: filters, min and
# max, nullable keys and metric fields, two keys, int sums, minute buckets.
PROJECT = Project.of(
    schemas=[PAGEVIEW, PURCHASE],
    views=[
        *example.views.values(),
        View(
            name="durations_by_referrer_minute",
            event_type="pageview",
            keys=("referrer",),
            bucket="minute",
            metrics={
                "total_ms": Sum("duration_ms"),
                "shortest": Min("duration_ms"),
                "longest": Max("duration_ms"),
                "views": Count(),
                "urls": ApproxDistinct("url"),
            },
            where=(Condition("duration_ms", ">=", 100),),
        ),
        View(
            name="referrers_by_url_day",
            event_type="pageview",
            keys=("url",),
            bucket="day",
            metrics={
                "total_ms": Sum("duration_ms"),
                "longest": Max("duration_ms"),
                "referrers": ApproxDistinct("referrer"),
                "distinct_ms": DistinctSet("duration_ms"),
            },
        ),
        View(
            name="big_purchases_by_user_day",
            event_type="purchase",
            keys=("user_id", "sku"),
            bucket="day",
            metrics={
                "spent": Sum("amount"),
                "smallest": Min("amount"),
                "largest": Max("amount"),
                "amounts": Quantiles("amount"),
                "distinct_amounts": DistinctSet("amount"),
            },
            where=(Condition("amount", ">", 5.0), Condition("sku", "!=", "s0")),
        ),
    ],
)
# The same filters, written again in Python for the independent recompute.
WHERE = {
    "durations_by_referrer_minute": lambda f: (
        f["duration_ms"] is not None and f["duration_ms"] >= 100
    ),
    "big_purchases_by_user_day": lambda f: f["amount"] > 5.0 and f["sku"] != "s0",
}


# -- random bus histories ------------------------------------------------------------------


@dataclass(frozen=True)
class Lake:
    """Every record sent on the bus, the archive batches written, the partition watermarks."""

    partitions: int
    records: list[Archived]
    batches: list[list[Archived]]
    watermarks: dict[int, int]
    next_offsets: dict[int, int]


@st.composite
def resent(draw: st.DrawFn, event: Event) -> Event:
    """A producer retry: the same event, or now and then a different one under its id, of its
    type or of another (an id is unique within its type only)."""
    return draw(st.just(event) | events(event.event_id, event.type) | events(event.event_id))


@st.composite
def lakes(draw: st.DrawFn) -> Lake:
    partitions = draw(st.integers(1, 3))
    originals = [draw(events(f"e{i}")) for i in range(draw(st.integers(0, 30)))]
    repeated = draw(st.lists(st.sampled_from(originals), max_size=10)) if originals else []
    retries = [draw(resent(event)) for event in repeated]
    on_bus: dict[int, list[Archived]] = {p: [] for p in range(partitions)}
    arrival = {p: draw(st.integers(SLICE_MS, 4_000)) for p in range(partitions)}  # cut > 0
    for event in draw(st.permutations(originals + retries)):
        partition = draw(st.integers(0, partitions - 1))
        arrival[partition] += draw(st.integers(0, 1_500))  # never decreases in a partition
        offset = len(on_bus[partition])
        on_bus[partition].append(Archived(event, partition, offset, arrival[partition]))
    batches, watermarks, next_offsets = [], {}, {}
    for partition, records in on_bus.items():
        archived = draw(st.integers(0, len(records)))
        batches += draw(archive_batches(records[:archived]))
        if archived < len(records):  # every record arriving before the next one is archived
            watermarks[partition] = records[archived].arrival
        else:
            watermarks[partition] = arrival[partition] + draw(st.integers(0, 3_000))
        next_offsets[partition] = archived
    records = [r for rs in on_bus.values() for r in rs]
    return Lake(partitions, records, batches, watermarks, next_offsets)


@st.composite
def archive_batches(draw: st.DrawFn, records: list[Archived]) -> list[list[Archived]]:
    """Consecutive batches covering `records`, and retried batches over overlapping ranges."""
    if not records:
        return []
    splits = draw(st.lists(st.integers(1, len(records) - 1), max_size=3)) if records[1:] else []
    edges = [0, *sorted(set(splits)), len(records)]
    batches = [records[a:b] for a, b in zip(edges, edges[1:], strict=False)]
    for _ in range(draw(st.integers(0, 2))):
        start = draw(st.integers(0, len(records) - 1))
        batches.append(records[start : draw(st.integers(start + 1, len(records)))])
    return draw(st.permutations(batches))


def write_lake(store: ObjectStore, lake: Lake) -> None:
    for batch in lake.batches:
        master.write_batch(store, PROJECT.schemas, batch[0].partition, batch)
    for partition, watermark in lake.watermarks.items():
        master.write_watermark(store, partition, lake.next_offsets[partition], watermark)


def lake_settings(partitions: int = 1, **overrides: Any) -> Settings:
    return Settings(partitions=partitions, slice_seconds=SLICE_MS // 1000, **overrides)


# -- the independent recompute -------------------------------------------------------------


def recompute(records: list[Archived], cut: int) -> dict[str, dict[tuple, dict[str, Any]]]:
    """Each view's rows by (bucket, *keys): dedup by (type, event id) keeping the earliest
    arrival, below the cut."""
    earliest: dict[tuple[str, str], Event] = {}
    for record in sorted(records, key=lambda r: (r.arrival, r.partition, r.offset)):
        if record.arrival < cut:
            earliest.setdefault((record.event.type, record.event.event_id), record.event)
    return {name: recompute_view(view, earliest.values()) for name, view in PROJECT.views.items()}


def recompute_view(view: View, events: Any) -> dict[tuple, dict[str, Any]]:
    accepts = WHERE.get(view.name, lambda fields: True)
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for event in events:
        if event.type == view.event_type and accepts(event.fields):
            bucket = event.ts - event.ts % view.bucket_ms
            key = (bucket, *(event.fields[k] for k in view.keys))
            groups.setdefault(key, []).append(dict(event.fields))
    return {
        key: {
            name: aggregate(metric.kind, [row.get(metric.field) for row in rows])
            for name, metric in view.metrics.items()
        }
        for key, rows in groups.items()
    }


def aggregate(kind: str, values: list[Any]) -> Any:
    present = [v for v in values if v is not None]
    if kind == "count":
        return len(values)
    if kind == "sum":
        return sum(present)
    if kind in ("min", "max"):
        return (min if kind == "min" else max)(present, default=None)
    if kind == "quantiles":  # exact for the few values a group has here
        return exact_quantiles(present)
    assert kind in ("approx_distinct", "distinct_set")
    return len(set(present) - {""})  # sketches ignore empty strings, as DataSketches does


def as_rows(view: View, table: pa.Table) -> dict[tuple, dict[str, Any]]:
    rows = {}
    for row in table.to_pylist():
        key = (row["bucket"], *(row[k] for k in view.keys))
        assert key not in rows, f"{view.name}: two rows for {key}"
        rows[key] = {name: metric.result(row[name]) for name, metric in view.metrics.items()}
    return rows


def assert_views_equal(store: ObjectStore, manifest: Manifest, records: list[Archived]) -> None:
    expected = recompute(records, manifest.cut)
    for name, table in published(store, manifest).items():
        view = PROJECT.views[name]
        assert table.schema == table_schema(PROJECT, view)
        assert table.num_rows == manifest.views[name].rows
        actual = as_rows(view, table)
        assert actual.keys() == expected[name].keys(), name
        for key, metrics in expected[name].items():
            for metric, value in metrics.items():
                got = actual[key][metric]
                close = isinstance(value, float) and math.isclose(got, value, abs_tol=1e-9)
                assert close or got == value, f"{name} {key} {metric}: {got} != {value}"


# -- the main property ---------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(lakes())
def test_every_view_equals_a_recompute_from_the_raw_events(lake: Lake) -> None:
    with tempfile.TemporaryDirectory(dir=SCRATCH) as folder:
        store = FileStore(Path(folder))
        write_lake(store, lake)
        config = lake_settings(lake.partitions)
        cut = master.choose_cut(lake.watermarks.values(), SLICE_MS)
        manifest = run_batch(config, PROJECT, store, ENGINE)
        assert manifest.cut == cut
        assert catalog.current(store) == manifest
        assert_views_equal(store, manifest, lake.records)
        assert manifest.rows_read == rows_below(lake, cut)


def rows_below(lake: Lake, cut: int) -> int:
    """Master rows below the cut, a row rewritten by a retried batch into the same object once."""
    return len(
        {
            (master.object_key(r.event.type, r.partition, b[0].offset, b[-1].offset), r.offset)
            for b in lake.batches
            for r in b
            if r.arrival < cut
        }
    )


# -- a simple archive for the other tests --------------------------------------------------


class Archive:
    """Partition 0 of a bus: each `round` archives a few events and seals the partition."""

    def __init__(self, store: ObjectStore):
        self.store, self.records, self.rounds = store, [], 0

    def round(self, events: int = 6) -> list[str]:
        start, offset = (self.rounds + 1) * 10_000, len(self.records)
        batch = [
            Archived(_event(f"r{self.rounds}-{i}", i), 0, offset + i, start + i)
            for i in range(events)
        ]
        self.records += batch
        self.rounds += 1
        keys, _ = master.write_batch(self.store, PROJECT.schemas, 0, batch)
        master.write_watermark(self.store, 0, len(self.records), start + 10_000)
        return keys


def _event(event_id: str, i: int) -> Event:
    if i % 2:
        return Event(
            event_id, "purchase", i * 3_600_000, {"user_id": f"u{i}", "sku": "s1", "amount": 7.5}
        )
    fields = {"url": URLS[i % len(URLS)], "user_id": f"u{i}", "referrer": None, "duration_ms": 150}
    return Event(event_id, "pageview", i * 60_000, fields)


class FlakyStore(FaultyStore):
    """A store whose `fail_at`-th change (put, create, replace or delete; from 1) raises, once."""

    def __init__(self, inner: ObjectStore, fail_at: int):
        super().__init__(inner)
        self.fail_at, self.writes = fail_at, 0

    def before_change(self, op: str, key: str) -> None:
        self.writes += 1
        if self.writes == self.fail_at:
            raise OSError(f"injected failure writing {key}")


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    return FileStore(tmp_path / "lake")


def run(store: ObjectStore, **overrides: Any) -> Manifest:
    return run_batch(lake_settings(**overrides), PROJECT, store, ENGINE)


# -- atomic publish, no-op runs, history ---------------------------------------------------


LEASE, VIEW_FILES, MANIFEST, POINTER, RUN_RECORD = 1, len(PROJECT.views), 1, 1, 1


@pytest.mark.parametrize("fail_at", range(LEASE + 1, LEASE + VIEW_FILES + MANIFEST + POINTER + 1))
def test_a_run_failing_midway_leaves_the_previous_version_serving(store, fail_at):
    archive = Archive(store)
    archive.round()
    before = run(store)
    tables = published(store, before)
    archive.round()
    with pytest.raises(BatchError, match="injected failure"):
        run(FlakyStore(store, fail_at))
    assert catalog.current(store) == before
    assert published(store, before) == tables
    assert_views_equal(store, before, archive.records)
    failed = catalog.runs(store)[-1]
    assert failed["outcome"] == "failed" and "injected failure" in failed["error"]
    assert failed["cut"] == 30_000 and failed["engine"] == "duckdb" and failed["seconds"] >= 0
    after = run(store)
    assert after.cut == 30_000
    assert_views_equal(store, after, archive.records)


def test_a_failure_recording_the_history_does_not_fail_a_published_run(store, caplog):
    Archive(store).round()
    manifest = run(FlakyStore(store, LEASE + VIEW_FILES + MANIFEST + POINTER + RUN_RECORD))
    assert catalog.current(store) == manifest
    assert catalog.runs(store) == []
    assert "recording the batch run failed" in caplog.text


def test_the_history_records_each_run(store, caplog):
    caplog.set_level(logging.INFO, "lambdalake.batch")
    archive = Archive(store)
    archive.round(events=8)
    manifest = run(store)
    [record] = catalog.runs(store)
    assert record["version"] == manifest.version and record["outcome"] == "ok"
    assert record["rows_read"] == manifest.rows_read == 8
    assert record["rows_written"] == sum(v.rows for v in manifest.views.values())
    assert record["views"] == {name: v.rows for name, v in manifest.views.items()}
    assert record["error"] is None
    [logged] = [r for r in caplog.records if r.getMessage() == "batch run published"]
    assert logged.version == manifest.version and logged.cut == manifest.cut


def test_no_watermarks_is_refused(store):
    with pytest.raises(BatchError, match="no archive watermark yet for partition"):
        run(store)
    master.write_watermark(store, 0, 0, 5_000)
    with pytest.raises(BatchError, match=r"partition\(s\) 1, 2$"):
        run(store, partitions=3)
    assert catalog.runs(store) == []


def test_a_run_with_nothing_new_is_refused_and_publishes_nothing(store):
    Archive(store).round()
    manifest = run(store)
    with pytest.raises(BatchError, match=f"nothing new since cut .* {manifest.version}"):
        run(store)
    assert catalog.versions(store) == [manifest.version]
    assert len(catalog.runs(store)) == 1


def test_progress_moves_one_bar_per_view(store):
    archive = Archive(store)
    archive.round()
    calls = []
    run_batch(lake_settings(), PROJECT, store, ENGINE, progress=lambda *c: calls.append(c))
    for view in PROJECT.views:
        assert [c for c in calls if c[0] == view] == [(view, 1, 2), (view, 2, 2)]
    archive.round()
    with Progress(disable=True) as progress:
        run_batch(lake_settings(), PROJECT, store, ENGINE, progress=progress)
    assert {t.description: t.completed for t in progress.tasks} == dict.fromkeys(PROJECT.views, 2)


# -- retention and rollback ----------------------------------------------------------------


def test_retention_keeps_the_newest_versions_and_rollback_serves_an_older_one(store):
    archive = Archive(store)
    manifests = []
    for _ in range(4):
        archive.round()
        manifests.append(run(store, versions_kept=2))
    kept = [m.version for m in manifests[-2:]]
    assert catalog.versions(store) == kept
    assert view_versions(store) == set(kept)

    older = rollback(lake_settings(), store, kept[0])
    assert catalog.current(store) == older == manifests[-2]
    assert_views_equal(store, older, archive.records)
    with pytest.raises(BatchError, match="no kept batch version"):
        rollback(lake_settings(), store, manifests[0].version)
    assert catalog.current(store) == older

    archive.round()
    newest = run(store, versions_kept=2)
    assert catalog.versions(store) == [kept[1], newest.version]
    assert view_versions(store) == {kept[1], newest.version}


def test_retention_never_deletes_the_serving_version(store):
    archive = Archive(store)
    versions = []
    for _ in range(3):
        archive.round()
        versions.append(run(store).version)
    rollback(lake_settings(), store, versions[0])
    assert prune_versions(store, 1, PROJECT.views) == [versions[1]]
    assert catalog.versions(store) == [versions[0], versions[2]]
    assert catalog.current(store).version == versions[0]


def test_orphaned_files_are_deleted_once_an_hour_old(store):
    now = datetime.now(UTC)
    stale = catalog.new_version(now - timedelta(hours=2))
    running = catalog.new_version(now - timedelta(minutes=10))
    for version in (stale, running):
        store.put(catalog.data_key("pageviews_by_url_hour", version), b"half written")
    assert prune_versions(store, 5, PROJECT.views, now) == []
    assert view_versions(store) == {running}


def test_rollback_refuses_an_incomplete_version(store):
    Archive(store).round()
    manifest = run(store)
    store.delete(manifest.views["revenue_by_sku_day"].files[0])
    with pytest.raises(BatchError, match="incomplete"):
        rollback(lake_settings(), store, manifest.version)


def view_versions(store: ObjectStore) -> set[str]:
    keys = store.list(f"{catalog.PREFIX}/")
    return {k.split("/v=")[1].split("/")[0] for k in keys if "/v=" in k}


# -- corrupt master objects ----------------------------------------------------------------


CORRUPTIONS = {
    "truncated": lambda data: data[: len(data) // 2],
    "empty": lambda data: b"",
    "not parquet": lambda data: b"PAR1" + b"\x00" * 64,
}


def corrupt_pageviews(store: ObjectStore, how: str) -> tuple[Archive, str]:
    archive = Archive(store)
    archive.round()
    [key] = [k for k in archive.round() if "type=pageview" in k]
    store.put(key, CORRUPTIONS[how](store.get(key)))
    return archive, key


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_a_corrupt_object_fails_the_run_naming_its_key(store, how):
    _, key = corrupt_pageviews(store, how)
    with pytest.raises(BatchError, match=f"corrupt master object {key}"):
        run(store)
    assert catalog.current(store) is None
    [failed] = catalog.runs(store)
    assert failed["outcome"] == "failed" and key in failed["error"]


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_on_corrupt_skip_leaves_the_object_out_with_a_warning(store, caplog, how):
    archive, key = corrupt_pageviews(store, how)
    manifest = run(store, on_corrupt="skip")
    lost = {r.event.event_id for r in archive.records[6:] if r.event.type == "pageview"}
    assert_views_equal(
        store, manifest, [r for r in archive.records if r.event.event_id not in lost]
    )
    [warning] = [r for r in caplog.records if r.name == "lambdalake.batch" and r.levelno >= 30]
    assert warning.key == key and "skipped" in warning.getMessage()
    assert catalog.runs(store)[-1]["skipped"] == [key]


def test_the_engine_names_the_corrupt_object(store):
    _, key = corrupt_pageviews(store, "truncated")
    keys = master.data_keys(store, "pageview")
    with pytest.raises(CorruptObject, match=key) as raised:
        ENGINE.compute(PROJECT, PROJECT.views["pageviews_by_url_hour"], store, keys, 10**9)
    assert raised.value.key == key


# -- one run at a time: the lease, and compare-and-swap publish ------------------------------


def test_a_run_finds_another_under_way_and_says_so(store):
    Archive(store).round()
    with batch_lease(lake_settings(), store, "batch run v-other") as holding:
        with pytest.raises(BatchError, match=r"another batch run is under way: .*held by batch "
                           r"run v-other \(host .*, pid \d+\) until \d{4}-"):
            run(store)
        assert not holding.lost
    assert catalog.current(store) is None
    [refused] = catalog.runs(store)
    assert refused["outcome"] == "refused" and "v-other" in refused["error"]
    assert refused["cut"] is None
    assert run(store).cut == 20_000  # released: the next run proceeds at once


def test_runs_started_together_publish_once_and_always_the_newest_cut(store):
    """Two runs at once, many times, each time after new data: one publishes, the other is
    refused (the lease, or nothing new by the time it has it); the answers always equal the
    recompute at the newest cut."""
    archive = Archive(store)
    with ThreadPoolExecutor(2) as pool:
        for round_ in range(8):
            archive.round()
            start = threading.Barrier(2)
            outcomes = list(pool.map(lambda _, b=start: start_run(store, b), range(2)))
            assert sorted(outcomes) == ["published", "refused"], round_
            serving = catalog.current(store)
            assert serving is not None and serving.cut == (round_ + 2) * 10_000
            assert_views_equal(store, serving, archive.records)
    assert len([r for r in catalog.runs(store) if r["outcome"] == "ok"]) == 8


def start_run(store: ObjectStore, start: threading.Barrier) -> str:
    start.wait()
    try:
        run(store)
    except BatchError as exc:
        assert "another batch run is under way" in str(exc) or "nothing new" in str(exc)
        return "refused"
    return "published"


def cli(store: ObjectStore, *args: str, **env: str) -> subprocess.Popen[str]:
    settings = {"LAMBDALAKE_STORE": store.url, "LAMBDALAKE_PARTITIONS": "1",
                "LAMBDALAKE_SLICE_SECONDS": str(SLICE_MS // 1000),
                "LAMBDALAKE_PROJECT": "test_batch:PROJECT"}
    here = str(Path(__file__).parent)
    return subprocess.Popen(
        [sys.executable, "-c", "from lambdalake.stack.cli import main; main()", *args],
        env=os.environ | settings | env | {"PYTHONPATH": os.pathsep.join([here, *sys.path])},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_cli_runs_started_together_in_processes_publish_once(store):
    archive = Archive(store)
    for round_ in range(2):
        archive.round()
        procs = [cli(store, "batch", "run") for _ in range(2)]
        results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
        codes = sorted(code for code, _, _ in results)
        assert codes == [0, 1], results
        [(_, _, err)] = [r for r in results if r[0] == 1]
        errors = [line for line in err.splitlines() if not line.startswith("{")]  # not logs
        assert len(errors) == 1 and errors[0].startswith("error: "), err
        assert "another batch run is under way" in err or "nothing new" in err, err
        serving = catalog.current(store)
        assert serving is not None and serving.cut == (round_ + 2) * 10_000
        assert_views_equal(store, serving, archive.records)
    assert len(catalog.versions(store)) == 2


HOLDER = """
import sys, time
from pathlib import Path
from lambdalake.batch.run import batch_lease
from lambdalake.settings import Settings
from lambdalake.storage import FileStore
lease = batch_lease(Settings(batch_lease_seconds=float(sys.argv[2])), FileStore(Path(sys.argv[1])),
                    "batch run v-killed")
lease.acquire()
print("holding", flush=True)
time.sleep(600)
"""


def test_a_run_killed_with_kill_9_blocks_the_next_only_until_its_lease_expires(store):
    """A holder renews its lease past its duration while alive; killed with -9, the next run
    is refused (named, with the holder's pid) until the lease expires, then proceeds."""
    Archive(store).round()
    seconds = 1.5
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(store.root), str(seconds)],
        stdout=subprocess.PIPE, env=env, text=True,
    )
    try:
        assert holder.stdout.readline() == "holding\n"
        deadline = time.monotonic() + 2.5 * seconds  # past its duration: renewed meanwhile
        while time.monotonic() < deadline:
            with pytest.raises(BatchError, match=f"v-killed .*pid {holder.pid}"):
                run(store, batch_lease_seconds=seconds)
            time.sleep(0.3)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    killed = time.monotonic()
    with pytest.raises(BatchError, match=f"pid {holder.pid}"):
        run(store, batch_lease_seconds=seconds)
    while True:
        try:
            manifest = run(store, batch_lease_seconds=seconds)
            break
        except BatchError:
            assert time.monotonic() - killed < seconds + 1.0, "the expired lease still blocks"
            time.sleep(0.1)
    assert manifest.cut == 20_000 and catalog.current(store) == manifest


class GatedEngine:
    """The DuckDB engine, waiting at its first view until `gate` is set: a slow run."""

    name = "duckdb"

    def __init__(self) -> None:
        self.gate, self.waiting = threading.Event(), threading.Event()

    def compute(self, *args: Any) -> pa.Table:
        self.waiting.set()
        self.gate.wait(60)
        return ENGINE.compute(*args)


def test_a_version_at_or_below_the_serving_cut_is_never_published(store):
    """A publisher that does not hold the lease moves the pointer past the cut of a run under
    way: the run's compare-and-swap publish finds a newer cut serving, refuses, records it,
    and deletes its version; the newer version keeps serving."""
    archive = Archive(store)
    archive.round()
    slow = GatedEngine()
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(run_batch, lake_settings(), PROJECT, store, slow)
        assert slow.waiting.wait(30)
        archive.round()
        newer = Manifest(version=catalog.new_version(), cut=30_000, created="test",
                         engine="test", rows_read=0, views={})
        catalog.write_manifest(store, newer)
        catalog.publish(store, newer.version)
        slow.gate.set()
        with pytest.raises(BatchError, match=r"refused, nothing published: superseded: .*is "
                           r"serving, at or past the cut"):
            pending.result(60)
    assert catalog.current(store) == newer
    assert catalog.versions(store) == [newer.version]
    assert catalog.runs(store)[-1]["outcome"] == "refused"


def test_concurrent_publishers_only_ever_move_the_cut_forward(store):
    """Many publishers at once, in random order: each publish either moves the pointer past
    the serving cut or is refused; the pointer never goes back."""
    manifests = []
    for cut in [5, 3, 8, 1, 8, 6, 2, 7, 4, 9] * 2:
        manifest = Manifest(version=catalog.new_version(), cut=cut * 1_000, created="test",
                            engine="test", rows_read=0, views={})
        catalog.write_manifest(store, manifest)
        manifests.append(manifest)
    seen: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            serving = catalog.current(store)
            seen.append(serving.cut if serving else 0)

    def publish(manifest: Manifest) -> bool:
        try:
            catalog.publish(store, manifest.version)
        except catalog.Superseded:
            return False
        return True

    watcher = threading.Thread(target=watch)
    watcher.start()
    with ThreadPoolExecutor(8) as pool:
        published_ = list(pool.map(publish, manifests))
    stop.set()
    watcher.join()
    assert catalog.current(store).cut == 9_000
    assert seen == sorted(seen)
    assert len(published_) == 20 and published_.count(True) <= 9


def test_rollback_waits_for_no_run_and_swaps_from_the_version_it_read(store):
    archive = Archive(store)
    archive.round()
    first = run(store)
    archive.round()
    run(store)
    busy = batch_lease(lake_settings(), store, "batch run v-busy")
    with busy, pytest.raises(BatchError, match="rollback refused: .*v-busy"):
        rollback(lake_settings(), store, first.version)
    assert rollback(lake_settings(), store, first.version) == catalog.current(store) == first


class LeaseOutageStore(FileStore):
    """A file store that cannot write the lease while `outage` is set (as if unreachable)."""

    outage = False

    def replace(self, key: str, data: bytes, tag: str) -> str:
        if self.outage and key == catalog.LEASE:
            raise OSError("injected outage")
        return super().replace(key, data, tag)


def test_a_run_that_lost_its_lease_publishes_nothing(tmp_path):
    """A run whose renewals fail past its lease's expiry finds the lease taken over when it
    resumes: it publishes nothing, and the new holder's lease is left alone."""
    store = LeaseOutageStore(tmp_path / "lake")
    Archive(store).round()
    slow = GatedEngine()
    settings = lake_settings(batch_lease_seconds=1)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(run_batch, settings, PROJECT, store, slow)
        assert slow.waiting.wait(30)
        store.outage = True
        time.sleep(1.5)
        taker = batch_lease(settings, FileStore(store.root), "batch run v-next")
        taker.acquire()
        store.outage = False
        time.sleep(0.6)  # the stalled run's next renewal finds the lease taken
        slow.gate.set()
        with pytest.raises(BatchError, match="lease expired and was taken over"):
            pending.result(60)
    assert catalog.current(store) is None and catalog.versions(store) == []
    assert catalog.runs(store)[-1]["outcome"] == "failed"
    with pytest.raises(BatchError, match="v-next"):
        run(store)
    taker.release()
    assert run(store).cut == 20_000
