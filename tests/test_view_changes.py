"""Views change while the system runs: add, remove, and change a view's keys, bucket, filter
and metrics, with a restart of `lambdalake up` in between, on the embedded bus and on Kafka
(either speed driver).

The project is a module written to a temporary folder (LAMBDALAKE_PROJECT, PYTHONPATH) from
plain view specs; the test recomputes every view from the same specs by hand, from the raw
events sent. Before the restart a batch version is published with the old definitions and
more events follow it, so the first answers after the restart need the batch layer to stop
serving old tables and the speed layer to rebuild the changed views from the bus.
"""

from __future__ import annotations

import json
import operator
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_flow import Flow, batch_run, send_synthetic

from lambdalake.events import epoch_ms
from lambdalake.views import BUCKET_MS

Spec = dict[str, Any]
DECIMAL = re.compile(r"-?\d+\.\d+")
KEPT = {"type": "pageview", "keys": ["url"], "bucket": "hour",
        "metrics": {"pageviews": ["count", None], "visitors": ["distinct", "user_id"]}}
BEFORE: dict[str, Spec] = {
    "pageviews_by_url_hour": KEPT,
    "orders_by_sku_day": {"type": "purchase", "keys": ["sku"], "bucket": "day",
                          "metrics": {"orders": ["count", None]}},
    "views_by_page": {"type": "pageview", "keys": ["url"], "bucket": "hour",
                      "metrics": {"views": ["count", None]}},
    "views_by_referrer": {"type": "pageview", "keys": ["referrer"], "bucket": "hour",
                          "metrics": {"views": ["count", None]}},
    "long_views": {"type": "pageview", "keys": ["url"], "bucket": "day",
                   "where": [["duration_ms", ">=", 20000]], "metrics": {"views": ["count", None]}},
    "revenue_by_sku": {"type": "purchase", "keys": ["sku"], "bucket": "day",
                       "metrics": {"revenue": ["sum", "amount"]}},
}
AFTER: dict[str, Spec] = {
    "pageviews_by_url_hour": KEPT,  # unchanged; orders_by_sku_day removed
    "views_by_page": BEFORE["views_by_page"] | {"keys": ["url", "referrer"]},
    "views_by_referrer": BEFORE["views_by_referrer"] | {"bucket": "minute"},
    "long_views": BEFORE["long_views"] | {"where": [["duration_ms", "<", 5000]]},
    "revenue_by_sku": BEFORE["revenue_by_sku"] | {"metrics": {
        "revenue": ["sum", "amount"], "orders": ["count", None], "top": ["max", "amount"]}},
    "buyers_by_sku": {"type": "purchase", "keys": ["sku"], "bucket": "day",  # added
                      "metrics": {"buyers": ["distinct", "user_id"], "orders": ["count", None]}},
}
MODULE = '''
import json
from lambdalake.example import PAGEVIEW, PURCHASE
from lambdalake.monoids import ApproxDistinct, Count, Max, Sum
from lambdalake.project import Project
from lambdalake.views import Condition, View

KINDS = {"count": Count, "sum": Sum, "max": Max, "distinct": ApproxDistinct}
SPECS = json.loads(%r)
project = Project.of([PAGEVIEW, PURCHASE], [
    View(name, s["type"], tuple(s["keys"]), s["bucket"],
         {m: KINDS[kind](field) for m, (kind, field) in s["metrics"].items()},
         tuple(Condition(*c) for c in s.get("where", ())))
    for name, s in SPECS.items()
])
'''
OPS = {"<": operator.lt, ">=": operator.ge}


@pytest.fixture
def flow(tmp_path: Path) -> Iterator[Flow]:
    flow = Flow(tmp_path)
    yield flow
    flow.stop()


def write_project(folder: Path, specs: dict[str, Spec]) -> None:
    (folder / "changing_views.py").write_text(MODULE % json.dumps(specs))


