"""The serving API over real HTTP: batch(cut C) ⊕ real-time cells ≥ C, checked against a
recompute from the raw events.

Each test runs uvicorn in a thread on a free 127.0.0.1 port over a temporary FileStore. Batch
versions are published by hand with the catalog functions: Parquet in `table_schema` shape,
aggregated here independently of the kernel's view state (sketches with the monoid's
lift/merge), split over two files so the same cell arrives in parts. Real-time cells come
from the kernel's ViewState fed the same events with their arrival times.
"""

from __future__ import annotations

import ipaddress
import itertools
import random
import re
import ssl
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import boto3
import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from exact import exact_quantiles
from hypothesis import given, settings
from hypothesis import strategies as st

from lambdalake import catalog
from lambdalake.batch.run import prune_versions, rollback
from lambdalake.eventlog import now_ms
from lambdalake.events import Event, epoch_ms, iso
from lambdalake.example import project
from lambdalake.query import parse
from lambdalake.realtime import RealtimeCells, Sliced
from lambdalake.serving.batch_views import BatchViews
from lambdalake.serving.query import DuckDB, view_page
from lambdalake.serving.server import ServerThread, build_server
from lambdalake.settings import Settings
from lambdalake.storage import FileStore, ObjectStore, S3Store
from lambdalake.tables import table_schema
from lambdalake.views import View
from lambdalake.viewstate import ViewState

MINUTE, HOUR, DAY = 60_000, 3_600_000, 86_400_000
T0 = epoch_ms("2026-11-23T00:00:00Z")
CUT_1 = T0 + 10 * HOUR
CUT_2 = CUT_1 + 5 * MINUTE
URLS = ["/home", "/pricing", "/docs"]
SKUS = ["A", "B", "C"]
PAGEVIEWS = project.views["pageviews_by_url_hour"]
REVENUE = project.views["revenue_by_sku_day"]
Record = tuple[Event, int]  # an event and its arrival time


# --- the world: events, batch versions, real-time cells ----------------------------------


def pageview(number: int, url: str, user: str, ts: int) -> Event:
    fields = {"url": url, "user_id": user, "referrer": None, "duration_ms": None}
    return Event(f"pv-{number}", "pageview", ts, fields)


def purchase(number: int, sku: str, amount: Decimal, ts: int) -> Event:
    return Event(f"buy-{number}", "purchase", ts, {"user_id": "u1", "sku": sku, "amount": amount})


def web_traffic(seed: int = 7) -> list[Record]:
    """Late events of the day's first ten hours, arriving within ten minutes of CUT_1."""
    rng = random.Random(seed)
    records = []
    for number in range(300):
        url = rng.choices(URLS, weights=[6, 3, 1])[0]
        ts = T0 + rng.randrange(10 * HOUR)
        event = pageview(number, url, f"u{rng.randrange(40)}", ts)
        records.append((event, CUT_1 - 10 * MINUTE + rng.randrange(20 * MINUTE)))
    for number in range(40):
        ts = T0 - DAY + rng.randrange(2 * DAY)
        event = purchase(number, rng.choice(SKUS), Decimal(rng.randrange(1, 40_000)) / 100, ts)
        records.append((event, CUT_1 - 10 * MINUTE + rng.randrange(20 * MINUTE)))
    return records


def batch_rows(view: View, events: list[Event]) -> pa.Table:
    """A batch view's rows, aggregated with the metrics' lift and merge."""
    cells: dict[tuple, list[Any]] = {}
    metrics = list(view.metrics.values())
    for event in filter(view.accepts, events):
        accs = cells.setdefault((view.bucket_of(event.ts), *view.key_of(event)),
                                [m.zero() for m in metrics])
        for i, m in enumerate(metrics):
            accs[i] = m.merge(accs[i], m.lift(event.fields.get(m.field) if m.field else None))
    names = ["bucket", *view.keys, *view.metrics]
    rows = [dict(zip(names, (*cell, *accs), strict=True)) for cell, accs in cells.items()]
    return pa.Table.from_pylist(rows, schema=table_schema(project, view))


