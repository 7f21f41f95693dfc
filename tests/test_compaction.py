"""Compaction of the master dataset: fewer objects, the same rows, the same answers, whatever
step a compaction is stopped at (an injected failure after each write or delete, or kill -9
of a process compacting), on `file://` and on S3; and the retention of the run history and of
dead letters."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import boto3
import pytest
from batch_lakes import SLICE_MS, FaultyStore, histories
from hypothesis import given, settings
from hypothesis import strategies as st
from test_batch import (
    ENGINE,
    PROJECT,
    SCRATCH,
    Archive,
    Lake,
    assert_views_equal,
    lake_settings,
    lakes,
    write_lake,
)

from lambdalake import catalog, master, rewrite
from lambdalake.batch.maintenance import compact, event_types, prune_history
from lambdalake.batch.run import BatchError, batch_lease, recompute, run_batch
from lambdalake.eventlog import now_ms
from lambdalake.storage import FileStore, ObjectStore, S3Store

TARGET = 8  # rows per compacted object here: several chunks from a few dozen events


class Crash(Exception):
    """An injected stop: the process compacting dies here."""


class CrashingStore(FaultyStore):
    """A real store whose `crash_at`-th put or delete under master/ (from 1) raises, and every
    later put or delete too, as a killed process does nothing more. Conditional writes (the
    lease) go through, so the test sees the data, not a lease left held."""

    def __init__(self, inner: ObjectStore, crash_at: int):
        super().__init__(inner)
        self.crash_at, self.changes = crash_at, 0

    def before_change(self, op: str, key: str) -> None:
        if op in ("create", "replace"):
            return
        if key.startswith(f"{master.PREFIX}/"):
            self.changes += 1
        if self.changes >= self.crash_at:
            raise Crash(key)


def visible_rows(store: ObjectStore) -> collections.Counter[tuple[Any, ...]]:
    """Every row readers see, as a multiset: a row seen twice or not at all shows."""
    rows: collections.Counter[tuple[Any, ...]] = collections.Counter()
    for event_type in event_types(store):
        for key in master.data_keys(store, event_type):
            table = rewrite.read_table(store, key)
            rows.update((event_type, *row.values()) for row in table.to_pylist())
    return rows


def objects(store: ObjectStore) -> int:
    return sum(len(master.data_keys(store, t)) for t in event_types(store))


def recompute_at_cut(store: ObjectStore, partitions: int) -> catalog.Manifest:
    config = lake_settings(partitions)
    with batch_lease(config, store, "test") as lease:
        return recompute(config, PROJECT, store, ENGINE, lease)


def compact_crashing(store: ObjectStore, partitions: int, crash_at: int | None) -> None:
    config = lake_settings(partitions, compact_target_rows=TARGET)
    if crash_at is None:
        compact(config, store)
        return
    with contextlib.suppress(Crash):  # stopped there, or done in fewer steps
        compact(config, CrashingStore(store, crash_at))


# -- the property: answers equal a recompute from the raw events, compacted at any step -------


@settings(max_examples=15, deadline=None)
@given(lake=lakes(), crash_at=st.none() | st.integers(1, 40))
def test_answers_equal_the_recompute_whatever_step_a_compaction_stops_at(
    lake: Lake, crash_at: int | None
) -> None:
    with tempfile.TemporaryDirectory(dir=SCRATCH) as folder:
        store = FileStore(Path(folder))
        write_lake(store, lake)
        if not lake.watermarks or master.choose_cut(lake.watermarks.values(), SLICE_MS) == 0:
            return
        run_batch(lake_settings(lake.partitions), PROJECT, store, ENGINE)
        rows, before = visible_rows(store), objects(store)
        compact_crashing(store, lake.partitions, crash_at)
        assert visible_rows(store) == rows  # never both, never neither, even stopped midway
        assert_views_equal(store, recompute_at_cut(store, lake.partitions), lake.records)
        compact_crashing(store, lake.partitions, None)  # finishes or undoes a stopped one
        assert visible_rows(store) == rows
        assert objects(store) <= before
        assert not [k for k in store.list("master/type=") if rewrite.is_staged(k)
                    and k not in {w for m in master.markers(store) for w in m.writes}]
        assert_views_equal(store, recompute_at_cut(store, lake.partitions), lake.records)
        settled = sorted(store.list("master/"))
        compact_crashing(store, lake.partitions, None)
        assert sorted(store.list("master/")) == settled  # idempotent


@settings(max_examples=8, deadline=None)
@given(history=histories(stages=3), compact_after=st.lists(st.booleans(), min_size=3,
                                                           max_size=3))
def test_incremental_runs_between_compactions_equal_a_full_recompute(history, compact_after):
    from batch_lakes import PROJECT as LAKE_PROJECT
    from batch_lakes import assert_same_view, published

    with tempfile.TemporaryDirectory(dir=SCRATCH) as a, \
            tempfile.TemporaryDirectory(dir=SCRATCH) as b:
        compacted, plain = FileStore(Path(a)), FileStore(Path(b))
        config = history.settings(compact_target_rows=TARGET)
        for stage, then_compact in enumerate(compact_after):
            for store in (compacted, plain):
                history.archive(store, stage)
            left = run_batch(config, LAKE_PROJECT, compacted, ENGINE, incremental=True)
            right = run_batch(config, LAKE_PROJECT, plain, ENGINE)
            for name, table in published(compacted, left).items():
                assert_same_view(LAKE_PROJECT.views[name], table, published(plain, right)[name])
            if then_compact:
                compact(config, compacted)


# -- the rewrite's steps, one at a time ------------------------------------------------------


def small_objects(store: ObjectStore, rounds: int = 12) -> Archive:
    archive = Archive(store)
    for _ in range(rounds):
        archive.round(events=4)
    run_batch(lake_settings(), PROJECT, store, ENGINE)
    return archive


def test_compaction_makes_few_objects_of_many(store):
    archive = small_objects(store)
    before = objects(store)
    result = compact(lake_settings(compact_target_rows=1_000), store)
    assert (result.objects_before, result.objects_after) == (before, 2)  # one per event type
    assert_views_equal(store, recompute_at_cut(store, 1), archive.records)


def test_objects_past_the_serving_cut_are_left_alone(store):
    archive = small_objects(store, rounds=4)
    archive.round(events=4)  # archived after the serving version's cut: not closed yet
    open_keys = {k for t in event_types(store) for k in master.data_keys(store, t)
                 if k.endswith(f"{len(archive.records) - 1:020d}.parquet")}
    compact(lake_settings(compact_target_rows=1_000), store)
    assert open_keys and open_keys <= {k for t in event_types(store)
                                       for k in master.data_keys(store, t)}


def test_nothing_is_compacted_before_a_version_is_published(store):
    archive = Archive(store)
    for _ in range(3):
        archive.round()
    before = store.list("master/")
    compact(lake_settings(compact_target_rows=1_000), store)
    assert store.list("master/") == before


def test_compaction_waits_for_no_batch_run_holding_the_lease(store):
    small_objects(store)
    with batch_lease(lake_settings(), store, "a batch run"), \
            pytest.raises(BatchError, match="compaction refused: .*held by a batch run"):
        compact(lake_settings(), store)


@pytest.fixture
def fresh_s3(s3_server: str) -> Any:
    bucket = f"lake-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    return lambda: S3Store(f"s3://{bucket}/{uuid.uuid4().hex}", s3_server)


@pytest.mark.parametrize("backend", ["file", pytest.param("s3", marks=pytest.mark.long)])
def test_a_compaction_stopped_after_any_step_changes_no_answer(tmp_path, backend, request):
    fresh = (request.getfixturevalue("fresh_s3") if backend == "s3"
             else lambda: FileStore(tmp_path / uuid.uuid4().hex))
    template = FileStore(tmp_path / "template")
    archive = small_objects(template, rounds=6)
    rows = visible_rows(template)
    config = lake_settings(compact_target_rows=10)
    for step in range(1, 100):  # stop after the 1st change, the 2nd, ... until none is left
        store = copy_of(template, fresh())
        try:
            compact(config, CrashingStore(store, step))
        except Crash:
            assert visible_rows(store) == rows, f"stopped at step {step}"
            compact(config, store)
            assert visible_rows(store) == rows, f"recovered from step {step}"
            assert objects(store) == 4
        else:
            break
    assert step > 5  # staged objects, the marker, the deletions: each one a stopping point
    assert_views_equal(store, recompute_at_cut(store, 1), archive.records)


def copy_of(source: ObjectStore, target: ObjectStore) -> ObjectStore:
    for key in source.list(""):
        target.put(key, source.get(key))
    return target


COMPACT_FOREVER = """
import sys
from lambdalake.batch.maintenance import compact
from lambdalake.settings import Settings
from lambdalake.storage import FileStore
from pathlib import Path
settings = Settings(partitions=1, slice_seconds=1, compact_target_rows=int(sys.argv[2]),
                    batch_lease_seconds=1)
