"""Keeping the store's size in check: compaction of the master dataset, and retention of the
batch run history and of dead letters.

Compaction rewrites (`lambdalake.rewrite`) the small objects of closed arrival ranges into
large ones: per event type and partition folder, the objects whose every row arrived below
the serving cut (archived for good: no archive batch writes there again) and that hold fewer
than half of `compact_target_rows` rows are concatenated, in offset order, into objects of up
to `compact_target_rows`. Rows keep their arrival, partition and offset, so dedup and every
answer are unchanged. It holds the batch lease, so no batch run reads what it deletes; it is
idempotent (a second pass finds nothing small enough to join) and a killed one is finished
or undone by the next (`rewrite.recover`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from lambdalake import catalog, master, rewrite
from lambdalake.batch.run import BatchError, batch_lease
from lambdalake.eventlog import now_ms
from lambdalake.lease import Lease, LeaseHeld
from lambdalake.settings import Settings
from lambdalake.storage import NotFound, ObjectStore

log = logging.getLogger("lambdalake.batch")


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    rows: int
    last_arrival: int
    schema: pa.Schema


@dataclass(frozen=True, slots=True)
class Compaction:
    objects_before: int
    objects_after: int
    recovered: dict[str, int]


def compact(settings: Settings, store: ObjectStore) -> Compaction:
    """Compact the master dataset under the batch lease; refused while a run holds it."""
    try:
        with batch_lease(settings, store, "compaction") as lease:
            return _compact(settings, store, lease)
    except LeaseHeld as exc:
        raise BatchError(f"compaction refused: {exc}") from None


def _compact(settings: Settings, store: ObjectStore, lease: Lease) -> Compaction:
    recovered = rewrite.recover(store)
    serving = catalog.current(store)
    types = event_types(store)
    before = sum(len(master.data_keys(store, t)) for t in types)
    if serving is not None:
        job = rewrite.Rewrite(store, "compact")
        for event_type in types:
            for folder, infos in _folders(store, event_type):
                for chunk in _chunks(infos, serving.cut, settings.compact_target_rows):
                    tables = [rewrite.read_table(store, info.key) for info in chunk]
                    joined = pa.concat_tables(tables).sort_by([("offset", "ascending")])
                    job.stage([info.key for info in chunk], joined, folder)
        if lease.lost:
            raise BatchError("compaction lost the batch lease; nothing committed")
        job.finish(job.commit())
    after = sum(len(master.data_keys(store, t)) for t in types)
    log.info("master dataset compacted", extra={"objects_before": before,
                                                 "objects_after": after, **recovered})
    return Compaction(before, after, recovered)


def event_types(store: ObjectStore) -> list[str]:
    """Every event type with objects in the master dataset (a type since removed too)."""
    prefix = f"{master.PREFIX}/type="
    return sorted({key.removeprefix(prefix).split("/", 1)[0] for key in store.list(prefix)})


def _folders(store: ObjectStore, event_type: str) -> Iterator[tuple[str, list[ObjectInfo]]]:
    by_folder: dict[str, list[str]] = {}
    for key in master.data_keys(store, event_type):
        by_folder.setdefault(key.rsplit("/", 1)[0], []).append(key)
    filesystem, root = store.arrow()
    for folder, keys in sorted(by_folder.items()):
        infos = [_info(filesystem, root, key) for key in keys]
        yield folder, [info for info in infos if info is not None]


def _info(filesystem: pafs.FileSystem, root: str, key: str) -> ObjectInfo | None:
    """What the object's footer says; None for one that is not readable Parquet (left to
    the batch run's corrupt-object policy)."""
    try:
        with filesystem.open_input_file(f"{root}/{key}") as source:
            footer = pq.ParquetFile(source)
            last = max((_max_arrival(footer, i) for i in range(footer.num_row_groups)),
                       default=0)
            return ObjectInfo(key, footer.metadata.num_rows, last, footer.schema_arrow)
    except (pa.ArrowException, OSError):
        log.warning("unreadable master object left out of compaction", extra={"key": key})
        return None


def _max_arrival(footer: pq.ParquetFile, group: int) -> int:
    column = footer.metadata.row_group(group).column(footer.schema_arrow.get_field_index(
        "arrival"))
    if column.statistics is not None and column.statistics.has_min_max:
        return int(column.statistics.max)
    arrival = footer.read_row_group(group, columns=["arrival"])["arrival"]
    return max(arrival.to_pylist(), default=0)


def _chunks(infos: list[ObjectInfo], cut: int, target: int) -> Iterator[list[ObjectInfo]]:
    """Runs of small closed objects of one schema, in offset order, up to `target` rows;
    a run of one is left as it is."""
    small = [i for i in infos if i.last_arrival < cut and i.rows < target // 2]
    by_schema: dict[str, list[ObjectInfo]] = {}
    for info in small:
        by_schema.setdefault(info.schema.to_string(), []).append(info)
    for group in by_schema.values():
        chunk: list[ObjectInfo] = []
        for info in group:
            if chunk and sum(i.rows for i in chunk) + info.rows > target:
                yield from ([chunk] if len(chunk) > 1 else [])
                chunk = []
            chunk.append(info)
        yield from ([chunk] if len(chunk) > 1 else [])


def prune_history(settings: Settings, store: ObjectStore) -> dict[str, int]:
    """Keep the newest `runs_kept` run records, and dead letters younger than
    `dead_letter_retention_days` (by the arrival of their newest record)."""
    runs = store.list(f"{catalog.RUNS}/")
    old_runs = runs[: max(0, len(runs) - settings.runs_kept)]
    horizon = now_ms() - int(settings.dead_letter_retention_days * 86_400_000)
    letters = store.list(f"{master.DEAD_LETTER}/")
    old_letters = [key for key in letters if _newest_arrival(store, key) < horizon]
    for key in old_runs + old_letters:
        store.delete(key)
    return {"runs": len(old_runs), "dead_letters": len(old_letters)}


def _newest_arrival(store: ObjectStore, key: str) -> int:
    try:
        lines = store.get(key).splitlines()
    except NotFound:
        return now_ms()
    return max((json.loads(line).get("timestamp", 0) for line in lines if line), default=0)
