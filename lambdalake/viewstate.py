"""The speed layer's view state: pure, engine-free, shared by every speed driver.

State is kept per arrival slice: cell = (slice, bucket, key) -> one working accumulator per
metric while events may still arrive in its slice; once the slice is closed (arrivals never
decrease), its frozen values as last published, far smaller for a sketch. The serving layer
answers `batch(cut) + cells with slice >= cut`. Slices are kept down to the lowest cut of the
kept batch versions (`catalog.KeptVersions.floor`), so that a rollback to any of them is exact
at once; `drop_below` drops those below it, here and in the serving layer, as versions are
pruned.

Dedup: an event is identified by its type and `event_id` (an id is unique within its type,
as in the batch layer, which reads each type's master objects alone), and counted once while
it stays within the dedup window (by arrival),
even when its first copy was below the cut, so a retry straddling the cut is not counted
twice. Memory is bounded by the number of distinct ids within the window, and at most
`max_ids`: past that the oldest ids are forgotten early (counted in `forgotten_early`), so
under a flood the window shortens rather than the process running out of memory. This relies on
every copy of an event_id being on one partition (the bus keys records by event_id): then
the copy read first is the one with the earliest arrival, the one the batch layer keeps.
Copies on different partitions, read out of arrival order, can be counted by both layers
until a batch cut passes both copies.

Views change across restarts. A snapshot is versioned JSON (`SNAPSHOT_FORMAT`) naming each
view's definition fingerprint (`Project.fingerprints`); `restore` keeps only the views whose
definition is unchanged and returns the others, which the driver rebuilds from the bus into
a state of just those views (`for_views`) and then `adopt`s. A removed view's cells are
dropped; a snapshot of an older format is refused (`UnreadableSnapshot`): rebuild it all.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from lambdalake.event_columns import ARRIVAL
from lambdalake.events import Event
from lambdalake.monoids import Monoid
from lambdalake.project import Project
from lambdalake.settings import DEDUP_MAX_IDS
from lambdalake.views import View

CellKey = tuple[int, int, tuple[Any, ...]]  # (slice, bucket, key)
# A cell's accumulators: working (a list) while its slice may still take events, frozen (a
# tuple, what its last update published) once closed: a working sketch holds far more.
Accumulators = list[Any] | tuple[Any, ...]
SNAPSHOT_FORMAT = 1


class UnreadableSnapshot(ValueError):
    """A snapshot this version cannot read (an older format): rebuild from the bus instead."""


@dataclass(frozen=True, slots=True)
class CellUpdate:
    """The whole current value of one real-time cell (not a delta: applying it twice is safe)."""

    view: str
    slice: int
    bucket: int
    key: tuple[Any, ...]
    values: tuple[Any, ...]  # frozen accumulators, in the view's metric order


class _ViewFold:
    """One view's cells, and its fold with what it reads per event looked up once."""

    __slots__ = ("view", "cells", "dirty", "working", "adders", "metrics", "bucket_ms", "keys")

    def __init__(self, view: View):
        self.view, self.bucket_ms, self.keys = view, view.bucket_ms, view.keys
        self.cells: dict[CellKey, Accumulators] = {}
        self.dirty: set[CellKey] = set()  # changed since the last drain
        self.working: set[CellKey] = set()  # the cells holding working accumulators
        self.metrics = tuple(view.metrics.values())
        self.adders = tuple((i, m.add, m.field) for i, m in enumerate(self.metrics))

    def __call__(self, event: Event, slice_start: int) -> None:
        view = self.view
        if view.where and not view.accepts(event):
            return
        fields, ts = event.fields, event.ts
        # View.bucket_of and View.key_of, inlined: this runs for every event
        cell = (slice_start, ts - ts % self.bucket_ms, tuple([fields.get(k) for k in self.keys]))
        accs = self.cells.get(cell)
        if not isinstance(accs, list):
            accs = self.thawed(cell, accs)
        for i, add, field in self.adders:
            accs[i] = add(accs[i], fields.get(field) if field else None)
        self.dirty.add(cell)

    def thawed(self, cell: CellKey, frozen: tuple[Any, ...] | None) -> list[Any]:
        """A cell's working accumulators, from its frozen ones or zero."""
        values = [m.zero() for m in self.metrics] if frozen is None else frozen
        accs = self.cells[cell] = [m.thaw(v) for m, v in zip(self.metrics, values, strict=True)]
        self.working.add(cell)
        return accs

    def frozen(self, cell: CellKey) -> tuple[Any, ...]:
        accs = self.cells[cell]
        if isinstance(accs, tuple):
            return accs
        return tuple(m.freeze(a) for m, a in zip(self.metrics, accs, strict=True))

    def freeze_below(self, open_slice: int) -> None:
        """Hold the cells of slices before `open_slice` frozen: no event arrives there any
        more (arrivals never decrease), and a working sketch holds many times its frozen
        bytes (a KLL sketch allocates its k items at once)."""
        for cell in [c for c in self.working if c[0] < open_slice]:
            self.cells[cell] = self.frozen(cell)
            self.working.discard(cell)

    def aggregates(self, schema: pa.Schema) -> list[tuple[str, str]]:
        """Per metric (in order), the field it reads and how a group's values of it are
        aggregated: its own Arrow aggregate, else listed for `add_many`; ("", "") for a
        count."""
        return [
            (m.field, m.column_aggregate(str(schema.field(m.field).type)) or "list")
            if m.field else ("", "")
            for m in self.metrics
        ]

    def fold_groups(self, cells: list[CellKey], counts: list[int],
                    values: dict[tuple[str, str], list[Any]],
                    aggregates: list[tuple[str, str]]) -> None:
        """Fold in one group-by's groups: each group's cell, row count, and aggregated
        values per (field, how)."""
        for g, cell in enumerate(cells):
            accs = self.cells.get(cell)
            if not isinstance(accs, list):
                accs = self.thawed(cell, accs)
            for i, (metric, (field, how)) in enumerate(zip(self.metrics, aggregates,
                                                           strict=True)):
                if how == "list":
                    accs[i] = metric.add_many(accs[i], values[field, how][g])
                elif field:
                    accs[i] = metric.add(accs[i], values[field, how][g])
                else:
                    accs[i] = metric.add_many(accs[i], [None] * counts[g])
            self.dirty.add(cell)


