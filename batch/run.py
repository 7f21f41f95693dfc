"""The batch run: recompute every view up to a cut, write a new version, publish it atomically.

A run picks the cut from the archive watermarks, computes each view with an engine, writes
the view files, then the manifest, then the pointer (`catalog.publish`): a reader never sees
a half-written version, and a run that fails leaves the previous version serving. Every run
that starts is recorded in the history, failed ones with their error.

One run at a time per store: a run holds the store's batch lease (`lambdalake.lease`, in
`views/_lease.json`) from before it picks its cut until it has published and pruned. A run
that finds the lease held is refused, naming the holder and until when. The publish is a
compare-and-swap that moves the pointer only past the serving cut (`catalog.publish`), so
should two runs overlap anyway (a holder stalled past its lease's expiry), the one with the
older cut is refused ("superseded") and its version deleted; an older cut is never served.
Both refusals are recorded in the history (outcome "refused").

A run that would change nothing is refused with a `BatchRefused` rather than published as a
copy: no archive watermarks yet, or a cut that does not advance past the serving version's
("nothing new since cut …"). These publish nothing and are not recorded as runs.

An incremental run (`incremental=True`) merges the serving version with the views over only
the master data that arrived since its cut (`batch.incremental`); its manifest names that
version as its `base_version`. The answer is the full recompute's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

import pyarrow as pa
import pyarrow.parquet as pq
from rich.progress import Progress

from lambdalake import catalog, master
from lambdalake.batch import incremental as delta
from lambdalake.batch.engine import CorruptObject, Engine, engine_named, rows_read
from lambdalake.catalog import Manifest, ViewFiles
from lambdalake.events import iso
from lambdalake.lease import Lease, LeaseHeld
from lambdalake.project import Project, load_project
from lambdalake.settings import Settings
from lambdalake.storage import ObjectStore, open_store
from lambdalake.views import View

log = logging.getLogger("lambdalake.batch")

ORPHAN_AGE = timedelta(hours=1)  # files of a run without a manifest: older ones are abandoned
STEPS = 2  # per view: computed, written
ProgressCallback = Callable[[str, int, int], None]  # (view, steps done, steps in all)
Report = Callable[[str, int], None]


class BatchError(RuntimeError):
    """A batch run refused or failed; the message says why. The serving version is unchanged."""


class BatchRefused(BatchError):
    """Nothing to do (no watermarks yet, nothing new since the cut), or another run's turn
    (its lease held, its newer cut published): not a failure."""


def run_batch(
    settings: Settings,
    project: Project,
    store: ObjectStore,
    engine: Engine,
    *,
    incremental: bool = False,
    progress: Progress | ProgressCallback | None = None,
) -> Manifest:
    """Compute every view up to the newest cut, publish it, keep the newest versions.

    `incremental`: build on the serving version when it allows (`delta.usable_base`),
    else recompute in full. `progress`: a rich `Progress` (one bar per view) or a callback
    (view, done, total). Raises `BatchError` when there is nothing to do or the run fails.
    """
    master.check_schemas(store, project)
    run = _Run(settings, project, store, engine, _reporter(progress, list(project.views)))
    with run.leased() as lease:
        cut = next_cut(settings, store)
        base = delta.usable_base(store, project) if incremental else None
        manifest = run.execute(cut, base, lease)
        try:
            prune_versions(store, settings.versions_kept, [*project.views, delta.SCRATCH])
        except Exception:  # the new version is published; pruning is retried by the next run
            log.warning("pruning old batch versions failed", exc_info=True)
    return manifest


def run_from_settings(
    settings: Settings,
    engine_name: str,
    *,
    master: str | None = None,
    incremental: bool = False,
    progress: Progress | ProgressCallback | None = None,
) -> Manifest:
    """A batch run of the settings' project and store: the entry point of schedules and CLIs."""
    project = load_project(settings.project)
    store = open_store(settings.store_url, settings.s3_endpoint_url)
    engine = engine_named(engine_name, master)
    return run_batch(settings, project, store, engine, incremental=incremental, progress=progress)


