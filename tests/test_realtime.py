"""The serving side's real-time cells as Arrow tables: built once per change, never stale."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from lambdalake.example import project
from lambdalake.realtime import RealtimeCells, decode_update, encode_update
from lambdalake.tables import table_schema
from lambdalake.viewstate import CellUpdate

PAGEVIEWS = project.views["pageviews_by_url_hour"]
REVENUE = project.views["revenue_by_sku_day"]
SCHEMA = table_schema(project, PAGEVIEWS)
HOUR = 3_600_000


def pageviews(slice_start: int, url: str, count: int) -> CellUpdate:
    visitors = PAGEVIEWS.metrics["visitors"].lift("u1")
    return CellUpdate(PAGEVIEWS.name, slice_start, slice_start // HOUR * HOUR, (url,),
                      (count, visitors))


def counts(cells: RealtimeCells, cut: int = 0) -> dict[str, int]:
    table = cells.table(PAGEVIEWS, SCHEMA, cut)
    return dict(zip(table.column("url").to_pylist(), table.column("pageviews").to_pylist(),
                    strict=True))


def test_the_table_is_built_once_until_its_cells_change() -> None:
    cells = RealtimeCells(project)
    cells.upsert([pageviews(1_000, "/a", 1), pageviews(2_000, "/b", 2)])
    first = cells.table(PAGEVIEWS, SCHEMA, 0)
    assert cells.table(PAGEVIEWS, SCHEMA, 0) is first  # queries share it
    cells.upsert([CellUpdate(REVENUE.name, 1_000, 0, ("A",), (5.0, 1))])
    assert cells.table(PAGEVIEWS, SCHEMA, 0) is first  # another view's change keeps it


def test_the_table_follows_every_upsert_and_drop() -> None:
    cells = RealtimeCells(project)
    cells.upsert([pageviews(1_000, "/a", 1), pageviews(2_000, "/b", 2)])
    assert counts(cells) == {"/a": 1, "/b": 2}
    cells.upsert([pageviews(2_000, "/b", 7), pageviews(3_000, "/c", 3)])
    assert counts(cells) == {"/a": 1, "/b": 7, "/c": 3}
    assert counts(cells, cut=2_000) == {"/b": 7, "/c": 3}
    cells.drop_below(3_000)
    assert counts(cells) == {"/c": 3}


# what a sum holds: ints past 64 bits, floats past finite (a float sum may overflow), decimals;
# a key also text of any code point (a lone surrogate too)
sums = st.integers() | st.floats() | st.decimals(allow_nan=False, allow_infinity=False)


@given(key=st.lists(st.text() | st.integers() | st.floats() | st.booleans() | st.none(),
                    max_size=3),
       total=sums, orders=st.integers(0, 2**63 - 1), slice_start=st.integers(0, 2**62))
def test_an_update_reads_back_as_it_was_written(
    key: list[object], total: object, orders: int, slice_start: int
) -> None:
    """Every value a cell may hold survives the realtime topic's JSON (written with orjson
    where it writes it as the stdlib reads it back: not a non-finite float, nor an int past
    64 bits, nor a lone surrogate)."""
    update = CellUpdate(REVENUE.name, slice_start, slice_start // HOUR * HOUR, tuple(key),
                        (total, orders))
    read = decode_update(encode_update(update, project), project)
    assert read is not None
    assert same(read.key, update.key) and same(read.values, update.values)
    assert (read.view, read.slice, read.bucket) == (update.view, update.slice, update.bucket)


def same(read: tuple[object, ...], written: tuple[object, ...]) -> bool:
    """Equal and of the same type (a decimal as a decimal, -0.0 as -0.0), NaN to NaN."""
    return len(read) == len(written) and all(
        type(r) is type(w) and (same_float(r, w) if isinstance(w, float) else r == w)
        for r, w in zip(read, written, strict=True))


def same_float(read: float, written: float) -> bool:
    if math.isnan(written):
        return math.isnan(read)  # JSON has one NaN
    return read == written and math.copysign(1, read) == math.copysign(1, written)