def _fold_columns(folds: list[_ViewFold], rows: pa.Table, slices: pa.Array) -> None:
    """Fold many events at once into views of one type with the same keys, bucket and filter:
    `rows` counted events of that type, in order (a table of `event_columns.decode_batch`),
    `slices` their arrival slices. The same cells as folding them one by one: one group-by
    per cell for all these views, then each metric folds its values in order
    (`Monoid.add_many`)."""
    lead = folds[0]
    if lead.view.where:
        rows, slices = _matching(rows, slices, lead.view)
    if rows.num_rows == 0:
        return
    columns = {"__slice": slices, "__bucket": _floor(rows["ts"], lead.bucket_ms)}
    for i, key in enumerate(lead.keys):
        columns[f"__key{i}"] = rows[key]
    aggregates = [fold.aggregates(rows.schema) for fold in folds]
    read = sorted({(field, how) for each in aggregates for field, how in each if field})
    for field, _ in read:
        columns[field] = rows[field]
    columns["__row"] = pa.array(np.arange(rows.num_rows))
    groups = pa.table(columns).group_by(
        ["__slice", "__bucket", *[f"__key{i}" for i in range(len(lead.keys))]],
        use_threads=False,
    ).aggregate([("__row", "count"), *read])
    slice_starts = groups["__slice"].to_pylist()
    buckets = groups["__bucket"].to_pylist()
    keys = list(zip(*[groups[f"__key{i}"].to_pylist() for i in range(len(lead.keys))],
                    strict=True)) if lead.keys else [()] * len(slice_starts)
    cells = list(zip(slice_starts, buckets, keys, strict=True))
    counts = groups["__row_count"].to_pylist()
    values = {(field, how): groups[f"{field}_{how}"].to_pylist() for field, how in read}
    for fold, its_aggregates in zip(folds, aggregates, strict=True):
        fold.fold_groups(cells, counts, values, its_aggregates)