print("ready", flush=True)
compact(settings, FileStore(Path(sys.argv[1])))
"""


def test_a_compaction_killed_with_kill_9_at_random_moments_changes_no_answer(store, tmp_path):
    archive = small_objects(store, rounds=30)
    rows = visible_rows(store)
    script = tmp_path / "compact.py"
    script.write_text(COMPACT_FOREVER)
    rng = random.Random(12)
    for target in (4, 8, 16, 32, 64, 1_000):
        process = subprocess.Popen([sys.executable, str(script), str(store.root), str(target)],
                                   stdout=subprocess.PIPE, env=os.environ | {"PYTHONPATH": ""})
        assert process.stdout is not None and process.stdout.readline() == b"ready\n"
        time.sleep(rng.uniform(0, 0.3))
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert visible_rows(store) == rows
        time.sleep(1.05)  # the lease it may have held expires
    compact(lake_settings(compact_target_rows=1_000), store)
    assert visible_rows(store) == rows and objects(store) == 2
    assert_views_equal(store, recompute_at_cut(store, 1), archive.records)


# -- retention of the run history and of dead letters ----------------------------------------


def test_history_keeps_the_newest_runs_and_dead_letters_within_their_period(store):
    for i in range(5):
        catalog.record_run(store, {"version": catalog.new_version(), "n": i})
    day = 86_400_000
    for name, age_days in (("old", 40), ("young", 2)):
        line = json.dumps({"offset": 0, "timestamp": now_ms() - age_days * day, "reason": "x"})
        store.put(f"{master.DEAD_LETTER}/p=0/{name}.jsonl", (line + "\n").encode())
    pruned = prune_history(lake_settings(runs_kept=2, dead_letter_retention_days=30), store)
    assert pruned == {"runs": 3, "dead_letters": 1}
    assert [r["n"] for r in catalog.runs(store)] == [3, 4]
    assert store.list(f"{master.DEAD_LETTER}/") == [f"{master.DEAD_LETTER}/p=0/young.jsonl"]


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    return FileStore(tmp_path / "lake")


