"""Master objects opened as Parquet fragments, a corrupt object told apart from a failed read,
and read with today's schema of their event type.

Schema evolution is resolved here, for every engine: an object keeps the columns its event
type had when it was written, and `read_rows` turns them into today's (`adapt`): a field
renamed through an alias is read from its old column, a widened one is cast (int to float;
int or float to decimal: a float64 to the nearest value at the decimal's scale, ties to
even, which recovers any amount written with at most that many decimals), and a field added
since reads as null. `lambdalake.evolution` refuses at start-up the changes this cannot read.

pyarrow reports garbled data and a failed network read alike (OSError), and only corruption
may be skipped: after a failed read the bytes are fetched through the store (its own
retries; its errors propagate) and parsed again; only if they still fail is the object
`CorruptObject`. A missing object is not corrupt: `FileNotFoundError` propagates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from lambdalake.batch.engine import CorruptObject
from lambdalake.events import EventSchema
from lambdalake.master import arrow_schema
from lambdalake.storage import ObjectStore

T = TypeVar("T")
PARQUET = ds.ParquetFileFormat()
READERS = 16  # objects read at once: on S3 each read is mostly waiting for the network


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
    with ThreadPoolExecutor(READERS) as pool:
        return list(pool.map(lambda key: reader.read(key, scan), keys))


def read_rows(
    store: ObjectStore,
    keys: list[str],
    schema: EventSchema,
    columns: Sequence[str] | None = None,
    where: ds.Expression | None = None,
) -> pa.Table:
    """The rows of every object in `keys` matching `where`, in `columns` (default all) of the
    event type's schema today, whatever schema each object was written with."""
    target = arrow_schema(schema)
    if columns is not None:
        target = pa.schema([target.field(name) for name in columns])
    parts = read_all(store, keys, lambda part: adapt(_scan(part, target, schema, where),
                                                     target, schema))
    return pa.concat_tables([target.empty_table(), *parts])


def _scan(
    part: ds.ParquetFileFragment, target: pa.Schema, schema: EventSchema,
    where: ds.Expression | None,
) -> pa.Table:
    written = part.physical_schema.names
    wanted = [source for field in target if (source := _source(field.name, written, schema))]
    return part.to_table(columns=wanted, filter=where)


def _source(name: str, written: Sequence[str], schema: EventSchema) -> str | None:
    """The column of an object that holds the field `name`: its own, or its old name's."""
    for candidate in (name, *reversed(schema.old_names(name) if name in schema.fields else [])):
        if candidate in written:
            return candidate
    return None


def adapt(table: pa.Table, target: pa.Schema, schema: EventSchema) -> pa.Table:
    """`table`, read from one object, as the columns of `target`."""
    if table.schema.remove_metadata() == target:
        return table
    columns = []
    for field in target:
        source = _source(field.name, table.column_names, schema)
        if source is None:
            columns.append(pa.nulls(table.num_rows, field.type))
        else:
            columns.append(pc.cast(table[source], field.type))
    return pa.Table.from_arrays(columns, schema=target)


def written_schema(fragment: ds.ParquetFileFragment) -> pa.Schema:
    """The columns an object was written with (its Parquet footer, read whole)."""
    fragment.ensure_complete_metadata()
    return fragment.physical_schema.remove_metadata()
