"""Hostile input against a running deployment with API keys: generated payloads against
every endpoint (schemathesis from the live OpenAPI document, hypothesis for event bodies and
query parameters), oversized, deeply nested and binary bodies, injection through query
parameters and SQL, path traversal in view names and event fields, missing and wrong-scope
keys. No 5xx; every refusal is a 4xx whose body names what is wrong; then the
reconciliation of the steady traffic sent meanwhile."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from harness import FULL, Lake, Traffic, reconcile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from test_fuzz import BODIES, FILTERS, QUERIES

pytestmark = [pytest.mark.kafka, pytest.mark.long]
EXAMPLES = 10_000 if FULL else 300  # in all, over the generated cases below
VIEWS = ["pageviews_by_url_hour", "revenue_by_sku_day"]


@pytest.fixture(scope="module")
def runs() -> list[Traffic]:
    return []


@pytest.fixture(scope="module")
def lake(kafka_broker, s3_server: str, tmp_path_factory: pytest.TempPathFactory):
    lake = Lake(tmp_path_factory.mktemp("hostile-lake"), kafka_broker.bootstrap, s3_server,
                with_keys=True)
    lake.start()
    yield lake
    lake.stop()


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    """One client for the thousands of generated requests (a client per request builds an
    SSL context each time: most of a request's cost here)."""
    with httpx.Client(timeout=30) as shared:
        yield shared


@pytest.fixture(scope="module")
def traffic(lake: Lake, runs: list[Traffic]):
    """Steady valid traffic for the whole module; reconciled by the last test."""
    running = Traffic(lake, 100.0, seed=71).start()
    runs.append(running)
    yield running
    running.stop()


def names_the_problem(reply: httpx.Response) -> str:
    """The refusal's explanation (the API's `errors`, the gateway's `rejected`, or one
    `error` / `message`); fails when a 4xx says nothing."""
    body = reply.json()
    errors = body.get("errors") or body.get("rejected") or [
        {"error": body.get("error") or body.get("message") or body.get("detail")}]
    said = "; ".join(f"{e.get('field') or ''}: {e.get('error') or e.get('msg')}"
                     for e in errors)
    assert all(e.get("error") or e.get("msg") for e in errors), \
        f"{reply.status_code} says nothing: {body}"
    return said


def refused(reply: httpx.Response, *statuses: int) -> str:
    assert reply.status_code < 500, f"{reply.status_code}: {reply.text[:300]}"
    assert reply.status_code in statuses, f"{reply.status_code}: {reply.text[:300]}"
    return names_the_problem(reply)


def test_bodies_oversized_nested_binary_and_traversing(lake: Lake, traffic: Traffic) -> None:
    ingest = lake.headers("ingest")
    with httpx.Client(timeout=60, headers=ingest) as client:
        oversized = client.post(lake.gateway, content=b"x" * (12 << 20))
        assert "too large" in refused(oversized, 413).lower()
        refused(client.post(lake.gateway, content=b"[" * 100_000 + b"]" * 100_000), 400)
        refused(client.post(lake.gateway, content=os.urandom(4096)), 400)
        refused(client.post(lake.gateway, json={"events": [{}] * 501}), 400, 413)
        traversal = {"event_id": "../../../etc/passwd", "type": "../../master/x",
                     "ts": int(time.time() * 1000)}
        reply = client.post(lake.gateway, json={"events": [traversal]})
        assert "type" in refused(reply, 400)
    before = set(lake.store.list(""))
    odd = {"event_id": "../../views/_current.json", "type": "pageview", "url": "/../../x",
           "user_id": "u\x00", "ts": int(time.time() * 1000)}
    reply = httpx.post(lake.gateway, json=odd, headers=ingest, timeout=30)
    assert reply.status_code in (202, 400), reply.text
    time.sleep(3)  # archived by now: no object outside the lake's own layout
    layout = ("master/", "views/", "_schemas/", "dead/", "_")
    assert all(k.startswith(layout) for k in set(lake.store.list("")) - before)


def test_keys_missing_wrong_or_of_the_wrong_scope(lake: Lake, traffic: Traffic) -> None:
    event = {"event_id": "k1", "type": "pageview", "url": "/k", "user_id": "u",
             "ts": int(time.time() * 1000)}
    view = f"{lake.api}/views/pageviews_by_url_hour"
    assert "key" in refused(httpx.post(lake.gateway, json=event), 401).lower()
    refused(httpx.post(lake.gateway, json=event, headers={"X-API-Key": "nope"}), 401)
    refused(httpx.post(lake.gateway, json=event, headers=lake.headers("query")), 403)
    refused(httpx.get(view), 401)
    refused(httpx.get(view, headers=lake.headers("ingest")), 403)


INJECTIONS = ["' OR 1=1 --", "url; DROP TABLE x", "\" UNION SELECT * FROM read_csv('/etc/passwd')",
              "${jndi:ldap://x}", "../../etc/passwd", "%00", "1e309", "-1"]


@pytest.mark.parametrize("value", INJECTIONS)
def test_injection_through_every_query_parameter(lake: Lake, traffic: Traffic, value: str) -> None:
    headers = lake.headers("query")
    for name in ["from", "to", "bucket", "group_by", "order_by", "limit", "url", "tz", "cursor",
                 "format"]:
        reply = httpx.get(f"{lake.api}/views/pageviews_by_url_hour", params={name: value},
                          headers=headers, timeout=30)
        if reply.status_code != 200:
            refused(reply, 400, 404, 422)
    for name in [value, f"..%2F..%2F{value}", "%2e%2e%2f%2e%2e%2fviews%2f_current.json"]:
        reply = httpx.get(f"{lake.api}/views/{name}", headers=headers, timeout=30)
        refused(reply, 400, 404, 422)


SQL = ["SELECT * FROM read_csv('/etc/passwd')", "COPY pageviews_by_url_hour TO '/tmp/x.csv'",
       "ATTACH '/tmp/x.db' AS x", "INSTALL httpfs", "SELECT * FROM read_parquet('s3://x/*')",
       "CREATE TABLE t AS SELECT 1", "PRAGMA enable_profiling", "SELECT 1; SELECT 2",
       "SELECT getenv('AWS_SECRET_ACCESS_KEY')", "SET memory_limit='100GB'"]


@pytest.mark.parametrize("statement", SQL)
def test_sql_that_escapes_the_sandbox_is_refused(lake: Lake, traffic: Traffic,
                                                 statement: str) -> None:
    reply = httpx.post(f"{lake.api}/sql", json={"sql": statement},
                       headers=lake.headers("query"), timeout=60)
    refused(reply, 400, 403, 422)


@settings(max_examples=EXAMPLES // 3, suppress_health_check=list(HealthCheck), database=None)
@given(body=BODIES)
@pytest.mark.usefixtures("traffic")
def test_generated_event_bodies(lake: Lake, client: httpx.Client, body: bytes) -> None:
    reply = client.post(lake.gateway, content=body, headers=lake.headers("ingest"))
    assert reply.status_code in (202, 400, 413), reply.text[:300]
    if reply.status_code != 202:
        names_the_problem(reply)


@settings(max_examples=EXAMPLES // 3, suppress_health_check=list(HealthCheck), database=None)
@given(view=st.sampled_from(VIEWS), query=QUERIES, filters=FILTERS)
@pytest.mark.usefixtures("traffic")
def test_generated_queries(lake: Lake, client: httpx.Client, view: str, query: dict[str, str],
                           filters: dict[str, str]) -> None:
    reply = client.get(f"{lake.api}/views/{view}", params=filters | query,
                       headers=lake.headers("query"))
    if reply.status_code != 200:
        refused(reply, 400, 404, 406, 422)


def test_schemathesis_against_every_operation(lake: Lake, traffic: Traffic) -> None:
    schema = schemathesis.openapi.from_url(f"{lake.api}/openapi.json",
                                           headers=lake.headers("admin"))
    operations = [result.ok() for result in schema.get_all_operations()]
    each = max(20, EXAMPLES // 3 // len(operations))
    headers = lake.headers("query") | {"content-type": "application/json"}
    for operation in operations:
        cases = st.one_of(*(operation.as_strategy(generation_mode=mode)
                            for mode in GenerationMode))

        @settings(max_examples=each, suppress_health_check=list(HealthCheck), database=None)
        @given(case=cases, view=st.sampled_from([*VIEWS, None]))
        def no_server_error(case: Any, view: str | None) -> None:
            if view and "view" in (case.path_parameters or {}):
                case.path_parameters["view"] = view
            case.headers = dict(case.headers or {}) | headers
            response = case.call()
            assert response.status_code < 500, f"{case.method} {case.formatted_path}: " \
                f"{response.status_code} {response.text[:300]}"

        no_server_error()


def test_zz_the_traffic_sent_meanwhile_reconciles(lake: Lake, traffic: Traffic,
                                                  runs: list[Traffic]) -> None:
    traffic.stop()
    reconcile(lake, runs, "hostile input", time.monotonic(), shared=True)
    print(json.dumps({"examples": EXAMPLES}))
