"""The published batch views, held in memory as one immutable snapshot per version.

`BatchViews` follows `catalog.current(store)`. When the published version changes it reads
every view's Parquet files listed in the manifest and swaps the new snapshot in whole.
Queries take the snapshot and the real-time cells at or past its cut together (`read`), so a
swap can never leave a slice in neither. Real-time cells are kept down to the lowest cut of
the kept versions (`catalog.KeptVersions`), so a rollback to any of them is exact at once.

A view the version does not hold as defined now (changed or added since it was computed,
`catalog.view_cuts`) is served as absent from it: no batch rows, and every real-time cell.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import pyarrow as pa
import pyarrow.dataset as ds

from lambdalake import catalog
from lambdalake.catalog import Manifest
from lambdalake.eventlog import now_ms
from lambdalake.events import epoch_ms
from lambdalake.loops import Loops
from lambdalake.polling import Poller
from lambdalake.project import Project
from lambdalake.realtime import RealtimeCells, Sliced
from lambdalake.storage import ObjectStore
from lambdalake.tables import table_schema

log = logging.getLogger("lambdalake.serving")


@dataclass(frozen=True)
class Snapshot:
    """One published batch version: its manifest (None before the first) and view tables."""

    manifest: Manifest | None
    tables: Mapping[str, pa.Table]
    cuts: Mapping[str, int]  # per view: real-time cells at or past it join the batch rows

    @property
    def version(self) -> str | None:
        return self.manifest.version if self.manifest else None

    @property
    def cut(self) -> int:
        return self.manifest.cut if self.manifest else 0


@dataclass(frozen=True)
class Reading:
    """A snapshot and, for the views asked for, the real-time cells at or past its cut."""

    snapshot: Snapshot
    realtime: Mapping[str, Sliced]


class BatchViews(Poller):
    def __init__(
        self,
        project: Project,
        store: ObjectStore,
        realtime: RealtimeCells,
        poll_seconds: float = 1.0,
        loops: Loops | None = None,
        prepare: Callable[[Snapshot], None] | None = None,
    ):
        """`prepare`: called with each version's snapshot before it is served."""
        self.project, self.store, self.realtime = project, store, realtime
        self.prepare = prepare
        self.kept = catalog.KeptVersions(store, project)
        self.schemas = {name: table_schema(project, v) for name, v in project.views.items()}
        empty = {name: schema.empty_table() for name, schema in self.schemas.items()}
        self._snapshot = Snapshot(None, MappingProxyType(empty), catalog.view_cuts(None, project))
        self._swap = threading.Lock()
        self._refreshing = threading.Lock()
        # A store outage keeps the current snapshot serving; the loop retries with backoff.
        super().__init__("serving-batch-views", loops, max_backoff_s=10.0)
        self.busy_seconds = self.idle_seconds = poll_seconds
        self.ready = False

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def read(self, names: Iterable[str]) -> Reading:
        views = self.project.views
        with self._swap:
            snapshot = self._snapshot
            cells = {n: self.realtime.sliced(views[n], self.schemas[n], snapshot.cuts[n])
                     for n in names}
        return Reading(snapshot, cells)

    def refresh(self) -> bool:
        """Serve the published version if it changed; True when a new snapshot was swapped in."""
        with self._refreshing:
            manifest = catalog.current(self.store)
            if swapped := (manifest is not None
                           and manifest.version != self._snapshot.version):
                cuts = catalog.view_cuts(manifest, self.project)
                tables = MappingProxyType(self._load(manifest))
                snapshot = Snapshot(manifest, tables, MappingProxyType(cuts))
                if self.prepare is not None:
                    self.prepare(snapshot)
                self._swap_in(snapshot)
            floor = self.kept.floor()
            with self._swap:
                # Never past the served version's own floor: a version published, and the
                # served one pruned, since `current` was read leave the floor above it.
                served = catalog.realtime_floor(self._snapshot.manifest, self.project)
                self.realtime.drop_below(min(floor, served))
            self.ready = True
            return swapped

    def _swap_in(self, snapshot: Snapshot) -> None:
        if snapshot.cut < self.realtime.cut:
            log.warning("serving a batch version with a cut below the real-time cells kept: "
                        "the events between the two are missing until the next batch run",
                        extra={"version": snapshot.version, "cut": snapshot.cut,
                               "kept_from": self.realtime.cut})
        with self._swap:
            self._snapshot = snapshot
        absent = sorted(name for name, cut in snapshot.cuts.items() if cut < snapshot.cut)
        if absent:
            log.warning("views not in the batch version as defined now: answered from the "
                        "real-time layer alone until a batch run computes them",
                        extra={"version": snapshot.version, "views": absent})
        log.info("batch version served", extra={"version": snapshot.version, "cut": snapshot.cut})

    def _load(self, manifest: Manifest) -> dict[str, pa.Table]:
        filesystem, root = self.store.arrow()
        tables = {}
        for name, schema in self.schemas.items():
            listed = manifest.views[name] if manifest.covers(self.project, name) else None
            paths = [f"{root}/{key}" for key in listed.files] if listed else []
            dataset = ds.dataset(paths, schema=schema, format="parquet", filesystem=filesystem)
            tables[name] = dataset.to_table()
        return tables

    def version_age_seconds(self) -> float:
        """Seconds since the served version was created; NaN before the first or if unknown."""
        manifest = self._snapshot.manifest
        try:
            return (now_ms() - epoch_ms(manifest.created)) / 1000 if manifest else float("nan")
        except ValueError:  # `created` is free text in the manifest
            return float("nan")

    def realtime_lag_ms(self) -> int | None:
        """Since the speed layer last reported having read everything; None if it never did."""
        caught_up_at = self.realtime.caught_up_at
        return max(0, now_ms() - caught_up_at) if caught_up_at else None

    def realtime_cells(self) -> int:
        cells = self.read(self.project.views).realtime.values()
        return sum(sliced.table.num_rows for sliced in cells)

    def poll_once(self) -> int:
        return int(self.refresh())