_ARROW_OPERATORS = {
    "==": pc.equal, "!=": pc.not_equal, "<": pc.less, "<=": pc.less_equal, ">": pc.greater,
    ">=": pc.greater_equal,
}


def _floor(column: pa.ChunkedArray, step: int) -> pa.ChunkedArray:
    """`value - value % step` for non-negative int64 values."""
    return pc.multiply(pc.divide(column, step), step)


def _matching(rows: pa.Table, slices: pa.Array, view: View) -> tuple[pa.Table, pa.Array]:
    """The rows a view's filter keeps: every condition holds, a null never matches."""
    keep = None
    for condition in view.where:
        compare = _ARROW_OPERATORS[condition.op]
        holds = compare(rows[condition.field], condition.value).fill_null(False)
        keep = holds if keep is None else pc.and_(keep, holds)
    return rows.filter(keep), pc.filter(slices, keep)


_OPEN_BLOCK = 4_096  # ids held one by one go to a block of at most this many


class _HeldBlock:
    """Ids held for dedup, in the order taken: their arrivals, the set of their type in
    `ViewState._seen` holding each, and the ids; those before `start` are forgotten already.
    Columns rather than a tuple per id: holding a million ids costs a few objects, which the
    garbage collector then does not walk again and again."""

    __slots__ = ("arrivals", "owners", "ids", "start")

    def __init__(self, arrivals: np.ndarray | list[int], owners: list[set[str]],
                 ids: list[str]):
        self.arrivals, self.owners, self.ids, self.start = arrivals, owners, ids, 0

    def kept_from(self, horizon: int) -> int:
        """Where the first id from `start` on that arrived at or after `horizon` is (the
        length when none did)."""
        arrivals, at = self.arrivals, self.start
        if arrivals[at] >= horizon:
            return at
        if isinstance(arrivals, np.ndarray):
            later = np.flatnonzero(arrivals[at:] >= horizon)
            return at + int(later[0]) if len(later) else len(arrivals)
        while at < len(arrivals) and arrivals[at] < horizon:
            at += 1
        return at

    def forget_to(self, end: int) -> int:
        """Forget the ids from `start` up to `end`; the newest arrival among them."""
        for owner, event_id in zip(self.owners[self.start:end], self.ids[self.start:end],
                                   strict=True):
            owner.remove(event_id)
        newest = int(max(self.arrivals[self.start:end]))
        self.start = end
        return newest

    def __len__(self) -> int:
        return len(self.ids)


class _HeldIds:
    """Every id held for dedup, oldest taken first, in blocks."""

    __slots__ = ("blocks", "count", "_open")

    def __init__(self) -> None:
        self.blocks: deque[_HeldBlock] = deque()
        self.count = 0
        self._open: _HeldBlock | None = None  # the block `add` appends to

    def add(self, owner: set[str], event_id: str, arrival: int) -> None:
        block = self._open
        if block is None or len(block) >= _OPEN_BLOCK:
            block = self._open = _HeldBlock([], [], [])
            self.blocks.append(block)
        block.arrivals.append(arrival)  # type: ignore[union-attr]
        block.owners.append(owner)
        block.ids.append(event_id)
        self.count += 1

    def add_block(self, block: _HeldBlock) -> None:
        self.blocks.append(block)
        self._open = None
        self.count += len(block)

    @property
    def oldest(self) -> int | None:
        """The arrival of the oldest id held."""
        if not self.blocks:
            return None
        block = self.blocks[0]
        return int(block.arrivals[block.start])

    def forget_before(self, horizon: int) -> None:
        """Forget the oldest ids while they arrived before `horizon`."""
        while self.blocks:
            block = self.blocks[0]
            end = block.kept_from(horizon)
            if end == block.start:
                return
            self._forget(block, end)
            if end < len(block):
                return

    def forget_oldest(self, n: int) -> int:
        """Forget the `n` oldest ids; the newest arrival among them."""
        newest = 0
        while n > 0:
            block = self.blocks[0]
            end = min(len(block), block.start + n)
            n -= end - block.start
            newest = max(newest, self._forget(block, end))
        return newest

    def _forget(self, block: _HeldBlock, end: int) -> int:
        self.count -= end - block.start
        newest = block.forget_to(end)
        if end == len(block):
            self.blocks.popleft()
            if block is self._open:
                self._open = None
        return newest

    def __iter__(self) -> Iterator[tuple[int, set[str], str]]:
        """(arrival, owner, event id) of every id held, oldest first."""
        for block in self.blocks:
            start = block.start
            arrivals = block.arrivals[start:]
            if isinstance(arrivals, np.ndarray):
                arrivals = arrivals.tolist()
            yield from zip(arrivals, block.owners[start:], block.ids[start:], strict=True)