def parquet(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def publish(store: ObjectStore, version: str, cut: int, records: list[Record]) -> None:
    """A batch version over the events that arrived before `cut`, in two Parquet parts."""
    covered = [event for event, arrival in records if arrival < cut]
    halves = [covered[: len(covered) // 2], covered[len(covered) // 2 :]]
    views = {}
    for view in project.views.values():
        keys = [catalog.data_key(view.name, version, part) for part in range(2)]
        for key, half in zip(keys, halves, strict=True):
            store.put(key, parquet(batch_rows(view, half)))
        views[view.name] = catalog.ViewFiles(files=keys, rows=len(covered))
    manifest = catalog.Manifest(version=version, cut=cut, created=iso(now_ms()),
                                engine="test", rows_read=len(covered), views=views,
                                fingerprints=project.fingerprints)
    catalog.write_manifest(store, manifest)
    catalog.publish(store, version)


def speed_layer(records: list[Record]) -> ViewState:
    state = ViewState(project, MINUTE, DAY)
    state.apply_all(sorted(records, key=lambda record: record[1]))
    return state


# --- the independent recompute -------------------------------------------------------------


def expected_pageviews(
    records: list[Record],
    width: int | None,
    by_url: bool = True,
    url: str | None = None,
    start: int | None = None,
    end: int | None = None,
) -> dict[tuple, tuple[int, int]]:
    """(bucket, url) -> (pageviews, distinct users); bucket None for a total."""
    groups: dict[tuple, list] = defaultdict(lambda: [0, set()])
    for event, _ in records:
        if event.type != "pageview" or url not in (None, event.fields["url"]):
            continue
        if (start is not None and event.ts < start) or (end is not None and event.ts >= end):
            continue
        bucket = iso(event.ts - event.ts % width) if width else None
        group = groups[(bucket, event.fields["url"] if by_url else None)]
        group[0] += 1
        group[1].add(event.fields["user_id"])
    return {key: (count, len(users)) for key, (count, users) in groups.items()}


def expected_revenue(records: list[Record]) -> dict[str, tuple[str, int]]:
    """Python Decimal sums, as the API sends them: strings with exactly two decimals."""
    totals: dict[str, list] = defaultdict(lambda: [Decimal("0.00"), 0])
    for event, _ in records:
        if event.type == "purchase":
            totals[event.fields["sku"]][0] += event.fields["amount"]
            totals[event.fields["sku"]][1] += 1
    return {sku: (format(revenue, "f"), orders) for sku, (revenue, orders) in totals.items()}


def answered(rows: list[dict], total: bool = False) -> dict[tuple, tuple[int, int]]:
    return {
        (None if total else row["bucket"], row.get("url")): (row["pageviews"], row["visitors"])
        for row in rows
    }


# --- the server ----------------------------------------------------------------------------


@dataclass
class Lake:
    store: ObjectStore
    realtime: RealtimeCells
    server: ServerThread
    client: httpx.Client

    def get(self, path: str, **params: Any) -> httpx.Response:
        return self.client.get(path, params=params)

    def rows(self, view: str = PAGEVIEWS.name, **params: Any) -> list[dict]:
        reply = self.get(f"/views/{view}", **params)
        assert reply.status_code == 200, reply.text
        return reply.json()["rows"]

    def sql(self, sql: str) -> httpx.Response:
        return self.client.post("/sql", json={"sql": sql})

    def wait_for_version(self, version: str) -> dict:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            reply = self.get("/views")  # 503 until the first load
            fresh = reply.json()["views"][0]["freshness"] if reply.status_code == 200 else {}
            if fresh.get("batch_version") == version:
                return fresh
            time.sleep(0.02)
        raise TimeoutError(f"the serving layer never served {version}")

    def __enter__(self) -> Lake:
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()
        self.server.stop()


def start_lake(
    root: Path,
    api_keys: list[str] | None = None,
    ready: bool = True,
    store: ObjectStore | None = None,
    **settings_fields: Any,
) -> Lake:
    store, realtime = store or FileStore(root / "lake"), RealtimeCells(project)
    realtime.restored.set()  # no speed layer here: its cells are whatever the test upserts
    settings = Settings(home=root, api_keys=api_keys or [], **settings_fields)
    server = ServerThread(build_server(settings, project, store, realtime, port=0,
                                       poll_seconds=0.02)).start()
    headers = {"X-API-Key": api_keys[0]} if api_keys else {}
    lake = Lake(store, realtime, server, httpx.Client(base_url=server.url, headers=headers))
    deadline = time.monotonic() + 10
    while ready and lake.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "the serving API never became ready"
        time.sleep(0.02)
    return lake


@pytest.fixture
def lake(tmp_path: Path) -> Iterator[Lake]:
    with start_lake(tmp_path) as lake:
        yield lake


@pytest.fixture
def traffic() -> list[Record]:
    return web_traffic()


@pytest.fixture
def served(lake: Lake, traffic: list[Record]) -> Lake:
    """Every event in the speed layer, batch v1 covering arrivals before CUT_1."""
    lake.realtime.upsert(speed_layer(traffic).drain())
    publish(lake.store, "v1", CUT_1, traffic)
    lake.wait_for_version("v1")
    return lake


def assert_errors(reply: httpx.Response, status: int, field: str) -> str:
    assert reply.status_code == status, reply.text
    (problem,) = reply.json()["errors"]
    assert problem["field"] == field and problem["error"], problem
    return problem["error"]


def metric(lake: Lake, name: str, **labels: str) -> float:
    wanted = ",".join(f'{key}="{value}"' for key, value in labels.items())
    sample = f"{name}{{{wanted}}} " if labels else f"{name} "
    for line in lake.get("/metrics").text.splitlines():
        if line.startswith(sample):
            return float(line.split()[-1])
    raise AssertionError(f"no sample {sample!r}")


# --- merged answers ------------------------------------------------------------------------


def test_real_time_alone_before_any_batch_version(lake: Lake, traffic: list[Record]) -> None:
    lake.realtime.upsert(speed_layer(traffic).drain())
    reply = lake.get(f"/views/{PAGEVIEWS.name}")
    assert reply.status_code == 200
    assert answered(reply.json()["rows"]) == expected_pageviews(traffic, HOUR)
    fresh = reply.json()["freshness"]
    assert fresh == {"batch_version": None, "cut": None, "realtime_lag_ms": None, "stale": True}


def test_batch_merges_with_slices_at_or_past_the_cut(served: Lake, traffic: list[Record]) -> None:
    before = [r for r in traffic if r[1] < CUT_1]
    after = [r for r in traffic if r[1] >= CUT_1]
    assert before and after  # both layers hold part of the answer
    assert answered(served.rows()) == expected_pageviews(traffic, HOUR)
    totals = answered(served.rows(bucket="total"), total=True)
    assert totals == expected_pageviews(traffic, None)
    assert sum(count for count, _ in totals.values()) == 300  # none twice, none missing


def test_bucket_roll_ups_hour_day_total(served: Lake, traffic: list[Record]) -> None:
    assert answered(served.rows(bucket="day")) == expected_pageviews(traffic, DAY)
    assert {r["bucket"] for r in served.rows(bucket="day")} == {"2026-11-23T00:00:00Z"}
    hourly = served.rows(bucket="hour")
    assert {r["bucket"] for r in hourly} == {iso(T0 + h * HOUR) for h in range(10)}
    total = served.rows(bucket="total", **{"from": iso(T0)})
    assert {r["bucket"] for r in total} == {iso(T0)}  # a total is labelled by its `from`


def test_group_by_a_subset_of_dimensions(served: Lake, traffic: list[Record]) -> None:
    rows = served.rows(group_by="", bucket="hour")
    assert all(set(row) == {"bucket", "pageviews", "visitors"} for row in rows)
    assert answered(rows) == expected_pageviews(traffic, HOUR, by_url=False)
    (everything,) = served.rows(group_by="", bucket="total")
    assert (everything["pageviews"], everything["visitors"]) == (300, 40)
    rows = served.rows(group_by="url", bucket="total")
    assert answered(rows, total=True) == expected_pageviews(traffic, None)


def test_dimension_filters_and_time_range(served: Lake, traffic: list[Record]) -> None:
    start, end = T0 + 2 * HOUR, T0 + 5 * HOUR
    rows = served.rows(url="/pricing", **{"from": iso(start), "to": iso(end)})
    assert answered(rows) == expected_pageviews(traffic, HOUR, url="/pricing", start=start, end=end)
    assert {row["url"] for row in rows} == {"/pricing"} and len(rows) == 3
    rows = served.rows(url="/pricing", **{"from": str(start), "to": str(end)})  # epoch ms
    assert answered(rows) == expected_pageviews(traffic, HOUR, url="/pricing", start=start, end=end)
    assert served.rows(url="/nowhere") == []


def test_order_by_and_limit(served: Lake, traffic: list[Record]) -> None:
    totals = expected_pageviews(traffic, None)
    by_pageviews = sorted(URLS, key=lambda url: totals[(None, url)][0], reverse=True)
    rows = served.rows(bucket="total", order_by="pageviews", limit=2)
    assert [row["url"] for row in rows] == by_pageviews[:2]
    rows = served.rows(bucket="total", order_by="url:desc")
    assert [row["url"] for row in rows] == sorted(URLS, reverse=True)
    rows = served.rows(bucket="total", order_by="visitors:asc", limit=1)
    assert rows[0]["visitors"] == min(visitors for _, visitors in totals.values())


def test_sketches_merge_across_layers_and_files(lake: Lake) -> None:
    hour = T0 + 3 * HOUR
    records = [(pageview(i, "/home", f"u{i % 5}", hour + i), CUT_1 - MINUTE + i) for i in range(10)]
    records += [(pageview(10 + i, "/home", f"u{i}", hour + i), CUT_1 + i) for i in range(8)]
    lake.realtime.upsert(speed_layer(records).drain())
    publish(lake.store, "v1", CUT_1, records)
    lake.wait_for_version("v1")
    (row,) = lake.rows()
    assert row == {"bucket": iso(hour), "url": "/home", "pageviews": 18, "visitors": 8}


def test_revenue_sums_and_counts_exactly(served: Lake, traffic: list[Record]) -> None:
    rows = served.rows(REVENUE.name, bucket="total")
    assert {r["sku"]: (r["revenue"], r["orders"]) for r in rows} == expected_revenue(traffic)
    days = served.rows(REVENUE.name, sku="B")
    assert {r["bucket"] for r in days} <= {iso(T0 - DAY), iso(T0), iso(T0 + DAY)}
    assert sum(r["orders"] for r in days) == expected_revenue(traffic)["B"][1]


# --- freshness and version swaps -------------------------------------------------------------


def test_freshness_names_the_version_cut_and_real_time_lag(served: Lake) -> None:
    fresh = served.get(f"/views/{PAGEVIEWS.name}").json()["freshness"]
    assert fresh == {"batch_version": "v1", "cut": "2026-11-23T10:00:00Z", "realtime_lag_ms": None,
                     "stale": True}
    served.realtime.caught_up_at = now_ms() - 1_500
    fresh = served.get(f"/views/{PAGEVIEWS.name}").json()["freshness"]
    assert 1_500 <= fresh["realtime_lag_ms"] < 60_000 and fresh["stale"] is False


def test_answers_past_the_lag_bound_say_stale_and_stay_ready(served: Lake) -> None:
    """A speed layer far behind marks answers stale; readiness does not fail for it."""
    served.realtime.caught_up_at = now_ms() - Settings().realtime_stale_ms - 5_000
    reply = served.get(f"/views/{PAGEVIEWS.name}")
    assert reply.status_code == 200 and reply.json()["freshness"]["stale"] is True
    assert served.get("/readyz").status_code == 200
    lag = [line for line in served.get("/metrics").text.splitlines()
           if line.startswith("lambdalake_serving_realtime_lag_seconds ")]
    assert float(lag[0].split()[1]) >= Settings().realtime_stale_ms / 1000
    (view,) = [v for v in served.get("/views").json()["views"] if v["name"] == REVENUE.name]
    assert view["dimensions"] == ["sku"] and view["bucket"] == "day"
    assert view["metrics"] == {"revenue": "sum", "orders": "count"}
    assert view["freshness"]["batch_version"] == "v1" and view["freshness"]["realtime_lag_ms"]


def test_a_new_version_keeps_the_cells_a_kept_version_needs(
    served: Lake, traffic: list[Record]
) -> None:
    state = speed_layer(traffic)
    publish(served.store, "v2", CUT_2, traffic)
    assert served.wait_for_version("v2")["cut"] == iso(CUT_2)
    assert served.realtime.cut == CUT_1  # v1 is kept: a rollback to it needs them
    past_cut = sum(1 for cells in state.cells.values() for cell in cells if cell[0] >= CUT_2)
    assert metric(served, "lambdalake_serving_realtime_cells") == past_cut
    assert answered(served.rows()) == expected_pageviews(traffic, HOUR)
    prune_versions(served.store, 1, [])  # v1 is deleted: no version needs the cells below CUT_2
    deadline = time.monotonic() + 10
    while served.realtime.cut != CUT_2:
        assert time.monotonic() < deadline, "the cells below the kept cuts were never dropped"
        time.sleep(0.02)
    assert answered(served.rows()) == expected_pageviews(traffic, HOUR)
    served.realtime.upsert(state.everything())  # a late resend of slices the batch covers
    assert answered(served.rows()) == expected_pageviews(traffic, HOUR)


def test_a_rollback_is_exact_at_once(served: Lake, traffic: list[Record], tmp_path: Path) -> None:
    """Back to v1 after v2: its first answer holds the events between the two cuts."""
    publish(served.store, "v2", CUT_2, traffic)
    served.wait_for_version("v2")
    assert any(CUT_1 <= arrival < CUT_2 for _, arrival in traffic)
    rollback(Settings(home=tmp_path), served.store, "v1")
    assert served.wait_for_version("v1")["cut"] == iso(CUT_1)
    assert answered(served.rows()) == expected_pageviews(traffic, HOUR)
    rows = served.rows(REVENUE.name, bucket="total")
    assert {r["sku"]: (r["revenue"], r["orders"]) for r in rows} == expected_revenue(traffic)


def test_a_version_that_fails_to_load_leaves_the_last_one_serving(served: Lake) -> None:
    before = served.rows(bucket="total")
    broken = catalog.Manifest(
        version="v2", cut=CUT_2, created=iso(now_ms()), engine="test", rows_read=0,
        views={PAGEVIEWS.name: catalog.ViewFiles(files=["views/missing.parquet"], rows=0)},
        fingerprints=project.fingerprints,  # it holds the view as defined now: it must load
    )
    catalog.write_manifest(served.store, broken)
    catalog.publish(served.store, "v2")
    time.sleep(0.2)  # several polls
    reply = served.get(f"/views/{PAGEVIEWS.name}", bucket="total")
    assert reply.json()["freshness"]["batch_version"] == "v1"
    assert reply.json()["rows"] == before


def test_answers_stay_exact_while_versions_swap(lake: Lake, traffic: list[Record]) -> None:
    lake.realtime.upsert(speed_layer(traffic).drain())
    expected = expected_pageviews(traffic, None)
    wrong: list[dict] = []

    def ask() -> None:
        with httpx.Client(base_url=lake.server.url) as client:
            while not done.is_set():
                rows = client.get(f"/views/{PAGEVIEWS.name}", params={"bucket": "total"}).json()
                if answered(rows["rows"], total=True) != expected:
                    wrong.append(rows)

    done = threading.Event()
    askers = [threading.Thread(target=ask) for _ in range(3)]
    for asker in askers:
        asker.start()
    for step in range(21):
        publish(lake.store, f"v{step:02}", CUT_1 - 10 * MINUTE + step * MINUTE, traffic)
        lake.wait_for_version(f"v{step:02}")
    done.set()
    for asker in askers:
        asker.join()
    assert not wrong, wrong[0]


@settings(max_examples=15)
@given(
    arrivals=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 11), st.integers(0, 9),
                                st.integers(0, 19)), min_size=1, max_size=40),
    cut_slice=st.integers(0, 20),
    bucket=st.sampled_from(["hour", "day", "total"]),
)
def test_merged_answer_equals_a_recompute_for_any_cut(
    tmp_path_factory: pytest.TempPathFactory,
    arrivals: list[tuple[int, int, int, int]],
    cut_slice: int,
    bucket: str,
) -> None:
    records = [
        (pageview(n, URLS[u], f"u{user}", T0 + hour * HOUR + n), T0 + DAY + s * MINUTE + n)
        for n, (u, hour, user, s) in enumerate(arrivals)
    ]
    with start_lake(tmp_path_factory.mktemp("lake")) as lake:
        lake.realtime.upsert(speed_layer(records).drain())
        publish(lake.store, "v1", T0 + DAY + cut_slice * MINUTE, records)
        lake.wait_for_version("v1")
        width = {"hour": HOUR, "day": DAY, "total": None}[bucket]
        rows = lake.rows(bucket=bucket)
        assert answered(rows, total=width is None) == expected_pageviews(records, width)


