"""The serving API over real HTTP: batch(cut C) ⊕ real-time cells ≥ C, checked against a
recompute from the raw events.

Each test runs uvicorn in a thread on a free 127.0.0.1 port over a temporary FileStore. Batch
versions are published by hand with the catalog functions: Parquet in `table_schema` shape,
aggregated here independently of the kernel's view state (sketches with the monoid's
lift/merge), split over two files so the same cell arrives in parts. Real-time cells come
from the kernel's ViewState fed the same events with their arrival times.
"""

from __future__ import annotations

import random
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from exact import exact_quantiles
from hypothesis import given, settings
from hypothesis import strategies as st

from lambdalake import catalog
from lambdalake.eventlog import now_ms
from lambdalake.events import Event, epoch_ms, iso
from lambdalake.example import project
from lambdalake.realtime import RealtimeCells
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


def purchase(number: int, sku: str, amount: float, ts: int) -> Event:
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
        event = purchase(number, rng.choice(SKUS), rng.randrange(1, 400) / 4, ts)
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


def expected_revenue(records: list[Record]) -> dict[str, tuple[float, int]]:
    totals: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for event, _ in records:
        if event.type == "purchase":
            totals[event.fields["sku"]][0] += event.fields["amount"]
            totals[event.fields["sku"]][1] += 1
    return {sku: (revenue, orders) for sku, (revenue, orders) in totals.items()}


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


def test_a_new_version_drops_the_cells_below_its_cut(served: Lake, traffic: list[Record]) -> None:
    state = speed_layer(traffic)
    publish(served.store, "v2", CUT_2, traffic)
    assert served.wait_for_version("v2")["cut"] == iso(CUT_2)
    assert served.realtime.cut == CUT_2
    past_cut = sum(1 for cells in state.cells.values() for cell in cells if cell[0] >= CUT_2)
    assert metric(served, "lambdalake_serving_realtime_cells") == past_cut
    assert answered(served.rows()) == expected_pageviews(traffic, HOUR)
    served.realtime.upsert(state.everything())  # a late resend of slices the batch covers
    assert answered(served.rows()) == expected_pageviews(traffic, HOUR)


def test_a_version_that_fails_to_load_leaves_the_last_one_serving(served: Lake) -> None:
    before = served.rows(bucket="total")
    broken = catalog.Manifest(
        version="v2", cut=CUT_2, created=iso(now_ms()), engine="test", rows_read=0,
        views={PAGEVIEWS.name: catalog.ViewFiles(files=["views/missing.parquet"], rows=0)},
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
        ({"from": "2026-11-23T10:30:00Z"}, "from", "boundary"),
        ({"to": "yesterday"}, "to", "ISO 8601"),
        ({"from": "2026-11-23T10:00:00Z", "to": "2026-11-23T09:00:00Z"}, "to", "after"),
        ({"bucket": "week"}, "bucket", "one of"),
        ({"bucket": "minute"}, "bucket", "finer"),
        ({"group_by": "url,country"}, "group_by", "country"),
        ({"country": "NZ"}, "country", "not a dimension"),
        ({"order_by": "revenue"}, "order_by", "metric"),
        ({"limit": "0"}, "limit", "between"),
        ({"limit": "ten"}, "limit", "integer"),
        ([("url", "/home"), ("url", "/docs")], "url", "more than once"),
    ],
)
def test_bad_query_parameters_are_400_naming_the_field(
    lake: Lake, params: Any, field: str, rule: str
) -> None:
    reply = lake.client.get(f"/views/{PAGEVIEWS.name}", params=params)
    assert rule in assert_errors(reply, 400, field)


def test_unknown_view_and_path_are_404(lake: Lake) -> None:
    error = assert_errors(lake.get("/views/nope"), 404, "view")
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
    assert metric(served, "lambdalake_serving_requests_total", **route, status="200") >= 1
    assert metric(served, "lambdalake_serving_requests_total", **route, status="404") == 1
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
        fields = {"user_id": f"u{rng.randrange(10, 30)}", "sku": rng.choice(SKUS), "amount": 1.0}
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