def summarize(manifest: Manifest) -> dict[str, Any]:
    """A published version in brief: what a schedule or a job reports."""
    return {
        "version": manifest.version,
        "cut": iso(manifest.cut),
        "engine": manifest.engine,
        "rows_read": manifest.rows_read,
        "rows_written": sum(files.rows for files in manifest.views.values()),
        "views": {name: files.rows for name, files in manifest.views.items()},
    }


def batch_lease(settings: Settings, store: ObjectStore, owner: str) -> Lease:
    return Lease(store, catalog.LEASE, owner, settings.batch_lease_seconds)


def next_cut(settings: Settings, store: ObjectStore) -> int:
    """The cut every partition has been archived past, if it moves past the serving one."""
    try:
        cut = master.choose_cut(master.cut_bounds(store, settings), settings.slice_ms)
    except master.NoWatermark as missing:
        raise BatchRefused(str(missing)) from None
    current = catalog.current(store)
    previous = current.cut if current else 0
    if cut <= previous:
        serving = f"serving {current.version}" if current else "nothing published yet"
        raise BatchRefused(f"nothing new since cut {iso(previous)} ({serving})")
    return cut


def recompute(
    settings: Settings, project: Project, store: ObjectStore, engine: Engine, lease: Lease
) -> Manifest:
    """A full run under `lease` (held by the caller) at the newest cut, published even when
    that cut is the serving one's: after the master dataset was rewritten below it (an
    erasure), every kept version but this one is deleted, as they may hold what was erased."""
    cut = master.choose_cut(master.cut_bounds(store, settings), settings.slice_ms)
    run = _Run(settings, project, store, engine, _reporter(None, []))
    run.at_serving_cut = True
    manifest = run.execute(cut, None, lease)
    for version in catalog.versions(store):
        if version != manifest.version:
            _delete_version(store, version)
    return manifest


def rollback(settings: Settings, store: ObjectStore, version: str) -> Manifest:
    """Serve a kept older (or newer) version again, holding the batch lease (not while a run
    is under way) and by compare-and-swap from the version serving when it started."""
    try:
        with batch_lease(settings, store, f"rollback to {version}"):
            return _roll_back(store, version)
    except LeaseHeld as exc:
        raise BatchError(f"rollback refused: {exc}") from None


def _roll_back(store: ObjectStore, version: str) -> Manifest:
    _, tag = catalog.current_tagged(store)
    try:
        manifest = catalog.read_manifest(store, version)
    except LookupError:
        kept = ", ".join(catalog.versions(store)) or "none"
        raise BatchError(f"no kept batch version {version!r}; kept: {kept}") from None
    missing = [key for key in _files(manifest) if key not in store.list(key)]
    if missing:
        raise BatchError(f"batch version {version} is incomplete: {', '.join(missing)} missing")
    try:
        catalog.point_at(store, version, tag)
    except catalog.PointerMoved as exc:
        raise BatchError(str(exc)) from None
    log.info("batch version rolled back", extra={"version": version, "cut": manifest.cut})
    return manifest


def prune_versions(
    store: ObjectStore, keep: int, views: Iterable[str], now: datetime | None = None
) -> list[str]:
    """Delete all but the newest `keep` versions (never the serving one); return them.

    Also deletes the files of `views` that no manifest lists (a run that failed or was
    killed) once they are older than `ORPHAN_AGE`, so a running job is left alone.
    """
    versions = catalog.versions(store)
    current = catalog.current(store)
    kept = set(versions[-keep:]) | ({current.version} if current else set())
    doomed = [v for v in versions if v not in kept]
    for version in doomed:
        _delete_version(store, version)
    orphans = _orphans(store, views, kept, now or datetime.now(UTC))
    for key in orphans:
        store.delete(key)
    if doomed or orphans:
        log.info("old batch versions deleted", extra={"versions": doomed, "orphans": orphans})
    return doomed