@pytest.mark.parametrize("cells_in_arrow", [0, 30, 10**9])
def test_real_time_cells_copied_into_duckdb_answer_exactly(
    tmp_path: Path, traffic: list[Record], cells_in_arrow: int
) -> None:
    """Serving copies the real-time cells into DuckDB and scans from Arrow only the slices
    changed since, rebuilding the copy past `cells_in_arrow` cells left to Arrow: at each
    query (0), now and then (30), never (10**9). As cells arrive in any slice, old or new,
    every answer, the top N too, equals the recompute."""
    store, realtime = FileStore(tmp_path / "lake"), RealtimeCells(project)
    publish(store, "v1", CUT_1, traffic)
    duck = DuckDB(cells_in_arrow=cells_in_arrow)
    views = BatchViews(project, store, realtime, prepare=duck.cache)
    views.refresh()
    state, schema = ViewState(project, MINUTE, DAY), project.schemas[PAGEVIEWS.event_type]
    batch = [record for record in traffic if record[1] < CUT_1]
    for upto in (100, 200, len(traffic)):  # arrivals in random order: old slices change too
        state.apply_all(traffic[upto - 100 if upto < len(traffic) else 200 : upto])
        realtime.upsert(state.drain())
        seen = batch + [record for record in traffic[:upto] if record[1] >= CUT_1]
        for bucket, width in (("hour", HOUR), ("total", None)):
            query = parse(PAGEVIEWS, schema, bucket=bucket)
            rows = view_page(duck, views.read([PAGEVIEWS.name]), PAGEVIEWS, query).rows
            assert answered(rows, total=width is None) == expected_pageviews(seen, width)
        top = parse(PAGEVIEWS, schema, bucket="total", order_by="pageviews", limit=2)
        rows = view_page(duck, views.read([PAGEVIEWS.name]), PAGEVIEWS, top).rows
        totals = sorted(expected_pageviews(seen, None).items(), key=lambda item: -item[1][0])
        assert answered(rows, total=True) == dict(totals[:2])
    duck.close()


