"""The serving side of real-time views: the latest value of every cell the speed layer
published, as Arrow tables shaped like the batch views so the two union directly.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from typing import Any

import pyarrow as pa

from lambdalake.project import Project
from lambdalake.views import View
from lambdalake.viewstate import CellKey, CellUpdate


class RealtimeCells:
    def __init__(self, project: Project):
        self.project = project
        self.cut = 0  # cells below it are dropped: the lowest cut of a kept batch version
        self.caught_up_at = 0  # when the speed layer last reported having read everything
        # Set by the speed layer (or the feed of it) once these cells hold everything it had
        # at start; until then an answer would undercount.
        self.restored = threading.Event()
        self._cells: dict[str, dict[CellKey, tuple[Any, ...]]] = {n: {} for n in project.views}
        # A view's table, built once per change of its cells and shared by every query until
        # the next: building it from Python objects holds the GIL, so per query it starved
        # ingestion and serialized the queries.
        self._tables: dict[tuple[str, int], pa.Table] = {}
        self._lock = threading.Lock()

    def upsert(self, updates: Iterable[CellUpdate]) -> None:
        with self._lock:
            changed = set()
            for u in updates:
                cells = self._cells.get(u.view)  # None: a view since removed from the project
                if cells is not None and u.slice >= self.cut:
                    cells[(u.slice, u.bucket, u.key)] = u.values
                    changed.add(u.view)
            for cached in [c for c in self._tables if c[0] in changed]:
                del self._tables[cached]

    def drop_below(self, cut: int) -> None:
        """Forget cells below `cut`, the real-time floor (`catalog.KeptVersions.floor`): a
        rollback to any kept version, and every view the serving version does not cover,
        find their cells here."""
        with self._lock:
            self.cut = max(self.cut, cut)
            self._tables.clear()
            for cells in self._cells.values():
                for cell in [c for c in cells if c[0] < self.cut]:
                    del cells[cell]

    def table(self, view: View, schema: pa.Schema, cut: int) -> pa.Table:
        """The view's cells at or past `cut` (the serving batch version's for this view,
        `catalog.view_cuts`), as table rows."""
        with self._lock:
            cached = self._tables.get((view.name, cut))
            if cached is None:
                cached = self._tables[view.name, cut] = self._build(view, schema, cut)
            return cached

    def _build(self, view: View, schema: pa.Schema, cut: int) -> pa.Table:
        cells = [(c, v) for c, v in self._cells[view.name].items() if c[0] >= cut]
        columns: dict[str, list[Any]] = {"bucket": [c[1] for c, _ in cells]}
        for i, key in enumerate(view.keys):
            columns[key] = [c[2][i] for c, _ in cells]
        for i, metric in enumerate(view.metrics):
            columns[metric] = [v[i] for _, v in cells]
        return pa.Table.from_pydict(columns, schema=schema)


def encode_update(update: CellUpdate, project: Project) -> bytes:
    """JSON for the wire (each metric as its kind encodes it), for buses between processes,
    with the view's definition fingerprint: a reader with another definition ignores it."""
    metrics = project.views[update.view].metrics.values()
    values = [m.encode(v) for m, v in zip(metrics, update.values, strict=True)]
    fingerprint = project.fingerprints[update.view]
    body = [update.view, update.slice, update.bucket, list(update.key), values, fingerprint]
    return json.dumps(body, separators=(",", ":")).encode()


def decode_update(data: bytes, project: Project) -> CellUpdate | None:
    """The update, or None when it is of a view the project does not define as it was
    written (removed, changed, or written before updates named their definition)."""
    name, slice_start, bucket, key, values, *fingerprint = json.loads(data)
    if fingerprint != [project.fingerprints.get(name)]:
        return None
    metrics = project.views[name].metrics.values()
    decoded = tuple(m.decode(v) for m, v in zip(metrics, values, strict=True))
    return CellUpdate(name, slice_start, bucket, tuple(key), decoded)
