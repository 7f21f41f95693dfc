"""The Python client over real HTTP: events sent through `lambdalake up`'s gateway come back
in its answers (rows, Arrow), SQL answers, and back-pressure waits out 429s."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest
from test_flow import Flow
from test_serving import (
    CUT_1,
    HOUR,
    PAGEVIEWS,
    answered,
    expected_pageviews,
    publish,
    speed_layer,
    start_lake,
    web_traffic,
)

from lambdalake.client import Client, LambdalakeError
from lambdalake.eventlog import now_ms


def test_round_trip_through_lambdalake_up(tmp_path: Path) -> None:
    flow = Flow(tmp_path)
    flow.start()
    try:
        events = [{"type": "pageview", "ts": now_ms(), "url": f"/{i % 3}", "user_id": f"u{i}"}
                  for i in range(250)]
        with Client(flow.gateway.removesuffix("/events"), api_url=flow.api,
                    batch_size=40) as lake:
            assert lake.send(events) == 250  # seven batches, each event given an event_id
            expected = Counter(e["url"] for e in events)
            deadline, rows = time.monotonic() + 20, []
            while time.monotonic() < deadline:
                rows = lake.query(PAGEVIEWS.name, bucket="total", group_by="url")
                if {r["url"]: r["pageviews"] for r in rows} == expected:
                    break
                time.sleep(0.2)
            assert {r["url"]: r["pageviews"] for r in rows} == expected
            table = lake.query(PAGEVIEWS.name, as_="arrow", bucket="total", url=["/0", "/1"])
            assert isinstance(table, pa.Table)
            assert dict(zip(table.column("url").to_pylist(),
                            table.column("pageviews").to_pylist(), strict=True)) == {
                "/0": expected["/0"], "/1": expected["/1"]}
            answer = lake.sql("SELECT sum(pageviews) AS n FROM pageviews_by_url_hour")
            assert answer["rows"] == [[250]]
            with pytest.raises(LambdalakeError) as refused:
                lake.query(PAGEVIEWS.name, bucket="week")
            assert refused.value.status == 400 and refused.value.errors[0]["field"] == "bucket"
    finally:
        flow.stop()


def test_query_follows_pages_and_waits_out_the_rate_limit(tmp_path: Path) -> None:
    traffic = web_traffic()
    with start_lake(tmp_path, api_keys=["k1"], api_rate_per_key=5, api_burst_per_key=1) as lake:
        lake.realtime.upsert(speed_layer(traffic).drain())
        publish(lake.store, "v1", CUT_1, traffic)
        lake.wait_for_version("v1")
        with Client(lake.server.url, "k1") as client:
            began = time.monotonic()
            top = client.query(PAGEVIEWS.name, limit=7, order_by="pageviews")  # the top N only
            rows = client.query(PAGEVIEWS.name, url_prefix="/", limit=None)
            paged = []
            for _ in range(3):  # past the rate: each waits for Retry-After and succeeds
                paged.append(client.query(PAGEVIEWS.name, bucket="total"))
            assert time.monotonic() - began >= 0.4
        assert answered(rows) == expected_pageviews(traffic, HOUR)
        assert len(top) == 7 and top[0]["pageviews"] == max(r["pageviews"] for r in rows)
        assert paged[0] == paged[-1] and len(paged[0]) == 3
