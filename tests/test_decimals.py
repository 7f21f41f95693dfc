"""Money is exact and schemas evolve: decimal sums in the DuckDB engine against a Python
Decimal recompute, master objects written with an older schema read with today's (cast,
renamed, null-filled), and a change old data cannot be read with refused at start-up."""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal

import pytest

from lambdalake import master
from lambdalake.batch.duckdb_engine import DuckDBEngine
from lambdalake.events import Event, EventSchema
from lambdalake.evolution import SchemaChangeRefused
from lambdalake.master import Archived
from lambdalake.monoids import Count, Max, Min, Sum
from lambdalake.project import Project
from lambdalake.storage import FileStore
from lambdalake.views import View

DAY = 86_400_000
AMOUNTS = ["0.10", "0.20", "101.93", "101.93", "19.99", "2.675"]


def project_of(fields: dict[str, str], aliases: dict[str, str] | None = None) -> Project:
    schema = EventSchema("purchase", fields, aliases or {})
    metrics = {"revenue": Sum("amount"), "low": Min("amount"), "high": Max("amount"),
               "orders": Count()}
    if "coupon" in fields:
        metrics["coupons"] = Count()
    key = "sku" if "sku" in fields else "product"
    view = View("revenue_by_sku_day", "purchase", (key,), "day", metrics)
    return Project.of([schema], [view])


def archive(store: FileStore, project: Project, values: list, first: int, name: str = "sku"):
    rows = [Archived(Event(f"e{first + i}", "purchase", 1_000, {name: "s", "amount": v}),
                     0, first + i, 10 + first + i) for i, v in enumerate(values)]
    master.write_batch(store, project.schemas, 0, rows)


def answer(store: FileStore, project: Project) -> dict:
    keys = master.data_keys(store, "purchase")
    table = DuckDBEngine().compute(project, project.views["revenue_by_sku_day"], store, keys,
                                   10**9)
    [row] = table.to_pylist()
    return row


def test_a_decimal_sum_is_exact_in_the_duckdb_engine(tmp_path):
    store = FileStore(tmp_path)
    project = project_of({"sku": "string", "amount": "decimal(18,3)"})
    archive(store, project, [Decimal(a) for a in AMOUNTS], 0)
    row = answer(store, project)
    assert row["revenue"] == sum(Decimal(a) for a in AMOUNTS) == Decimal("226.825")
    assert (row["low"], row["high"]) == (Decimal("0.10"), Decimal("101.93"))


def test_float_master_data_is_read_as_decimal_with_a_cast(tmp_path):
    """The example's migration: `amount` was float64; old objects read as decimal(18,2),
    each value the nearest at the scale (ties to even), new ones exactly."""
    store = FileStore(tmp_path)
    before = project_of({"sku": "string", "amount": "float"})
    archive(store, before, [float(a) for a in AMOUNTS], 0)
    after = project_of({"sku": "string", "amount": "decimal(18,2)"})
    master.check_schemas(store, after)  # a readable change
    archive(store, after, [Decimal("203.86")], 100)
    cent = Decimal("0.01")
    cast = [Decimal(float(a)).quantize(cent, ROUND_HALF_EVEN) for a in AMOUNTS]
    assert answer(store, after)["revenue"] == sum(cast) + Decimal("203.86")


@pytest.mark.parametrize(("old", "new", "values", "expect"), [
    ("int", "float", [3, 4], 7.0),
    ("int", "decimal(21,2)", [3, 4], Decimal("7.00")),
    ("decimal(10,2)", "decimal(20,4)", [Decimal("1.25"), Decimal("2.50")], Decimal("3.75")),
])
def test_a_widened_type_reads_old_objects(tmp_path, old, new, values, expect):
    store = FileStore(tmp_path)
    archive(store, project_of({"sku": "string", "amount": old}), values, 0)
    after = project_of({"sku": "string", "amount": new})
    master.check_schemas(store, after)
    assert answer(store, after)["revenue"] == expect


def test_an_added_optional_field_and_a_renamed_one_read_old_objects(tmp_path):
    store = FileStore(tmp_path)
    archive(store, project_of({"product": "string", "amount": "int"}), [5], 0, name="product")
    after = project_of({"sku": "string", "amount": "int", "coupon": "string?"},
                       aliases={"product": "sku"})
    master.check_schemas(store, after)
    archive(store, after, [6], 100)
    row = answer(store, after)
    assert (row["sku"], row["revenue"], row["orders"]) == ("s", 11, 2)


@pytest.mark.parametrize(("old", "new"), [
    ("float", "int"), ("decimal(18,2)", "decimal(18,1)"), ("int", "decimal(18,2)"),
    ("decimal(18,2)", "float"),
])
def test_a_narrowing_is_refused_naming_the_view_and_the_field(tmp_path, old, new):
    store = FileStore(tmp_path)
    archive(store, project_of({"sku": "string", "amount": old}),
            [Decimal("1.5") if "decimal" in old else 1], 0)
    with pytest.raises(SchemaChangeRefused) as refused:
        master.check_schemas(store, project_of({"sku": "string", "amount": new}))
    message = str(refused.value)
    assert "\n" not in message
    assert "view revenue_by_sku_day reads purchase.amount" in message and old in message


def test_a_new_required_field_is_refused(tmp_path):
    store = FileStore(tmp_path)
    archive(store, project_of({"sku": "string", "amount": "int"}), [1], 0)
    with pytest.raises(SchemaChangeRefused, match="purchase.coupon, a new required field"):
        master.check_schemas(store, project_of({"sku": "string", "amount": "int",
                                                "coupon": "string"}))