def _delete_version(store: ObjectStore, version: str) -> None:
    manifest = catalog.read_manifest(store, version)
    # The manifest goes first: an interrupted delete leaves orphans, never a broken version.
    store.delete(f"{catalog.VERSIONS}/{version}.json")
    for key in _files(manifest):
        store.delete(key)


def _orphans(store: ObjectStore, views: Iterable[str], kept: set[str], now: datetime) -> list[str]:
    found = []
    for view in views:
        prefix = f"{catalog.PREFIX}/{view}/v="
        for key in store.list(prefix):
            version = key.removeprefix(prefix).split("/", 1)[0]
            created = _version_time(version)
            if version not in kept and created is not None and now - created > ORPHAN_AGE:
                found.append(key)
    return found


def _version_time(version: str) -> datetime | None:
    try:
        return datetime.strptime(version, "v%Y%m%dT%H%M%S%fZ").replace(tzinfo=UTC)
    except ValueError:  # not named by `catalog.new_version`: not ours to delete
        return None


def _files(manifest: Manifest) -> list[str]:
    return [key for listed in manifest.views.values() for key in listed.files]


def _reporter(progress: Progress | ProgressCallback | None, views: list[str]) -> Report:
    if progress is None:
        return lambda view, done: None
    if isinstance(progress, Progress):
        tasks = {view: progress.add_task(view, total=STEPS) for view in views}
        return lambda view, done: progress.update(tasks[view], completed=done)
    return lambda view, done: progress(view, done, STEPS)


