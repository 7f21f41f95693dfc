"""Rewriting master objects without atomic rename: compaction and erasure share it.

A rewrite replaces some master objects by others (fewer and larger ones, or the same less
some rows) in three steps, each of them safe to be the last one done:

1. stage: write the new objects under names no reader lists (`….rw-<rewrite id>-<n>.parquet`
   is visible only while a marker names it);
2. commit: write the marker `master/_rewrites/<rewrite id>.json` listing what it replaces
   and what it writes: from then on readers see the new objects and not the replaced ones;
3. finish: delete the replaced objects.

`master.data_keys` is the one place objects are listed; it lists the objects first, then the
markers, and applies them (`visible`): a marker it sees names objects that exist (they were
written before it), a marker it misses was written after the listing, so the replaced objects
were still listed. Readers therefore see the old objects or the new ones, never both, never
neither. A rewrite runs under the batch lease, so no batch run reads the objects it deletes.

`recover` (run first by every rewrite, under the lease) finishes what a killed one left:
it deletes the replaced objects of every marker, the staged objects no marker names (a
rewrite killed before its commit), and the markers with nothing left to say.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lambdalake.master import PREFIX, STAGED, Marker, is_staged, markers, to_parquet
from lambdalake.storage import ObjectStore


def read_table(store: ObjectStore, key: str) -> pa.Table:
    return pq.read_table(pa.BufferReader(store.get(key)))


@dataclass
class Rewrite:
    """One rewrite: `stage` its new objects, then `commit`, then `finish`."""

    store: ObjectStore
    kind: str
    id: str = field(default_factory=lambda: _new_id())
    replaces: list[str] = field(default_factory=list)
    writes: list[str] = field(default_factory=list)

    def stage(self, replaced: list[str], table: pa.Table, folder: str) -> None:
        """`table` (may be empty: nothing written) in place of the objects `replaced`."""
        self.replaces += replaced
        if not table.num_rows:
            return
        low, high = pc.min_max(table["offset"]).values()
        key = f"{folder}/{low.as_py():020d}-{high.as_py():020d}{STAGED}{self.id}-" \
              f"{len(self.writes)}.parquet"
        self.store.put(key, to_parquet(table))
        self.writes.append(key)

    def commit(self) -> Marker | None:
        """The switch: from now on readers see the new objects. None when nothing changed."""
        if not self.replaces:
            return None
        marker = Marker(self.id, self.kind, tuple(self.replaces), tuple(self.writes))
        self.store.put(marker.key, marker.to_json())
        return marker

    def finish(self, marker: Marker | None) -> None:
        if marker is not None:
            for key in marker.replaces:
                self.store.delete(key)


def recover(store: ObjectStore) -> dict[str, int]:
    """Finish every committed rewrite and clear what killed ones left; call it under the
    batch lease, which every rewrite holds. Returns what was deleted, by kind."""
    listed = store.list(f"{PREFIX}/type=")
    committed = markers(store)
    named = {key for marker in committed for key in marker.writes}
    orphans = [key for key in listed if is_staged(key) and key not in named]
    existing = set(listed)
    leftovers = [key for m in committed for key in m.replaces if key in existing]
    for key in orphans + leftovers:
        store.delete(key)
    remaining = existing - set(orphans) - set(leftovers)
    spent = [m for m in committed if not remaining.intersection(m.writes)]
    for marker in spent:
        store.delete(marker.key)
    return {"orphans": len(orphans), "replaced": len(leftovers), "markers": len(spent)}


def _new_id() -> str:
    return f"{datetime.now(UTC):%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:8]}"
