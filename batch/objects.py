"""Master objects opened as Parquet fragments, a corrupt object told apart from a failed read.

pyarrow reports garbled data and a failed network read alike (OSError), and only corruption
may be skipped: after a failed read the bytes are fetched through the store (its own
retries; its errors propagate) and parsed again; only if they still fail is the object
`CorruptObject`. A missing object is not corrupt: `FileNotFoundError` propagates.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import pyarrow as pa
import pyarrow.dataset as ds

from lambdalake.batch.engine import CorruptObject
from lambdalake.storage import ObjectStore

T = TypeVar("T")
PARQUET = ds.ParquetFileFormat()
_READERS = 16  # objects read at once: on S3 each read is mostly waiting for the network


class ObjectReader:
    def __init__(self, store: ObjectStore):
        self.store = store
        self.filesystem, self.root = store.arrow()

    def read(self, key: str, scan: Callable[[ds.ParquetFileFragment], T]) -> T:
        """`scan` of the object `key`; `CorruptObject` if it is not readable Parquet."""
        try:
            return scan(PARQUET.make_fragment(f"{self.root}/{key}", filesystem=self.filesystem))
        except FileNotFoundError:
            raise
        except (pa.ArrowException, OSError):
            data = self.store.get(key)
        try:
            return scan(PARQUET.make_fragment(pa.BufferReader(data)))
        except (pa.ArrowException, OSError) as exc:
            raise CorruptObject(key, str(exc)) from exc


def read_all(
    store: ObjectStore, keys: list[str], scan: Callable[[ds.ParquetFileFragment], T]
) -> list[T]:
    """`scan` of every object in `keys`, many at once; the first corrupt one raises."""
    reader = ObjectReader(store)
    with ThreadPoolExecutor(_READERS) as pool:
        return list(pool.map(lambda key: reader.read(key, scan), keys))
