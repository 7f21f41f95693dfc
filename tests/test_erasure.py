"""Erasure: after `erase`, no answer and no master object holds the subject's events, every
other answer is unchanged, an audit record says who and how many (not the value), and an
erasure stopped after any step is finished by the next one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_batch import ENGINE, PROJECT, Archive, assert_views_equal, lake_settings
from test_compaction import Crash, CrashingStore, visible_rows

from lambdalake import catalog, master, rewrite
from lambdalake.batch.erase import audit, erase
from lambdalake.batch.run import BatchError, run_batch
from lambdalake.eventlog import now_ms
from lambdalake.storage import FileStore, ObjectStore

SUBJECT = "u1"  # user_id of events 1, and of no other: `Archive` names user u<i>


def lake(store: ObjectStore, rounds: int = 4) -> Archive:
    archive = Archive(store)
    for _ in range(rounds):
        archive.round(events=4)
    run_batch(lake_settings(), PROJECT, store, ENGINE)
    archive_past_now(store, len(archive.records))
    return archive


def archive_past_now(store: ObjectStore, next_offset: int) -> None:
    """The archive has passed the request: the watermark is past now's next slice."""
    master.write_watermark(store, 0, next_offset, now_ms() + 3_000)


def subject_rows(store: ObjectStore) -> int:
    """Rows of the subject in any master object there is, listed or not."""
    return sum(row.get("user_id") == SUBJECT
               for key in store.list("master/type=") if key.endswith(".parquet")
               for row in rewrite.read_table(store, key).to_pylist())


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    return FileStore(tmp_path / "lake")


def test_an_erased_subject_is_in_no_answer_and_no_object_and_the_rest_is_unchanged(store):
    archive = lake(store)
    assert subject_rows(store) == 4  # event 1 of each of the four rounds
    record = erase(lake_settings(), PROJECT, store, ENGINE, "user_id", SUBJECT, by="dpo")
    assert (record.events, record.objects, record.by) == (4, 4, "dpo")
    assert subject_rows(store) == 0
    serving = catalog.current(store)
    assert serving is not None and serving.version == record.version
    assert serving.cut >= record.before_arrival  # the real-time slices holding it are dropped
    kept = [r for r in archive.records if r.event.fields.get("user_id") != SUBJECT]
    assert_views_equal(store, serving, kept)
    assert catalog.versions(store) == [record.version]  # no rollback to a version counting it
    [entry] = audit(store)
    assert entry["field"] == "user_id" and entry["events"] == 4
    assert SUBJECT not in json.dumps(entry)


def test_an_erasure_stopped_after_any_step_is_finished_by_the_next(tmp_path):
    step = 0
    while True:
        step += 1
        store = FileStore(tmp_path / f"s{step}")
        archive = lake(store, rounds=3)
        before = visible_rows(store)
        try:
            erase(lake_settings(), PROJECT, CrashingStore(store, step), ENGINE, "user_id",
                  SUBJECT)
        except Crash:
            rows = visible_rows(store)
            assert rows == before or rows == {k: n for k, n in before.items()
                                             if SUBJECT not in k}, f"stopped at {step}"
            erase(lake_settings(), PROJECT, store, ENGINE, "user_id", SUBJECT)
            assert subject_rows(store) == 0
            kept = [r for r in archive.records if r.event.fields.get("user_id") != SUBJECT]
            assert_views_equal(store, catalog.current(store), kept)
            continue
        break
    assert step > 4


def test_erasure_waits_for_the_archive_and_then_says_so(store):
    archive = Archive(store)
    archive.round()
    run_batch(lake_settings(), PROJECT, store, ENGINE)  # watermarks far behind now
    with pytest.raises(BatchError, match="archive has not passed .* nothing erased"):
        erase(lake_settings(erase_wait_seconds=0.2), PROJECT, store, ENGINE, "user_id", SUBJECT)
    assert subject_rows(store) == 1


def test_a_field_no_type_has_or_a_value_of_the_wrong_type_is_refused(store):
    lake(store)
    with pytest.raises(BatchError, match="--field 'nope': no event type"):
        erase(lake_settings(), PROJECT, store, ENGINE, "nope", "x")
    with pytest.raises(BatchError, match="--value: not a int, the type of pageview.duration_ms"):
        erase(lake_settings(), PROJECT, store, ENGINE, "duration_ms", "ten")
