"""The event id index of incremental runs (`batch.id_index`) keeps them exact: whatever the
hashes collide on, and through a lost entry, a compaction, an erasure and a rollback, an
incremental run equals the independent recompute from every record archived."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_batch import ENGINE, PROJECT, SCRATCH, Archive, assert_views_equal, lake_settings

from lambdalake import catalog, master
from lambdalake.batch import id_index
from lambdalake.batch.erase import erase
from lambdalake.batch.maintenance import compact
from lambdalake.batch.run import rollback, run_batch
from lambdalake.catalog import Manifest
from lambdalake.eventlog import now_ms
from lambdalake.master import Archived
from lambdalake.storage import FileStore, ObjectStore

CONFIG = lake_settings(compact_target_rows=8)
real_hash = id_index.hash_ids


def incremental(store: ObjectStore) -> Manifest:
    return run_batch(CONFIG, PROJECT, store, ENGINE, incremental=True)


def retried(archive: Archive, originals: list[Archived], start: int | None = None) -> None:
    """Producer retries of `originals` archived as the next round, arriving from `start`."""
    start, offset = start or (archive.rounds + 1) * 10_000, len(archive.records)
    batch = [Archived(o.event, 0, offset + i, start + i) for i, o in enumerate(originals)]
    archive.records += batch
    archive.rounds += 1
    master.write_batch(archive.store, PROJECT.schemas, 0, batch)
    master.write_watermark(archive.store, 0, len(archive.records), start + 10_000)


def indexed(store: ObjectStore) -> set[str]:
    """The master objects the index has an entry for."""
    prefix = f"{id_index.INDEX}/"
    return {k.removeprefix(prefix).removesuffix(".u64") for k in store.list(prefix)}


def visible(store: ObjectStore) -> set[str]:
    return {key for event_type in PROJECT.schemas for key in master.data_keys(store, event_type)}


@settings(max_examples=6, deadline=None)
@given(
    buckets=st.sampled_from([1, 3, 2**64 - 1]),  # every id collides, many do, few do
    rounds=st.lists(st.lists(st.integers(0, 200), max_size=4), min_size=1, max_size=3),
)
def test_incremental_runs_equal_the_recompute_whatever_the_hashes_collide_on(buckets, rounds):
    with tempfile.TemporaryDirectory(dir=SCRATCH) as folder, pytest.MonkeyPatch.context() as mp:
        mp.setattr(id_index, "hash_ids",
                   lambda ids: real_hash(ids) % np.uint64(buckets))
        archive = Archive(FileStore(Path(folder)))
        archive.round(events=4)
        for retries in rounds:
            archive.round(events=3)
            retried(archive, [archive.records[i % len(archive.records)] for i in retries])
            assert_views_equal(archive.store, incremental(archive.store), archive.records)


@pytest.fixture
def archive(tmp_path: Path) -> Archive:
    archive = Archive(FileStore(tmp_path / "lake"))
    for _ in range(3):
        archive.round(events=4)
    incremental(archive.store)
    archive.round(events=4)
    incremental(archive.store)  # every object indexed
    return archive


def test_a_lost_entry_is_built_again_and_an_entry_without_its_object_is_deleted(archive):
    store = archive.store
    lost = sorted(indexed(store))[0]
    store.delete(id_index.entry_key(lost))
    store.put(id_index.entry_key(master.object_key("pageview", 0, 900, 901)), b"")
    retried(archive, archive.records[:4])
    assert_views_equal(store, incremental(store), archive.records)
    assert indexed(store) == visible(store)


def test_the_index_follows_a_compaction(archive):
    store = archive.store
    compact(CONFIG, store)
    retried(archive, archive.records[::3])
    assert_views_equal(store, incremental(store), archive.records)
    assert indexed(store) == visible(store)


def test_the_index_follows_an_erasure(archive):
    store = archive.store
    master.write_watermark(store, 0, len(archive.records), now_ms() + 3_000)  # past now
    erase(CONFIG, PROJECT, store, ENGINE, "user_id", "u1")
    assert indexed(store) <= visible(store)  # no hash of an erased object's ids is left
    kept = [r for r in archive.records if r.event.fields.get("user_id") != "u1"]
    archive.records = kept
    retried(archive, kept[:5], start=now_ms() + 5_000)
    assert_views_equal(store, incremental(store), archive.records)


def test_an_incremental_run_after_a_rollback_counts_what_the_newer_version_counted(archive):
    store = archive.store
    base = catalog.current(store)
    assert base is not None
    archive.round(events=4)
    retried(archive, archive.records[-4:])
    incremental(store)
    rollback(CONFIG, store, base.version)
    retried(archive, archive.records[-6:])
    assert_views_equal(store, incremental(store), archive.records)


def test_the_hash_is_the_same_for_the_same_id_whatever_the_chunks():
    ids = pa.chunked_array([["a", "b"], ["a", "ü", ""]])
    hashed = id_index.hash_ids(ids)
    assert hashed.dtype == np.uint64 and hashed[0] == hashed[2]
    assert len(set(hashed.tolist())) == 4


hashes = st.lists(st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 2**63, 2**64 - 1])),
                  max_size=300).map(lambda xs: np.array(xs, np.uint64))


@settings(max_examples=300, deadline=None)
@given(wanted=hashes.filter(len), looked_at=hashes, shared=st.integers(0, 5))
def test_a_hash_lookup_finds_exactly_the_wanted_hashes(wanted, looked_at, shared):
    looked_at = np.concatenate([looked_at, wanted[:shared]])
    found = id_index.HashLookup(wanted).holds_any(looked_at)
    assert found == bool(np.isin(looked_at, wanted).any())