class ViewState:
    def __init__(
        self, project: Project, slice_ms: int, dedup_window_ms: int,
        max_ids: int = DEDUP_MAX_IDS,
    ):
        self.project, self.slice_ms, self.dedup_window_ms = project, slice_ms, dedup_window_ms
        self.max_ids = max_ids
        self.forgotten_early = 0  # ids forgotten inside the window, to stay within max_ids
        self._forgotten_upto = 0  # the newest arrival among them
        self.cut = 0  # slices below it are dropped: the lowest cut of a kept batch version
        self._views = {name: _ViewFold(view) for name, view in project.views.items()}
        self.cells: dict[str, dict[CellKey, Accumulators]] = {
            name: fold.cells for name, fold in self._views.items()
        }
        self._folds: dict[str, list[_ViewFold]] = {}
        # per event type: its views, those with the same keys, bucket and filter together
        self._shared: dict[str, list[list[_ViewFold]]] = {}
        alike: dict[tuple[Any, ...], list[_ViewFold]] = {}
        for fold in self._views.values():
            view = fold.view
            self._folds.setdefault(view.event_type, []).append(fold)
            same = (view.event_type, view.keys, view.bucket_ms, repr(view.where))
            if same not in alike:
                alike[same] = []
                self._shared.setdefault(view.event_type, []).append(alike[same])
            alike[same].append(fold)
        # per event type: the columns its views read, all a batch's fold takes along
        self._columns = {
            event_type: sorted({ARRIVAL, "ts"}.union(*(f.view.fields_read() for f in folds)))
            for event_type, folds in self._folds.items()
        }
        # event type -> the event ids held, for dedup (their arrivals are in `_held`); one set
        # per type, so a held id costs no more than with one set of all ids
        self._seen: dict[str, set[str]] = {}
        self._held = _HeldIds()
        self._newest = 0

    def apply(self, event: Event, arrival: int) -> bool:
        """Fold one event in; False when it is a duplicate or covered by every kept batch."""
        if self._duplicate(event.type, event.event_id, arrival) or arrival < self.cut:
            return False
        slice_start = arrival - arrival % self.slice_ms
        for fold in self._folds.get(event.type, ()):
            fold(event, slice_start)
        return True

    def apply_all(self, records: Iterable[tuple[Event, int]]) -> int:
        return sum(self.apply(event, arrival) for event, arrival in records)

    def apply_batch(
        self, events: pa.Table, named: tuple[list[str], list[str]] | None = None
    ) -> np.ndarray:
        """Fold a batch of valid events in at once (a table of `event_columns.decode_batch`,
        with each event's arrival), to exactly the state `apply` leaves folding them in order.
        Which were counted: False for a duplicate or one the batch covers already.
        `named`: the events' types and ids as lists, when the caller has them already."""
        kinds, ids = named or (events["type"].to_pylist(), events["event_id"].to_pylist())
        arrivals = events[ARRIVAL].to_numpy()
        if self._forgets_nothing(arrivals):
            counted = self._hold_batch(kinds, ids, arrivals)
        else:
            cut, duplicate = self.cut, self._duplicate
            counted = np.array([
                not duplicate(kind, event_id, arrival) and arrival >= cut
                for kind, event_id, arrival in zip(kinds, ids, arrivals.tolist(), strict=True)
            ], bool)
        if not counted.any():
            return counted
        fresh = pa.array(counted)
        for event_type, shared in self._shared.items():
            taken = pc.and_(fresh, pc.equal(events["type"], event_type))
            rows = events.select(self._columns[event_type]).filter(taken)
            slices = _floor(rows[ARRIVAL], self.slice_ms)
            for folds in shared:
                _fold_columns(folds, rows, slices)
        return counted

    def _forgets_nothing(self, arrivals: np.ndarray) -> bool:
        """Whether `_duplicate` would forget no id while taking these arrivals: neither the
        window nor the cap moves past an id held or taken among them."""
        if not len(arrivals) or self._held.count + len(arrivals) > self.max_ids:
            return False
        horizon = max(self._newest, int(arrivals.max())) - self.dedup_window_ms
        oldest, least = self._held.oldest, int(arrivals.min())
        return min(least if oldest is None else oldest, least) >= horizon

    def _hold_batch(self, kinds: list[str], ids: list[str], arrivals: np.ndarray) -> np.ndarray:
        """`_duplicate` for each record in order, when it forgets nothing meanwhile: only the
        set look-up and insertion per record, the window and cap left alone; which were
        counted (neither a duplicate nor below the cut)."""
        owners = {kind: self._seen.setdefault(kind, set()) for kind in set(kinds)}
        taken: list[int] = []  # where each id new to its type first is
        for at, kind, event_id in zip(range(len(ids)), kinds, ids, strict=True):
            owner = owners[kind]
            if event_id not in owner:
                owner.add(event_id)
                taken.append(at)
        if len(taken) == len(ids):  # no retry: every record is held, in order
            counted = arrivals >= self.cut
        else:
            counted = np.zeros(len(ids), bool)
            if not taken:
                return counted
            kinds, ids, arrivals = [kinds[i] for i in taken], [ids[i] for i in taken], \
                arrivals[taken]
            counted[taken] = arrivals >= self.cut
        self._held.add_block(_HeldBlock(arrivals, list(map(owners.__getitem__, kinds)), ids))
        self._newest = max(self._newest, int(arrivals.max()))
        return counted

    def _duplicate(self, event_type: str, event_id: str, arrival: int) -> bool:
        ids = self._seen.get(event_type)
        if ids is None:
            ids = self._seen[event_type] = set()
        elif event_id in ids:
            return True
        ids.add(event_id)
        self._held.add(ids, event_id, arrival)
        if arrival > self._newest:
            self._newest = arrival
            self._held.forget_before(arrival - self.dedup_window_ms)
        if self._held.count > self.max_ids:
            self._forget_oldest()
        return False

    def _forget_oldest(self) -> None:
        over = self._held.count - self.max_ids
        if over > 0:
            newest = self._held.forget_oldest(over)
            self.forgotten_early += over
            self._forgotten_upto = max(self._forgotten_upto, newest)

    @property
    def dedup_horizon(self) -> int:
        """Ids that arrived before this are no longer held (the window, or the cap)."""
        return max(self._newest - self.dedup_window_ms, self._forgotten_upto)

    def drop_below(self, cut: int) -> None:
        """Drop the slices below `cut`: the lowest cut of a kept batch version (the floor),
        never the serving one's, or a rollback would miss the slices between the two."""
        if cut <= self.cut:
            return
        self.cut = cut
        for fold in self._views.values():
            for cell in [c for c in fold.cells if c[0] < cut]:
                del fold.cells[cell]
                fold.dirty.discard(cell)
                fold.working.discard(cell)

    def drain(self) -> list[CellUpdate]:
        """Updates for every cell changed since the last drain; the cells of closed slices
        are held frozen from then on."""
        open_slice = self._newest - self._newest % self.slice_ms
        updates = []
        for name, fold in self._views.items():
            fold.freeze_below(open_slice)
            updates += [self._update(name, cell) for cell in fold.dirty]
            fold.dirty.clear()
        return updates

    def everything(self) -> list[CellUpdate]:
        return [self._update(name, cell) for name, cells in self.cells.items() for cell in cells]

    def _update(self, name: str, cell: CellKey) -> CellUpdate:
        return CellUpdate(name, cell[0], cell[1], cell[2], self._views[name].frozen(cell))

    @property
    def tracked_ids(self) -> int:
        return self._held.count

    def held_ids(self) -> list[tuple[str, str, int]]:
        """(event type, event id, arrival) of every id held, oldest first."""
        type_of = {id(ids): event_type for event_type, ids in self._seen.items()}
        return [(type_of[id(ids)], event_id, arrival) for arrival, ids, event_id in self._held]

    def hold_all(self, held: Iterable[Sequence[Any]]) -> None:
        """Hold these ids instead, oldest first: (event type, event id, arrival), or
        (event id, arrival) as held before dedup was by type: such an id is held for every
        type, the old rule, until it leaves the window."""
        self._seen, self._held = {}, _HeldIds()
        every_type = list(self.project.schemas)
        for entry in held:
            *event_types, event_id, arrival = entry
            for event_type in event_types or every_type:
                ids = self._seen.setdefault(event_type, set())
                if event_id not in ids:
                    ids.add(event_id)
                    self._held.add(ids, event_id, arrival)
        self._forget_oldest()  # the cap may be lower than when the ids were written

    def for_views(self, names: Iterable[str], cut: int) -> ViewState:
        """An empty state like this one for only the views named, folding arrivals >= `cut`:
        to rebuild them from the bus, then `adopt` them."""
        state = ViewState(self.project.only(names), self.slice_ms, self.dedup_window_ms,
                          self.max_ids)
        state.cut = cut
        return state

    def adopt(self, rebuilt: ViewState) -> None:
        """Hold the cells of `rebuilt`'s views instead of this state's, all to be published."""
        for name, cells in rebuilt.cells.items():
            fold = self._views[name]
            fold.cells.clear()
            fold.cells.update(cells)
            fold.dirty.clear()
            fold.dirty.update(cells)
            fold.working.clear()
            fold.working.update(rebuilt._views[name].working)

    def snapshot(self) -> bytes:
        """Versioned JSON: the cut, the ids held, each view's fingerprint and cells (every
        accumulator as its kind encodes it for the wire)."""
        views = {
            name: {"fingerprint": self.project.fingerprints[name],
                   "cells": [self._saved(name, cell) for cell in fold.cells]}
            for name, fold in self._views.items()
        }
        return orjson.dumps({"format": SNAPSHOT_FORMAT, "cut": self.cut, "newest": self._newest,
                             "views": views, "held": self.held_ids()})

    def restore(self, data: bytes) -> set[str]:
        """Restore a `snapshot`; the views it does not hold as defined now (to rebuild).
        Raises `UnreadableSnapshot` for anything but this format."""
        try:
            saved = orjson.loads(data)
        except orjson.JSONDecodeError:
            saved = None
        if not isinstance(saved, dict) or saved.get("format") != SNAPSHOT_FORMAT:
            raise UnreadableSnapshot("the speed state was saved in an older format")
        fingerprints = self.project.fingerprints
        kept = {name: view for name, view in saved["views"].items()
                if fingerprints.get(name) == view["fingerprint"]}
        cells = [
            CellUpdate(name, s, b, tuple(key), _decoded(self._views[name].metrics, values))
            for name, view in kept.items() for s, b, key, values in view["cells"]
        ]
        self.load(saved["cut"], saved["newest"], cells, saved["held"])
        return set(self.project.views) - set(kept)

    def load(
        self, cut: int, newest: int, cells: Iterable[CellUpdate], held: Iterable[Sequence[Any]]
    ) -> None:
        """Hold these cells (of views of the project) and ids, as a restored state."""
        self.cut, self._newest = cut, newest
        self.hold_all(held)
        for fold in self._views.values():
            fold.dirty.clear()
        for u in cells:  # frozen, thawed if an event comes to them
            self.cells[u.view][(u.slice, u.bucket, u.key)] = u.values

    def _saved(self, name: str, cell: CellKey) -> list[Any]:
        u = self._update(name, cell)
        values = [m.encode(v) for m, v in zip(self._views[name].metrics, u.values, strict=True)]
        return [u.slice, u.bucket, u.key, values]


def _decoded(metrics: Iterable[Monoid], values: Iterable[Any]) -> tuple[Any, ...]:
    return tuple(m.decode(v) for m, v in zip(metrics, values, strict=True))