def recompute(specs: dict[str, Spec], events: list[dict[str, Any]]) -> dict[str, Any]:
    """Every view by hand: the first copy of each (type, event_id), filtered, bucketed."""
    firsts: dict[tuple[str, str], dict[str, Any]] = {}
    for event in events:
        firsts.setdefault((event["type"], event["event_id"]), event)
    answers: dict[str, Any] = {}
    for name, spec in specs.items():
        rows: dict[tuple[Any, ...], dict[str, Any]] = {}
        for event in firsts.values():
            where = spec.get("where", ())
            if event["type"] != spec["type"] or not all(
                event.get(f) is not None and OPS[op](event[f], v) for f, op, v in where
            ):
                continue
            size = BUCKET_MS[spec["bucket"]]
            row = rows.setdefault((event["ts"] - event["ts"] % size,
                                   *(event.get(k) for k in spec["keys"])), {})
            for metric, (kind, field) in spec["metrics"].items():
                value = exact(event.get(field)) if field else None
                if kind == "count":
                    row[metric] = row.get(metric, 0) + 1
                elif kind == "sum":
                    row[metric] = row.get(metric, 0) + value
                elif kind == "max":
                    row[metric] = max(row.get(metric, value), value)
                else:
                    row[metric] = row.get(metric, set()) | {value}
        answers[name] = {key: {m: len(v) if isinstance(v, set) else v for m, v in row.items()}
                         for key, row in rows.items()}
    return answers


def exact(value: Any) -> Any:
    """A decimal (the example's amount, sent and answered as its text) as a Decimal."""
    return Decimal(value) if isinstance(value, str) and DECIMAL.fullmatch(value) else value


def answered(flow: Flow, specs: dict[str, Spec]) -> dict[str, Any]:
    answers = {}
    for name, spec in specs.items():
        reply = httpx.get(f"{flow.api}/views/{name}", timeout=30)
        assert reply.status_code == 200, reply.text
        answers[name] = {
            (epoch_ms(row["bucket"]), *(row[k] for k in spec["keys"])):
                {m: exact(row[m]) for m in spec["metrics"]}
            for row in reply.json()["rows"]
        }
    return answers


def same(got: dict[str, Any], want: dict[str, Any]) -> bool:
    return got.keys() == want.keys() and all(
        got[v].keys() == want[v].keys()
        and all(got[v][k] == pytest.approx(want[v][k], rel=1e-9) for k in want[v])
        for v in want
    )


def wait_exact(flow: Flow, specs: dict[str, Spec], events: list[dict[str, Any]]) -> None:
    want = recompute(specs, events)
    deadline = time.monotonic() + 90
    while not same(answered(flow, specs), want):
        assert time.monotonic() < deadline, "the answers never equalled the recompute"
        time.sleep(0.2)


BUSES = [
    pytest.param("embedded", id="embedded"),
    *(pytest.param(engine, id=f"kafka-{engine}", marks=[
        pytest.mark.kafka,
        pytest.mark.skipif(not shutil.which("java"), reason="needs Java 17+"),
        pytest.mark.long])  # on Kafka: under make test-long
      for engine in ("quix", "faust")),
]


@pytest.mark.parametrize("bus", BUSES)
def test_views_added_removed_and_changed_are_exact_from_the_first_query_after_a_restart(
    flow: Flow, tmp_path: Path, request: pytest.FixtureRequest, bus: str
) -> None:
    folder = tmp_path / "project"
    folder.mkdir()
    flow.env |= {"PYTHONPATH": str(folder), "PYTHONDONTWRITEBYTECODE": "1",
                 "LAMBDALAKE_PROJECT": "changing_views:project"}
    args: list[str] = []
    if bus != "embedded":
        broker = request.getfixturevalue("kafka_broker")
        flow.env |= {"LAMBDALAKE_TOPIC": f"views-{uuid.uuid4().hex[:10]}",
                     "LAMBDALAKE_SPEED_ENGINE": bus}
        args = ["--bus", "kafka", "--bootstrap", broker.bootstrap]
    write_project(folder, BEFORE)
    flow.start(*args)
    events = send_synthetic(flow, 1_500, seed=21)
    wait_exact(flow, BEFORE, events)
    time.sleep(1.5)  # let the archiver pass a slice boundary
    batch_run(flow)  # a version computed with the old definitions
    events += send_synthetic(flow, 1_000, seed=22)
    wait_exact(flow, BEFORE, events)
    flow.stop()

    write_project(folder, AFTER)
    flow.start(*args)
    assert same(answered(flow, AFTER), recompute(AFTER, events))  # the first answers
    removed = httpx.get(f"{flow.api}/views/orders_by_sku_day")
    assert removed.status_code == 400 and removed.json()["errors"][0]["field"] == "view"
    events += send_synthetic(flow, 500, seed=23)
    wait_exact(flow, AFTER, events)
    time.sleep(1.5)
    batch_run(flow)  # the new definitions, from the master dataset
    assert same(answered(flow, AFTER), recompute(AFTER, events))
