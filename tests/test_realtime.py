"""The serving side's real-time cells as Arrow tables: built once per change, never stale."""

from __future__ import annotations

from lambdalake.example import project
from lambdalake.realtime import RealtimeCells
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