class _Run:
    """One batch run: its lease, compute, write, publish, and its record in the history."""

    def __init__(
        self, settings: Settings, project: Project, store: ObjectStore, engine: Engine,
        report: Report,
    ):
        self.settings, self.project, self.store, self.engine = settings, project, store, engine
        self.report = report
        self.cut: int | None = None
        self.base: Manifest | None = None
        self.version = catalog.new_version()
        self.skipped: set[str] = set()
        self.at_serving_cut = False
        self.rows_read = 0
        self.views: dict[str, ViewFiles] = {}

    @property
    def _cut(self) -> int:
        """The cut computed below, once `execute` set it (a run refused its lease has none)."""
        assert self.cut is not None, "computing before execute"
        return self.cut

    @contextmanager
    def leased(self) -> Iterator[Lease]:
        """The store's batch lease for the block; refused (and recorded) while another holds it."""
        lease = batch_lease(self.settings, self.store, f"batch run {self.version}")
        try:
            lease.acquire()
        except LeaseHeld as exc:
            self._refuse(time.monotonic(), f"another batch run is under way: {exc}")
        try:
            yield lease
        finally:
            lease.release()

    def execute(self, cut: int, base: Manifest | None, lease: Lease) -> Manifest:
        self.cut, self.base = cut, base
        started = time.monotonic()
        log.info("batch run started", extra=self._fields())
        try:
            manifest = self._publish(lease)
        except catalog.Superseded as exc:
            self._discard()
            self._refuse(started, f"superseded: {exc}")
        except Exception as exc:
            self._record(started, "failed", str(exc))
            raise BatchError(f"batch run {self.version} failed: {exc}") from exc
        self._record(started, "ok")
        return manifest

    def _discard(self) -> None:
        """Delete this run's version, never to be served (or its files: orphans, pruned later)."""
        try:
            _delete_version(self.store, self.version)
        except Exception:
            log.warning("deleting a superseded version failed", exc_info=True,
                        extra={"version": self.version})

    def _refuse(self, started: float, reason: str) -> NoReturn:
        self._record(started, "refused", reason)
        raise BatchRefused(f"batch run {self.version} refused, nothing published: {reason}")

    def _publish(self, lease: Lease) -> Manifest:
        for event_type, views in self._views_by_type().items():
            tables = self._compute(event_type, views)
            self.rows_read += rows_read(next(iter(tables.values())))
            for view in views:
                self._write(view, tables[view.name])
        manifest = Manifest(
            version=self.version,
            cut=self.cut,
            created=datetime.now(UTC).isoformat(timespec="milliseconds"),
            engine=self.engine.name,
            rows_read=self.rows_read,
            views=self.views,
            base_version=self.base.version if self.base else None,
            fingerprints=self.project.fingerprints,
        )
        if lease.lost:
            raise BatchError("the batch lease expired and was taken over while computing")
        catalog.write_manifest(self.store, manifest)
        # the pointer, written last: the publish
        catalog.publish(self.store, self.version, at_serving_cut=self.at_serving_cut)
        return manifest

    def _views_by_type(self) -> dict[str, list[View]]:
        grouped: dict[str, list[View]] = {}
        for view in self.project.views.values():
            grouped.setdefault(view.event_type, []).append(view)
        return grouped

    def _compute(self, event_type: str, views: list[View]) -> dict[str, pa.Table]:
        """Every view of one event type, over the same readable objects."""
        keys = master.data_keys(self.store, event_type)
        while True:
            readable = [k for k in keys if k not in self.skipped]
            try:
                if self.base is None:
                    return {view.name: self._compute_view(view, readable) for view in views}
                return self._merge_delta(self.base, views, readable)
            except CorruptObject as exc:
                self._skip(exc, readable)  # and compute them all again, without it

    def _merge_delta(
        self, base: Manifest, views: list[View], keys: list[str]
    ) -> dict[str, pa.Table]:
        """Every view of one event type: the base version merged with what arrived since."""
        schema = self.project.schemas[views[0].event_type]
        window = (base.cut, self._cut)
        with delta.delta_object(self.store, schema, keys, window, self.version) as (key, read):
            return {
                view.name: delta.merge(
                    self.project, view, self.store, base, self._compute_view(view, [key]), read
                )
                for view in views
            }

    def _compute_view(self, view: View, keys: list[str]) -> pa.Table:
        started = time.monotonic()
        table = self.engine.compute(self.project, view, self.store, keys, self._cut)
        seconds = round(time.monotonic() - started, 3)
        log.info(
            "view computed",
            extra={
                "view": view.name,
                "rows": table.num_rows,
                "objects": len(keys),
                "seconds": seconds,
            },
        )
        self.report(view.name, 1)
        return table

    def _skip(self, corrupt: CorruptObject, readable: list[str]) -> None:
        if self.settings.on_corrupt != "skip" or corrupt.key not in readable:
            raise BatchError(f"{corrupt} (on_corrupt=skip would leave it out)") from corrupt
        log.warning(
            "corrupt master object skipped: its events are left out of this version",
            extra={"key": corrupt.key, "error": corrupt.reason, "version": self.version},
        )
        self.skipped.add(corrupt.key)

    def _write(self, view: View, table: pa.Table) -> None:
        key = catalog.data_key(view.name, self.version)
        sink = pa.BufferOutputStream()
        pq.write_table(table.replace_schema_metadata(None), sink, compression="zstd")
        self.store.put(key, sink.getvalue().to_pybytes())
        self.views[view.name] = ViewFiles(files=[key], rows=table.num_rows)
        self.report(view.name, 2)

    def _record(self, started: float, outcome: str, error: str | None = None) -> None:
        run = self._fields() | {
            "outcome": outcome,
            "seconds": round(time.monotonic() - started, 3),
            "rows_read": self.rows_read,
            "rows_written": sum(files.rows for files in self.views.values()),
            "views": {name: files.rows for name, files in self.views.items()},
            "skipped": sorted(self.skipped),
            "error": error,
        }
        if error is None:
            log.info("batch run published", extra=run)
        elif outcome == "refused":
            log.warning("batch run refused", extra=run)
        else:
            log.error("batch run failed", extra=run)
        try:
            catalog.record_run(self.store, run)
        except Exception:  # the history is a record, not the outcome: never mask the outcome
            log.warning(
                "recording the batch run failed", exc_info=True, extra={"version": self.version}
            )

    def _fields(self) -> dict[str, Any]:
        base = self.base.version if self.base else None
        return {"version": self.version, "engine": self.engine.name, "cut": self.cut,
                "base_version": base}