def test_the_cells_copy_outlives_changes_to_the_newest_slice(
    tmp_path: Path, traffic: list[Record], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The speed layer keeps changing the newest arrival slice: serving's copy of the cells
    holds the slices before it, so it stays in use while the newest changes (it held every
    slice, so the next publish left it useless: it was rebuilt at nearly every publish,
    copying every cell). Answers stay exact."""
    store, realtime = FileStore(tmp_path / "lake"), RealtimeCells(project)
    publish(store, "v1", CUT_1, traffic)
    duck = DuckDB(cells_in_arrow=0)
    views = BatchViews(project, store, realtime, prepare=duck.cache)
    views.refresh()
    built: list[str] = []
    build = DuckDB._build_cells

    def counted(self: DuckDB, view: str, cells: Sliced, copy: Any) -> Any:
        built.append(view)
        return build(self, view, cells, copy)

    monkeypatch.setattr(DuckDB, "_build_cells", counted)
    arrived = sorted(traffic, key=lambda record: record[1])
    newest = [record for record in arrived if record[1] // MINUTE == arrived[-1][1] // MINUTE]
    older = len(arrived) - len(newest)
    state, schema = ViewState(project, MINUTE, DAY), project.schemas[PAGEVIEWS.event_type]
    state.apply_all(arrived[:older])
    for upto in range(older, len(arrived) + 1):
        state.apply_all(arrived[older:upto][-1:] if upto > older else [])
        realtime.upsert(state.drain())
        rows = view_page(duck, views.read([PAGEVIEWS.name]), PAGEVIEWS,
                         parse(PAGEVIEWS, schema, bucket="total")).rows
        assert answered(rows, total=True) == expected_pageviews(arrived[:upto], None)
    assert len(newest) > 1 and built == [PAGEVIEWS.name] * 2  # at first, as `newest` began
    duck.close()


def cells_tables_left(duck: DuckDB) -> int:
    """The DuckDB tables holding copies of real-time cells, not dropped yet."""
    [(count,)] = duck._connection.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE table_name LIKE 'cells_%'").fetchall()
    return int(count)


def test_settled_slices_are_copied_past_the_base_until_they_outgrow_a_quarter_of_it(
    tmp_path: Path, traffic: list[Record], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As the speed layer's slices settle one after another, serving copies the new ones
    into a delta table beside its base copy of the cells, and all of them into a new base
    once the delta would outgrow a quarter of it (it copied every cell at each: a quarter of
    a replica's CPU under ingestion). Answers stay exact; replaced tables are dropped."""
    store, realtime = FileStore(tmp_path / "lake"), RealtimeCells(project)
    publish(store, "v1", CUT_1, traffic)
    duck = DuckDB(cells_in_arrow=0)
    views = BatchViews(project, store, realtime, prepare=duck.cache)
    views.refresh()
    copies: list[tuple[int, int]] = []  # per table made: (cells copied, cells settled)
    copy_cells = DuckDB._copy_cells

    def counted(self: DuckDB, parts: tuple[pa.Table, ...]) -> Any:
        settled = views.read([PAGEVIEWS.name]).realtime[PAGEVIEWS.name].parts[:-1]
        copies.append((sum(p.num_rows for p in parts), sum(p.num_rows for p in settled)))
        return copy_cells(self, parts)

    monkeypatch.setattr(DuckDB, "_copy_cells", counted)
    batch = [record for record in traffic if record[1] < CUT_1]
    late = sorted((record for record in traffic if record[1] >= CUT_1), key=lambda r: r[1])
    state, schema = ViewState(project, MINUTE, DAY), project.schemas[PAGEVIEWS.event_type]
    seen = list(batch)
    for _, arriving in itertools.groupby(late, key=lambda record: record[1] // MINUTE):
        seen += (slice_records := list(arriving))
        state.apply_all(slice_records)
        realtime.upsert(state.drain())
        rows = view_page(duck, views.read([PAGEVIEWS.name]), PAGEVIEWS,
                         parse(PAGEVIEWS, schema)).rows
        assert answered(rows) == expected_pageviews(seen, HOUR)
    deltas = [copied for copied, settled in copies if copied < settled]
    bases = [copied for copied, settled in copies if copied == settled]
    assert deltas and len(bases) >= 2, copies  # a base, deltas, a new base
    assert all(5 * delta <= settled for delta, settled in copies if delta < settled)  # <= base / 4
    assert cells_tables_left(duck) <= 2
    duck.close()


def test_queries_in_flight_while_slices_settle_never_fail_and_leave_no_table_behind(
    tmp_path: Path, traffic: list[Record]
) -> None:
    """Four threads query while the speed layer's slices settle one by one, over and over
    (each settling makes a new delta or base, and retires the tables before it): no query
    fails on a table dropped under it, every answer counts at least what was published
    before it began and never more than everything, and once the queries end only the
    newest copy's tables are left."""
    store, realtime = FileStore(tmp_path / "lake"), RealtimeCells(project)
    publish(store, "v1", CUT_1, traffic)
    duck = DuckDB(cells_in_arrow=0)
    views = BatchViews(project, store, realtime, prepare=duck.cache)
    views.refresh()
    schema = project.schemas[PAGEVIEWS.event_type]
    batch = [record for record in traffic if record[1] < CUT_1]
    late = sorted((record for record in traffic if record[1] >= CUT_1), key=lambda r: r[1])
    slices = [list(group) for _, group in
              itertools.groupby(late, key=lambda record: record[1] // MINUTE)]

    def counted(records: list[Record]) -> int:
        return sum(pageviews for pageviews, _ in expected_pageviews(records, None).values())

    def total() -> int:
        query = parse(PAGEVIEWS, schema, bucket="total")
        rows = view_page(duck, views.read([PAGEVIEWS.name]), PAGEVIEWS, query).rows
        return sum(row["pageviews"] for row in rows)

    everything, floor = counted(batch + late), [counted(batch)]
    done, failures = threading.Event(), list[BaseException]()

    def query_on() -> None:
        while not done.is_set():
            try:
                least = floor[0]
                assert least <= total() <= everything
            except BaseException as error:  # noqa: BLE001 (the test reports it)
                failures.append(error)
                return

    threads = [threading.Thread(target=query_on) for _ in range(4)]
    for thread in threads:
        thread.start()
    until = time.monotonic() + 2
    for round_ in itertools.count():  # the same cells again: each slice's table is made anew
        if round_ and time.monotonic() > until:
            break
        state, seen = ViewState(project, MINUTE, DAY), list(batch)
        for arrived in slices:
            state.apply_all(arrived)
            realtime.upsert(state.drain())
            seen += arrived
            if round_ == 0:
                floor[0] = counted(seen)
    done.set()
    for thread in threads:
        thread.join()
    assert not failures, failures[0]
    assert total() == everything
    assert cells_tables_left(duck) <= 2
    duck.close()


def test_cached_sketches_answer_as_the_sketches_themselves(
    tmp_path: Path, traffic: list[Record]
) -> None:
    """Serving's DuckDB tables hold references to their sketches, which answers put back:
    every view (HLL, KLL and Theta sketches) answers as it does from the Arrow tables holding
    the sketches, with groups gathering batch rows, the cells' copy and Arrow cells at once."""
    store, realtime = FileStore(tmp_path / "lake"), RealtimeCells(project)
    publish(store, "v1", CUT_1, traffic)
    cached, arrow = DuckDB(cells_in_arrow=5), DuckDB(cells_in_arrow=10**9)
    served = BatchViews(project, store, realtime, prepare=cached.cache)
    uncached = BatchViews(project, store, realtime)
    served.refresh()
    uncached.refresh()
    state = ViewState(project, MINUTE, DAY)
    late = sorted(traffic, key=lambda record: record[1])
    for arrived in (late[:-4], late[-4:]):  # copied into DuckDB at the first query, then not
        state.apply_all(arrived)
        realtime.upsert(state.drain())
        for view in project.views.values():
            for params in ({}, {"bucket": "total"}, {"limit": 3}, {"bucket": "day", "limit": 2}):
                query = parse(view, project.schemas[view.event_type], **params)
                answer = view_page(cached, served.read([view.name]), view, query)
                assert answer == view_page(arrow, uncached.read([view.name]), view, query)
                assert answer.rows or view.name != PAGEVIEWS.name
    cached.close()
    arrow.close()


@pytest.mark.s3
def test_batch_views_load_from_s3(s3_server: str, tmp_path: Path, traffic: list[Record]) -> None:
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="serving")
    store = S3Store("s3://serving/deployments/test", endpoint_url=s3_server)
    with start_lake(tmp_path, store=store) as lake:
        lake.realtime.upsert(speed_layer(traffic).drain())
        publish(store, "v1", CUT_1, traffic)
        lake.wait_for_version("v1")
        assert answered(lake.rows()) == expected_pageviews(traffic, HOUR)
        rows = lake.rows(REVENUE.name, bucket="total")
        assert {r["sku"]: (r["revenue"], r["orders"]) for r in rows} == expected_revenue(traffic)


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "field", "rule"),
    [
        ({"to": "yesterday"}, "to", "ISO 8601"),
        ({"from": "2026-11-23T10:00:00Z", "to": "2026-11-23T09:00:00Z"}, "to", "after"),
        ({"bucket": "week"}, "bucket", "'hour', 'day' or 'total'"),
        ({"bucket": "minute"}, "bucket", "'hour', 'day' or 'total'"),
        ({"from": "2000-01-01", "to": "2030-01-01"}, "to", "more than the 100000 rows"),
        ({"group_by": "url,country"}, "group_by", "country"),
        ({"country": "NZ"}, "country", "not a dimension"),
        ({"order_by": "revenue"}, "order_by", "'pageviews:desc'"),
        ({"limit": "0"}, "limit", "greater than or equal to 1"),
        ({"limit": "100001"}, "limit", "less than or equal to 100000"),
        ({"limit": "ten"}, "limit", "integer"),
        ([("url.prefix", "/h"), ("url.prefix", "/d")], "url.prefix", "more than once"),
        ({"country.prefix": "N"}, "country.prefix", "not a dimension"),
        ({"tz": "Mars/Olympus"}, "tz", "IANA"),
        ({"cursor": "bm90IGEgY3Vyc29y"}, "cursor", "not a cursor"),
        ({"format": "xml"}, "format", "'json', 'csv' or 'arrow'"),
        ({"format": "csv", "layers": "1"}, "layers", "JSON"),
    ],
)
def test_bad_query_parameters_are_400_naming_the_field(
    lake: Lake, params: Any, field: str, rule: str
) -> None:
    reply = lake.client.get(f"/views/{PAGEVIEWS.name}", params=params)
    assert rule in assert_errors(reply, 400, field)


def test_unknown_view_is_400_and_unknown_path_404(lake: Lake) -> None:
    error = assert_errors(lake.get("/views/nope"), 400, "view")
    assert PAGEVIEWS.name in error  # names the views there are
    assert_errors(lake.get("/nope"), 404, "path")
    assert_errors(lake.client.delete("/views"), 405, "method")


def test_api_keys_guard_everything_but_health_and_docs(tmp_path: Path) -> None:
    lake = start_lake(tmp_path, api_keys=["k1", "k2"])
    with lake, httpx.Client(base_url=lake.server.url) as anonymous:
        for path in ("/views", f"/views/{PAGEVIEWS.name}", "/metrics"):
            assert_errors(anonymous.get(path), 401, "X-API-Key")
        assert_errors(anonymous.post("/sql", json={"sql": "SELECT 1"}), 401, "X-API-Key")
        assert_errors(anonymous.get("/views", headers={"X-API-Key": "k3"}), 401, "X-API-Key")
        wrong = {"Authorization": "Bearer k3"}
        assert_errors(anonymous.get("/views", headers=wrong), 401, "Authorization")
        assert anonymous.get("/views", headers={"X-API-Key": "k2"}).status_code == 200
        assert anonymous.get("/views", headers={"Authorization": "Bearer k1"}).status_code == 200
        for path in ("/healthz", "/readyz", "/docs", "/openapi.json"):
            assert anonymous.get(path).status_code == 200, path
        assert lake.get("/views").status_code == 200  # the lake's client sends k1


# --- operations -------------------------------------------------------------------------------


def test_readyz_waits_for_the_first_load(tmp_path: Path, traffic: list[Record]) -> None:
    store = FileStore(tmp_path / "lake")
    store.put(catalog.CURRENT, b'{"version": "v-not-yet-written"}')  # a pointer ahead of its data
    with start_lake(tmp_path, ready=False) as lake:
        time.sleep(0.1)
        health = lake.get("/healthz").json()  # alive: its refresh loop retries meanwhile
        assert health["status"] == "ok"
        assert health["loops"]["serving-batch-views"].startswith("retrying: LookupError")
        assert_errors(lake.get("/readyz"), 503, "batch")
        publish(store, "v1", CUT_1, traffic)
        lake.wait_for_version("v1")
        assert lake.get("/readyz").json() == {"status": "ready", "batch_version": "v1"}


def test_metrics_count_requests_by_route_and_status(served: Lake) -> None:
    served.rows()
    served.get("/views/nope")
    served.get(f"/views/{PAGEVIEWS.name}", limit="0")
    route = {"method": "GET", "route": "/views/{view}"}
    assert metric(served, "lambdalake_serving_requests_total", **route, status="400") == 1
    route = {"method": "GET", "route": f"/views/{PAGEVIEWS.name}"}
    assert metric(served, "lambdalake_serving_requests_total", **route, status="200") >= 1
    assert metric(served, "lambdalake_serving_requests_total", **route, status="400") == 1
    count = metric(served, "lambdalake_serving_request_seconds_count", **route, status="200")
    assert count >= 1
    assert 0 <= metric(served, "lambdalake_serving_batch_version_age_seconds") < 60
    assert metric(served, "lambdalake_serving_realtime_cells") > 0
    reply = served.get("/metrics")
    assert reply.headers["content-type"].startswith("text/plain")
    assert "lambdalake_serving_realtime_lag_seconds" in reply.text


# --- SQL --------------------------------------------------------------------------------------


def test_sql_reads_the_merged_views(served: Lake, traffic: list[Record]) -> None:
    reply = served.sql(
        "SELECT url, sum(pageviews) AS pageviews, max(visitors) AS busiest "
        "FROM pageviews_by_url_hour GROUP BY url ORDER BY url"
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["columns"] == ["url", "pageviews", "busiest"] and body["truncated"] is False
    hourly = expected_pageviews(traffic, HOUR)
    assert body["rows"] == [
        [url, sum(c for (_, u), (c, _) in hourly.items() if u == url),
         max(v for (_, u), (_, v) in hourly.items() if u == url)]
        for url in sorted(URLS)
    ]
    assert body["freshness"]["batch_version"] == "v1"


def test_sql_sees_buckets_as_timestamps_and_joins_views(served: Lake) -> None:
    body = served.sql(
        "WITH firsts AS (SELECT min(bucket) AS bucket FROM pageviews_by_url_hour) "
        "SELECT bucket, bucket + INTERVAL 1 HOUR AS next, "
        "(SELECT sum(orders) FROM revenue_by_sku_day) AS orders FROM firsts"
    ).json()
    assert body["rows"] == [["2026-11-23T00:00:00Z", "2026-11-23T01:00:00Z", 40]]


def test_sql_catalog_shows_every_view_whether_or_not_named(served: Lake) -> None:
    """information_schema and DESCRIBE see every view, typed as /sql reads it."""
    body = served.sql("SELECT table_name, column_name, data_type FROM information_schema.columns"
                      " ORDER BY table_name, ordinal_position").json()
    shown: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for table, column, data_type in body["rows"]:
        shown[table].append((column, data_type))
    assert set(shown) == set(project.views)
    for view in project.views.values():
        assert [column for column, _ in shown[view.name]] == \
            ["bucket", *view.keys, *view.metrics]
        assert shown[view.name][0] == ("bucket", "TIMESTAMP WITH TIME ZONE")
    tables = served.sql("SELECT table_name FROM information_schema.tables").json()["rows"]
    assert sorted(name for (name,) in tables) == sorted(project.views)
    described = served.sql(f"DESCRIBE {PAGEVIEWS.name}").json()["rows"]
    assert [row[:2] for row in described] == [list(pair) for pair in shown[PAGEVIEWS.name]]


def test_sql_caps_rows(served: Lake) -> None:
    body = served.sql("SELECT range AS n FROM range(20000)").json()
    assert len(body["rows"]) == 10_000 and body["truncated"] is True
    assert body["rows"][-1] == [9_999]


@pytest.mark.parametrize(
    ("sql", "rule"),
    [
        ("INSERT INTO pageviews_by_url_hour VALUES (1)", "read-only"),
        ("CREATE TABLE t AS SELECT 1", "read-only"),
        ("SELECT 1; SELECT 2", "read-only"),
        ("COPY (SELECT 1) TO '/tmp/out.csv'", "read-only"),
        ("SET threads = 1", "read-only"),
        ("SELECT * FROM read_text('/etc/hostname')", "disabled"),
        ("SELECT * FROM nowhere", "nowhere"),
        ("SELEC 1", "syntax"),
    ],
)
def test_sql_refuses_anything_but_one_read_only_query(served: Lake, sql: str, rule: str) -> None:
    assert rule in assert_errors(served.sql(sql), 400, "sql")


def test_sql_body_is_validated(lake: Lake) -> None:
    assert_errors(lake.client.post("/sql", json={}), 400, "sql")
    assert_errors(lake.client.post("/sql", json={"sql": ""}), 400, "sql")
    json_type = {"content-type": "application/json"}
    assert_errors(lake.client.post("/sql", content=b"{not json", headers=json_type), 400, "body")


# --- quantiles and distinct sets ---------------------------------------------------------------


def shoppers(seed: int = 11) -> list[Record]:
    """Pageviews with durations by 30 users, purchases by 20 of them, across CUT_1."""
    rng = random.Random(seed)
    records = []
    for number in range(150):
        fields = {"url": rng.choice(URLS), "user_id": f"u{rng.randrange(30)}", "referrer": None,
                  "duration_ms": rng.randrange(60_000)}
        event = Event(f"pv-{number}", "pageview", T0 + rng.randrange(10 * HOUR), fields)
        records.append((event, CUT_1 - 10 * MINUTE + rng.randrange(20 * MINUTE)))
    for number in range(40):
        fields = {"user_id": f"u{rng.randrange(10, 30)}", "sku": rng.choice(SKUS),
                  "amount": Decimal("1.00")}
        event = Event(f"buy-{number}", "purchase", T0 + rng.randrange(DAY), fields)
        records.append((event, CUT_1 - 10 * MINUTE + rng.randrange(20 * MINUTE)))
    return records


@pytest.fixture
def shopping(lake: Lake) -> tuple[Lake, list[Record]]:
    records = shoppers()
    lake.realtime.upsert(speed_layer(records).drain())
    publish(lake.store, "v1", CUT_1, records)
    lake.wait_for_version("v1")
    return lake, records


def test_quantiles_answer_the_ranks_asked_over_batch_and_real_time(shopping) -> None:
    lake, records = shopping
    durations = {url: [e.fields["duration_ms"] for e, _ in records
                       if e.type == "pageview" and e.fields["url"] == url] for url in URLS}
    rows = lake.rows("durations_by_url_hour", bucket="total", quantiles="0,0.25,0.5,0.9,1")
    ranks = (0.0, 0.25, 0.5, 0.9, 1.0)
    assert {r["url"]: r["duration_ms"] for r in rows} == {
        url: exact_quantiles(values, ranks) for url, values in durations.items()
    }
    [everything] = lake.rows("durations_by_url_hour", bucket="total", group_by="")
    every = [d for values in durations.values() for d in values]
    assert everything["duration_ms"] == exact_quantiles(every)  # p50, p90, p99 by default
    assert everything["viewers"] == len({e.fields["user_id"] for e, _ in records
                                         if e.type == "pageview"})


@pytest.mark.parametrize(
    ("params", "field"),
    [({"quantiles": "0.5,x"}, "quantiles"), ({"quantiles": "1.5"}, "quantiles"),
     ({"order_by": "duration_ms"}, "order_by")],
)
def test_bad_quantile_parameters_are_refused(shopping, params, field) -> None:
    lake, _ = shopping
    reply = lake.get("/views/durations_by_url_hour", **params)
    assert reply.status_code == 400 and reply.json()["errors"][0]["field"] == field


def test_sql_intersects_distinct_sets_and_reads_quantile_sketches(shopping) -> None:
    lake, records = shopping
    viewers = {e.fields["user_id"] for e, _ in records
               if e.type == "pageview" and e.fields["url"] == "/pricing"}
    buyers = {e.fields["user_id"] for e, _ in records
              if e.type == "purchase" and e.fields["sku"] == "A"}
    every = [e.fields["duration_ms"] for e, _ in records if e.type == "pageview"]
    reply = lake.sql(
        "SELECT theta_estimate(theta_intersection(["
        " (SELECT theta_union(list(viewers)) FROM durations_by_url_hour WHERE url = '/pricing'),"
        " (SELECT theta_union(list(buyers)) FROM buyers_by_sku_day WHERE sku = 'A')])) AS both,"
        " (SELECT kll_quantile(kll_merge(list(duration_ms)), 0.9)"
        "  FROM durations_by_url_hour) AS p90"
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["rows"] == [[len(viewers & buyers), exact_quantiles(every)["0.9"]]]


# --- dashboards: raw ranges, formats, layers, tz, pages, CORS, docs ---------------------------


def test_grafana_raw_range_covers_the_buckets_starting_within_it(
    served: Lake, traffic: list[Record]
) -> None:
    start, end = T0 + 2 * HOUR + 12_345, T0 + 5 * HOUR + 1  # ${__from} / ${__to} as sent
    reply = served.get(f"/views/{PAGEVIEWS.name}", **{"from": str(start), "to": str(end)})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["range"] == {"from": iso(T0 + 3 * HOUR), "to": iso(T0 + 6 * HOUR)}
    assert answered(body["rows"]) == expected_pageviews(traffic, HOUR, start=T0 + 3 * HOUR,
                                                        end=T0 + 6 * HOUR)


def test_in_and_prefix_filters_over_http(served: Lake, traffic: list[Record]) -> None:
    rows = served.client.get(f"/views/{PAGEVIEWS.name}",
                             params=[("url", "/home"), ("url", "/docs"), ("bucket", "total")])
    assert {r["url"] for r in rows.json()["rows"]} == {"/home", "/docs"}
    rows = served.rows(bucket="total", **{"url.prefix": "/p"})
    assert answered(rows, total=True) == {k: v for k, v in expected_pageviews(traffic, None)
                                          .items() if k[1] == "/pricing"}


def test_csv_and_arrow_answers_equal_the_json_one(served: Lake) -> None:
    rows = served.rows(bucket="total")
    csv_reply = served.get(f"/views/{PAGEVIEWS.name}", bucket="total", format="csv")
    assert csv_reply.headers["content-type"].startswith("text/csv")
    lines = csv_reply.text.splitlines()
    assert lines[0] == '"bucket","url","pageviews","visitors"' and len(lines) == len(rows) + 1
    arrow = served.client.get(f"/views/{PAGEVIEWS.name}", params={"bucket": "total"},
                              headers={"Accept": "application/vnd.apache.arrow.stream"})
    table = pa.ipc.open_stream(arrow.content).read_all()
    assert table.column("url").to_pylist() == [r["url"] for r in rows]
    assert table.column("pageviews").to_pylist() == [r["pageviews"] for r in rows]
    assert table.schema.field("bucket").type == pa.timestamp("ms", tz="UTC")
    quantiles = served.get("/views/durations_by_url_hour", format="arrow", quantiles="0.5,0.9")
    names = pa.ipc.open_stream(quantiles.content).read_all().column_names
    assert names == ["bucket", "url", "duration_ms.0.5", "duration_ms.0.9", "viewers"]


def test_layers_show_the_batch_and_real_time_parts(served: Lake, traffic: list[Record]) -> None:
    body = served.get(f"/views/{PAGEVIEWS.name}", layers="1").json()
    batch = [r for r in traffic if r[1] < CUT_1]
    realtime = [r for r in traffic if r[1] >= CUT_1]
    assert answered(body["layers"]["batch"]) == expected_pageviews(batch, HOUR)
    assert answered(body["layers"]["realtime"]) == expected_pageviews(realtime, HOUR)
    assert answered(body["rows"]) == expected_pageviews(traffic, HOUR)


def test_tz_rolls_hours_into_local_days_over_http(served: Lake, traffic: list[Record]) -> None:
    rows = served.rows(bucket="day", tz="America/New_York", group_by="")
    by_day: dict[str, int] = defaultdict(int)
    for event, _ in traffic:
        if event.type == "pageview":
            local = datetime.fromtimestamp(event.ts / 1000, ZoneInfo("America/New_York"))
            by_day[local.replace(hour=0, minute=0, second=0, microsecond=0).isoformat()] += 1
    assert {r["bucket"]: r["pageviews"] for r in rows} == by_day
    assert set(by_day) == {"2026-11-22T00:00:00-05:00", "2026-11-23T00:00:00-05:00"}


def test_cursor_pages_over_http(served: Lake) -> None:
    whole = served.rows(order_by="pageviews")
    pages, cursor = [], None
    while True:
        params = {"order_by": "pageviews", "limit": "7", **({"cursor": cursor} if cursor else {})}
        body = served.get(f"/views/{PAGEVIEWS.name}", **params).json()
        pages += body["rows"]
        cursor = body["next_cursor"]
        assert body["truncated"] is (cursor is not None)
        if cursor is None:
            break
    assert pages == whole and len(whole) > 7
    reply = served.get(f"/views/{PAGEVIEWS.name}", limit="7", cursor=cursor or "x")
    assert_errors(reply, 400, "cursor")


def test_cors_is_configurable(tmp_path: Path) -> None:
    origin = "https://grafana.example"
    with start_lake(tmp_path, cors_origins=[origin]) as lake:
        preflight = lake.client.options(
            f"/views/{PAGEVIEWS.name}",
            headers={"Origin": origin, "Access-Control-Request-Method": "GET",
                     "Access-Control-Request-Headers": "x-api-key"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == origin
        reply = lake.client.get("/views", headers={"Origin": origin})
        assert reply.headers["access-control-allow-origin"] == origin
        other = lake.client.get("/views", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


def test_docs_load_only_local_assets(lake: Lake) -> None:
    page = lake.get("/docs").text
    assets = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert assets and all(url.startswith("/docs/assets/") for url in assets), assets
    for url in assets:
        assert lake.get(url).status_code == 200, url
    doc = lake.get("/openapi.json").json()
    query = doc["paths"][f"/views/{PAGEVIEWS.name}"]["get"]
    params = {p["name"]: p for p in query["parameters"]}
    assert params["bucket"]["schema"]["anyOf"][0]["enum"] == ["hour", "day", "total"]
    assert params["url"]["schema"] == {"type": "array", "items": {"type": "string"}}
    assert "url.prefix" in params and params["from"]["schema"]["examples"]
    row = doc["components"]["schemas"]["PageviewsByUrlHourRow"]["properties"]
    assert row["pageviews"]["type"] == "integer" and row["visitors"]["type"] == "integer"


# --- limits per key and TLS -------------------------------------------------------------------


def test_a_key_past_its_rate_gets_429_with_retry_after(tmp_path: Path) -> None:
    with start_lake(tmp_path, api_keys=["k1", "k2"], api_rate_per_key=1,
                    api_burst_per_key=3) as lake:
        replies = [lake.get("/views") for _ in range(5)]  # readiness polls spend none
        assert [r.status_code for r in replies][:3] == [200, 200, 200]
        limited = replies[-1]
        assert_errors(limited, 429, "rate")
        assert int(limited.headers["retry-after"]) >= 1
        other = lake.client.get(f"/views/{PAGEVIEWS.name}", headers={"X-API-Key": "k2"})
        assert other.status_code == 200  # another key has its own budget
        assert lake.get("/healthz").status_code == 200  # health is never limited


def test_a_key_past_its_concurrent_sql_gets_429(tmp_path: Path) -> None:
    with start_lake(tmp_path, api_keys=["k1", "k2"], sql_concurrency_per_key=1,
                    sql_concurrency=4, sql_timeout_seconds=3) as lake:
        slow = "SELECT count(*) FROM range(3000000000000)"  # stopped by the time limit
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(lake.client.post, "/sql", json={"sql": slow}, timeout=30)
            time.sleep(0.5)
            second = lake.client.post("/sql", json={"sql": "SELECT 1"}, timeout=30)
            other = lake.client.post("/sql", json={"sql": "SELECT 1"},
                                     headers={"X-API-Key": "k2"}, timeout=30)
            first.result()
        assert_errors(second, 429, "sql")
        assert second.headers["retry-after"] == "1"
        assert other.status_code == 200


def test_tls_when_a_certificate_is_configured(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    settings = Settings(home=tmp_path, tls_certfile=cert, tls_keyfile=key)
    realtime = RealtimeCells(project)
    realtime.restored.set()
    server = ServerThread(build_server(settings, project, FileStore(tmp_path / "lake"),
                                       realtime, port=0, poll_seconds=0.02)).start()
    try:
        assert server.url.startswith("https://")
        trusted = ssl.create_default_context(cafile=str(cert))
        with httpx.Client(base_url=server.url, verify=trusted) as client:
            assert client.get("/healthz").status_code == 200
        with pytest.raises(httpx.RemoteProtocolError):
            httpx.get(server.url.replace("https", "http") + "/healthz")
    finally:
        server.stop()


def test_tls_on_the_gateway(tmp_path: Path) -> None:
    from lambdalake.functions import environment
    from lambdalake.functions.runtime.function import LocalFunction
    from lambdalake.functions.runtime.gateway import Gateway
    from lambdalake.functions.runtime.template import load_template

    cert, key = self_signed(tmp_path)
    settings = Settings(home=tmp_path, tls_certfile=cert, tls_keyfile=key)
    environment.bind(settings)
    gateway = Gateway([LocalFunction(load_template().functions["Ingest"])], "127.0.0.1", 0,
                      tls=settings.tls)
    gateway.start()
    try:
        assert gateway.url.startswith("https://")
        event = {"event_id": "tls-1", "type": "purchase", "ts": now_ms(), "user_id": "u",
                 "sku": "A", "amount": 1.0}
        trusted = ssl.create_default_context(cafile=str(cert))
        reply = httpx.post(f"{gateway.url}/events", json=event, verify=trusted)
        assert reply.status_code == 202, reply.text
    finally:
        gateway.stop()
        environment.bind(None)


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 signed by its own key, made with `cryptography`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=1)).not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


# --- freshness under change -------------------------------------------------------------------


def test_swaps_never_mix_versions_nor_block_queries(lake: Lake, traffic: list[Record]) -> None:
    """Each answer's layers match the version it names: batch = arrivals before its cut,
    real time = the rest; and no query waits on a version's load."""
    lake.realtime.upsert(speed_layer(traffic).drain())
    cuts = {f"v{step:02}": CUT_1 - 10 * MINUTE + step * MINUTE for step in range(12)}
    wrong: list[str] = []
    slowest = [0.0]

    def ask() -> None:
        with httpx.Client(base_url=lake.server.url) as client:
            while not done.is_set():
                began = time.monotonic()
                reply = client.get(f"/views/{PAGEVIEWS.name}",
                                   params={"bucket": "total", "layers": "1"})
                slowest[0] = max(slowest[0], time.monotonic() - began)
                if reply.status_code != 200:
                    wrong.append(reply.text)
                    continue
                body = reply.json()
                cut = cuts.get(body["freshness"]["batch_version"], 0)
                batch = [r for r in traffic if r[1] < cut]
                if (answered(body["layers"]["batch"], total=True)
                        != expected_pageviews(batch, None)
                        or answered(body["rows"], total=True)
                        != expected_pageviews(traffic, None)):
                    wrong.append(body)

    done = threading.Event()
    askers = [threading.Thread(target=ask) for _ in range(4)]
    for asker in askers:
        asker.start()
    for version, cut in cuts.items():
        publish(lake.store, version, cut, traffic)
        lake.wait_for_version(version)
    done.set()
    for asker in askers:
        asker.join()
    assert not wrong, wrong[0]
    assert slowest[0] < 2.0, slowest


class NoMasterStore(FileStore):
    """A store whose master dataset cannot be read: a restart must not need it."""

    def get(self, key: str) -> bytes:
        assert not key.startswith("master/"), key
        return super().get(key)

    def list(self, prefix: str = "") -> Any:
        assert not prefix.startswith("master"), prefix
        return super().list(prefix)


def test_a_restarted_server_serves_from_published_views_and_speed_output(
    tmp_path: Path, traffic: list[Record]
) -> None:
    with start_lake(tmp_path) as first:
        publish(first.store, "v1", CUT_1, traffic)
        first.wait_for_version("v1")
    store = NoMasterStore(tmp_path / "lake")
    with start_lake(tmp_path, store=store, ready=False) as restarted:
        restarted.realtime.upsert(speed_layer(traffic).drain())  # the speed layer's output
        restarted.wait_for_version("v1")
        assert answered(restarted.rows()) == expected_pageviews(traffic, HOUR)
