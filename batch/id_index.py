"""The event id index kept by the batch: per master object, the 64-bit hashes of its ids.

An incremental run checks the delta's event ids against every older copy (the dedup is over
all of history). Decoding the `event_id` strings of every master object for that took most
of the run; the index holds each object's ids as 8-byte hashes instead, one entry a master
object, under `views/_ids/h<hash>/<object key>.u64` (raw little-endian uint64).

It is exact because a hash only proposes: the objects holding a hash of a delta id are then
read for their real ids (`batch.incremental.counted_before`), so a collision costs a read and
never an answer. Nothing that would miss an id is possible either: a master object is written
once under its key (the archiver names it by its offsets, a compaction or an erasure writes
new keys, `lambdalake.rewrite`), so an entry stays true for its object; an object with no
entry gets one built from its ids; a rollback changes no object. Entries whose object is gone
(compacted, erased) are deleted by the next incremental run. The hash is DuckDB's `hash()`,
so the folder names DuckDB's version: another version may hash otherwise and starts afresh.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import duckdb
import numpy as np
import pyarrow as pa

from lambdalake import catalog, master
from lambdalake.batch.objects import READERS, ObjectReader
from lambdalake.storage import NotFound, ObjectStore

INDEX = f"{catalog.PREFIX}/_ids/h{duckdb.__version__}"
_DATABASE = duckdb.connect()  # opening one takes ~0.1 s; each hashing gets a cursor


def entry_key(object_key: str) -> str:
    return f"{INDEX}/{object_key}.u64"


def hash_ids(ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The 64-bit hash of each id."""
    with _DATABASE.cursor() as con:
        con.register("ids", pa.table({"id": ids}))
        hashed = con.sql("SELECT hash(id) AS h FROM ids").to_arrow_table()
    return hashed["h"].to_numpy()


class HashLookup:
    """Hashes to look for in many arrays of hashes. A byte table indexed by a hash's top bits
    rules out all but a few percent of the hashes looked at, in one array gather (a hash
    set's probe per hash was most of an incremental run's CPU at 10M events of history);
    only those it lets through are looked up exactly, by binary search."""

    def __init__(self, wanted: np.ndarray):
        bits = int(np.clip(np.ceil(np.log2(max(len(wanted), 1) * 32)), 16, 26))
        self._shift = np.uint64(64 - bits)
        self._table = np.zeros(1 << bits, np.bool_)
        self._table[wanted >> self._shift] = True
        self._sorted = np.sort(wanted)

    def holds_any(self, hashes: np.ndarray) -> bool:
        """Whether one of `hashes` is wanted."""
        maybe = hashes[self._table[hashes >> self._shift]]
        if not len(maybe):
            return False
        at = np.minimum(np.searchsorted(self._sorted, maybe), len(self._sorted) - 1)
        return bool(np.any(self._sorted[at] == maybe))


def object_hashes(store: ObjectStore, keys: list[str]) -> list[np.ndarray]:
    """The id hashes of each master object in `keys`, from its entry, built where missing.
    Raises `CorruptObject` for an object that has no entry and is not readable Parquet."""
    reader = ObjectReader(store)

    def hashes(key: str) -> np.ndarray:
        try:
            return np.frombuffer(store.get(entry_key(key)), np.uint64)
        except NotFound:
            ids = reader.read(key, lambda part: part.to_table(columns=["event_id"]))
            built = hash_ids(ids["event_id"])
            store.put(entry_key(key), built.tobytes())
            return built

    with ThreadPoolExecutor(READERS) as pool:
        return list(pool.map(hashes, keys))


def prune(store: ObjectStore, event_type: str, keys: list[str]) -> None:
    """Delete the type's entries whose object is not in `keys` (compacted, erased away)."""
    kept = {entry_key(key) for key in keys}
    for key in store.list(f"{INDEX}/{master.type_prefix(event_type)}"):
        if key not in kept:
            store.delete(key)
