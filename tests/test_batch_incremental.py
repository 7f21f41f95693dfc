"""Incremental batch runs (DuckDB engine): each equals a full recompute at the same cut.

Two stores receive the same master dataset, archived in stages (late events, producer
retries across cuts, archive batches retried over older offsets); after each stage one store
runs incrementally on its previous version, the other recomputes in full.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from batch_lakes import PROJECT, History, assert_same_view, histories, published
from hypothesis import given, settings
from typer.testing import CliRunner

from lambdalake import catalog, master
from lambdalake.batch.duckdb_engine import DuckDBEngine
from lambdalake.batch.incremental import SCRATCH
from lambdalake.batch.run import BatchError, run_batch
from lambdalake.catalog import Manifest
from lambdalake.events import Event
from lambdalake.master import Archived
from lambdalake.project import Project
from lambdalake.stack.cli import app
from lambdalake.storage import FileStore, ObjectStore
from lambdalake.views import Condition

SCRATCH_DIR = "/dev/shm" if Path("/dev/shm").is_dir() else None
ENGINE = DuckDBEngine()
DELTAS = f"{catalog.PREFIX}/{SCRATCH}/"


def rows_arriving(store: ObjectStore, since: int, cut: int) -> int:
    """Master rows (every copy, every object) with since <= arrival < cut."""
    total = 0
    for event_type in PROJECT.schemas:
        for key in master.data_keys(store, event_type):
            arrival = pq.read_table(store.arrow_path(key), columns=["arrival"])["arrival"]
            inside = pc.and_(pc.greater_equal(arrival, since), pc.less(arrival, cut))
            total += pc.sum(inside).as_py() or 0
    return total


def assert_equal_versions(left: tuple[ObjectStore, Manifest], right: tuple[ObjectStore, Manifest]):
    (left_store, left_manifest), (right_store, right_manifest) = left, right
    assert left_manifest.cut == right_manifest.cut
    expected = published(right_store, right_manifest)
    for name, table in published(left_store, left_manifest).items():
        assert_same_view(PROJECT.views[name], table, expected[name])


@settings(max_examples=10, deadline=None)
@given(histories())
def test_an_incremental_run_equals_a_full_recompute(history: History) -> None:
    with (
        tempfile.TemporaryDirectory(dir=SCRATCH_DIR) as one,
        tempfile.TemporaryDirectory(dir=SCRATCH_DIR) as two,
    ):
        chained, full = FileStore(Path(one)), FileStore(Path(two))
        base = None
        for stage, cut in enumerate(history.cuts):
            history.archive(chained, stage)
            history.archive(full, stage)
            got = run_batch(history.settings(), PROJECT, chained, ENGINE, incremental=True)
            want = run_batch(history.settings(), PROJECT, full, ENGINE)
            assert got.cut == cut
            assert got.base_version == (base.version if base else None)
            assert got.rows_read == rows_arriving(chained, base.cut if base else 0, cut)
            assert_equal_versions((chained, got), (full, want))
            base = got
        assert chained.list(DELTAS) == []


# -- when the serving version cannot be built on -------------------------------------------


class Lake:
    """Partition 0 of a bus: each `round` archives a few events past the previous cut."""

    def __init__(self, store: ObjectStore):
        self.store, self.rounds, self.offset = store, 0, 0

    def round(self, retry_of: str | None = None) -> list[str]:
        start = (self.rounds + 1) * 10_000
        events = [
            Event(f"r{self.rounds}-{i}", "pageview", i * 60_000,
                  {"url": "/", "user_id": f"u{i}", "referrer": None, "duration_ms": 150})
            for i in range(4)
        ]
        if retry_of:  # a producer retry of an event archived in an earlier round
            events.append(Event(retry_of, "pageview", 0, {"url": "/", "user_id": "late"}))
        batch = [Archived(e, 0, self.offset + i, start + i) for i, e in enumerate(events)]
        self.rounds, self.offset = self.rounds + 1, self.offset + len(batch)
        keys, _ = master.write_batch(self.store, PROJECT.schemas, 0, batch)
        master.write_watermark(self.store, 0, self.offset, start + 10_000)
        return keys


def run(store: ObjectStore, project: Project = PROJECT, **overrides: Any) -> Manifest:
    incremental = overrides.pop("incremental", True)
    config = History(1, [], [], []).settings(**overrides)
    return run_batch(config, project, store, ENGINE, incremental=incremental)


def reasons(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Why incremental runs recomputed in full."""
    return [r.reason for r in caplog.records if r.getMessage().startswith("incremental run")]


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    return FileStore(tmp_path / "lake")


def test_the_first_run_is_a_full_one(store, caplog):
    Lake(store).round()
    assert run(store).base_version is None
    assert reasons(caplog) == ["nothing published yet"]


def test_a_base_that_left_a_corrupt_object_out_is_not_built_on(store, caplog):
    lake = Lake(store)
    [key] = lake.round()
    store.put(key, b"garbled")
    skipping = run(store, on_corrupt="skip", incremental=False)
    lake.round()
    caplog.set_level(logging.WARNING, "lambdalake.batch")
    assert run(store, on_corrupt="skip").base_version is None
    assert reasons(caplog) == [f"{skipping.version} left corrupt master objects out"]


