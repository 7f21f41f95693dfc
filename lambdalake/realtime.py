"""The serving side of real-time views: the latest value of every cell the speed layer
published, as Arrow tables shaped like the batch views so the two union directly.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson
import pyarrow as pa

from lambdalake.project import Project
from lambdalake.views import View
from lambdalake.viewstate import CellUpdate

Cell = tuple[int, tuple[Any, ...]]  # (bucket, key) within an arrival slice


@dataclass(frozen=True)
class Sliced:
    """A view's cells as table rows, and the same rows as one table per arrival slice, oldest
    first: a slice's table stays the same object until a cell of it changes, so a reader can
    tell which slices are unchanged since it last looked (the newest change most)."""

    parts: tuple[pa.Table, ...]
    table: pa.Table


class RealtimeCells:
    def __init__(self, project: Project):
        self.project = project
        self.cut = 0  # cells below it are dropped: the lowest cut of a kept batch version
        self.caught_up_at = 0  # when the speed layer last reported having read everything
        # Set by the speed layer (or the feed of it) once these cells hold everything it had
        # at start; until then an answer would undercount.
        self.restored = threading.Event()
        # view -> arrival slice -> cell -> values: the speed layer changes the newest slices
        self._cells: dict[str, dict[int, dict[Cell, tuple[Any, ...]]]] = {
            n: {} for n in project.views}
        # Arrow tables built from Python objects (which holds the GIL) once per change: a
        # slice's when a cell of it changes, a view's (its slices' tables put together, no
        # copy) when any does. Rebuilding every cell at each publish starved ingestion.
        self._slices: dict[tuple[str, int], pa.Table] = {}
        self._tables: dict[tuple[str, int], Sliced] = {}
        self._lock = threading.Lock()

    def upsert(self, updates: Iterable[CellUpdate]) -> None:
        with self._lock:
            changed = set()
            for u in updates:
                slices = self._cells.get(u.view)  # None: a view since removed from the project
                if slices is not None and u.slice >= self.cut:
                    slices.setdefault(u.slice, {})[(u.bucket, u.key)] = u.values
                    changed.add((u.view, u.slice))
            for view_slice in changed:
                self._slices.pop(view_slice, None)
            views = {view for view, _ in changed}
            for cached in [c for c in self._tables if c[0] in views]:
                del self._tables[cached]

    def drop_below(self, cut: int) -> None:
        """Forget cells below `cut`, the real-time floor (`catalog.KeptVersions.floor`): a
        rollback to any kept version, and every view the serving version does not cover,
        find their cells here."""
        with self._lock:
            self.cut = max(self.cut, cut)
            self._tables.clear()
            for view, slices in self._cells.items():
                for old in [start for start in slices if start < self.cut]:
                    del slices[old]
                    self._slices.pop((view, old), None)

    def table(self, view: View, schema: pa.Schema, cut: int) -> pa.Table:
        """The view's cells at or past `cut` (the serving batch version's for this view,
        `catalog.view_cuts`), as table rows."""
        return self.sliced(view, schema, cut).table

    def sliced(self, view: View, schema: pa.Schema, cut: int) -> Sliced:
        """`table`, and its rows slice by slice."""
        with self._lock:
            cached = self._tables.get((view.name, cut))
            if cached is None:
                parts = tuple(self._slice(view, schema, start)
                              for start in sorted(self._cells[view.name]) if start >= cut)
                table = pa.concat_tables(parts) if parts else schema.empty_table()
                cached = self._tables[view.name, cut] = Sliced(parts, table)
            return cached

    def _slice(self, view: View, schema: pa.Schema, start: int) -> pa.Table:
        built = self._slices.get((view.name, start))
        if built is None:
            built = self._slices[view.name, start] = self._build(
                view, schema, self._cells[view.name][start])
        return built

    @staticmethod
    def _build(view: View, schema: pa.Schema, cells: dict[Cell, tuple[Any, ...]]) -> pa.Table:
        columns: dict[str, list[Any]] = {"bucket": [bucket for bucket, _ in cells]}
        for i, key in enumerate(view.keys):
            columns[key] = [key_values[i] for _, key_values in cells]
        values = list(cells.values())
        for i, metric in enumerate(view.metrics):
            columns[metric] = [v[i] for v in values]
        return pa.Table.from_pydict(columns, schema=schema)


def encode_update(update: CellUpdate, project: Project) -> bytes:
    """JSON for the wire (each metric as its kind encodes it), for buses between processes,
    with the view's definition fingerprint: a reader with another definition ignores it."""
    metrics = project.views[update.view].metrics.values()
    values = [m.encode(v) for m, v in zip(metrics, update.values, strict=True)]
    fingerprint = project.fingerprints[update.view]
    body = [update.view, update.slice, update.bucket, list(update.key), values, fingerprint]
    if not any(type(v) is float and not math.isfinite(v) for v in (*update.key, *values)):
        try:  # a twentieth of the stdlib's CPU, a speed transaction's most common record
            return orjson.dumps(body)
        except orjson.JSONEncodeError:  # an int beyond 64 bits, a lone surrogate
            pass
    # orjson writes a non-finite float as null; the stdlib as json.loads reads it back
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