def test_a_base_without_a_view_of_the_project_is_not_built_on(store, caplog):
    lake = Lake(store)
    lake.round()
    fewer = Project.of(PROJECT.schemas.values(), list(PROJECT.views.values())[:2])
    run(store, fewer, incremental=False)
    lake.round()
    assert run(store).base_version is None
    assert reasons(caplog)[-1].endswith(f"has no view {list(PROJECT.views)[2]} as defined now")


@pytest.mark.parametrize("change", [
    {"where": (Condition("duration_ms", ">=", 200),)},  # the same columns, other rows
    {"bucket": "hour"},
    {"keys": ("referrer", "url")},
])
def test_a_base_computed_with_another_definition_of_a_view_is_not_built_on(
    store, caplog, change
):
    """A changed view is recomputed from the master dataset, even when its columns are the
    same as before (a filter): merging the old rows would mix two definitions."""
    lake = Lake(store)
    lake.round()
    run(store, incremental=False)
    lake.round()
    name = "durations_by_referrer_minute"
    changed = Project.of(PROJECT.schemas.values(), [
        replace(v, **change) if v.name == name else v for v in PROJECT.views.values()
    ])
    caplog.set_level(logging.WARNING, "lambdalake.batch")
    manifest = run(store, changed)
    assert manifest.base_version is None
    assert reasons(caplog)[-1].endswith(f"has no view {name} as defined now")
    assert manifest.fingerprints == changed.fingerprints != PROJECT.fingerprints


def test_a_retry_of_an_event_counted_before_the_cut_is_not_counted_again(store):
    lake = Lake(store)
    lake.round()
    base = run(store)
    lake.round(retry_of="r0-1")
    merged = run(store)
    assert merged.base_version == base.version and merged.rows_read == 5
    [row] = published(store, merged)["pageviews_by_url_hour"].to_pylist()
    assert row["pageviews"] == 8  # 4 + 4, the retry once only


# -- failures ------------------------------------------------------------------------------


class FlakyStore(FileStore):
    """A file store whose `fail_at`-th write (put, create or replace; counting from 1)
    raises, once."""

    def __init__(self, root: Path, fail_at: int):
        super().__init__(root)
        self.fail_at, self.writes = fail_at, 0

    def _write(self, key: str) -> None:
        self.writes += 1
        if self.writes == self.fail_at:
            raise OSError(f"injected failure writing {key}")

    def put(self, key: str, data: bytes) -> None:
        self._write(key)
        super().put(key, data)

    def create(self, key: str, data: bytes) -> str:
        self._write(key)
        return super().create(key, data)

    def replace(self, key: str, data: bytes, tag: str) -> str:
        self._write(key)
        return super().replace(key, data, tag)


LEASE, DELTA, VIEW_FILES, MANIFEST, POINTER = 1, 2, len(PROJECT.views), 1, 1  # a delta a type
WRITES = LEASE + DELTA + VIEW_FILES + MANIFEST + POINTER


@pytest.mark.parametrize("fail_at", range(LEASE + 1, WRITES + 1))
def test_a_failed_incremental_run_leaves_the_base_serving_and_no_delta(store, fail_at):
    lake = Lake(store)
    lake.round()
    base = run(store)
    lake.round(retry_of="r0-0")
    with pytest.raises(BatchError, match="injected failure"):
        run(FlakyStore(store.root, fail_at))
    assert catalog.current(store) == base
    assert store.list(DELTAS) == []
    after = run(store)
    assert after.base_version == base.version
    [row] = published(store, after)["pageviews_by_url_hour"].to_pylist()
    assert row["pageviews"] == 8


def test_a_killed_runs_delta_is_deleted_once_an_hour_old(store):
    stale = catalog.new_version(datetime.now(UTC) - timedelta(hours=2))
    key = f"{DELTAS}v={stale}/pageview.parquet"
    store.put(key, b"half written")
    Lake(store).round()
    run(store)
    assert store.list(DELTAS) == []


def test_a_corrupt_object_arriving_since_the_base_fails_the_run_naming_it(store):
    lake = Lake(store)
    lake.round()
    base = run(store)
    [key] = lake.round()
    store.put(key, b"PAR1" + b"\0" * 64)
    with pytest.raises(BatchError, match=f"corrupt master object {key}"):
        run(store)
    assert catalog.current(store) == base
    skipped = run(store, on_corrupt="skip")
    assert skipped.base_version == base.version
    assert catalog.runs(store)[-1]["skipped"] == [key]


def test_batch_run_incremental_from_the_command_line(store, monkeypatch):
    monkeypatch.setenv("LAMBDALAKE_STORE", store.url)
    monkeypatch.setenv("LAMBDALAKE_PARTITIONS", "1")
    monkeypatch.setenv("LAMBDALAKE_SLICE_SECONDS", "1")
    monkeypatch.setenv("LAMBDALAKE_PROJECT", "batch_lakes:PROJECT")
    lake = Lake(store)
    lake.round()
    runner = CliRunner()
    assert runner.invoke(app, ["batch", "run"]).exit_code == 0
    base = catalog.current(store)
    lake.round()
    result = runner.invoke(app, ["batch", "run", "--incremental"])
    assert result.exit_code == 0, result.output
    assert catalog.current(store).base_version == base.version
    assert "published" in result.output
