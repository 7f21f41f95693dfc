"""The functions and their local runtime: real HTTP through the gateway, real stream batches.

Handlers run with the settings of a temporary home (bound the way the local runtime binds
them); what they report is checked against the event log and the master dataset themselves.
"""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq
import pytest
from prometheus_client import REGISTRY

from lambdalake import master
from lambdalake.bus import events_topic
from lambdalake.eventlog import Topic, now_ms
from lambdalake.events import MAX_EVENT_BYTES, EventSchema, Validator, decode, epoch_ms
from lambdalake.example import project
from lambdalake.functions import archive, environment, ingest
from lambdalake.functions.runtime.context import LambdaContext
from lambdalake.functions.runtime.function import FunctionError, FunctionTimeout, LocalFunction
from lambdalake.functions.runtime.gateway import Gateway
from lambdalake.functions.runtime.local import LocalRuntime
from lambdalake.functions.runtime.mapping import StreamMapping, kafka_event, within_payload
from lambdalake.functions.runtime.metrics import billed_gb_seconds
from lambdalake.functions.runtime.template import FunctionSpec, StreamSource, load_template
from lambdalake.settings import Settings
from lambdalake.speed.embedded import EmbeddedSpeed
from lambdalake.storage import open_store

TOPIC = "lambdalake.events"


# ---------------------------------------------------------------- helpers and fixtures


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    settings = Settings(home=tmp_path / "home", gateway_port=0)
    environment.bind(settings)
    yield settings
    environment.bind(None)


@pytest.fixture
def gateway(settings: Settings) -> Iterator[str]:
    """The template's Ingest function behind the gateway, on a free 127.0.0.1 port."""
    server = Gateway([LocalFunction(load_template().functions["Ingest"])], "127.0.0.1", 0)
    server.start()
    yield f"{server.url}/events"
    server.stop()


def pageview(event_id: str, **fields: Any) -> dict[str, Any]:
    return {"event_id": event_id, "type": "pageview", "ts": now_ms(), "url": "/home",
            "user_id": "u1", **fields}


def purchase(event_id: str) -> dict[str, Any]:
    return {"event_id": event_id, "type": "purchase", "ts": "2026-11-23T10:00:00Z",
            "user_id": "u2", "sku": "sku-1", "amount": 9.5}


def logged(settings: Settings) -> dict[str, dict[str, Any]]:
    """Every event on the embedded log, by event id."""
    found = {}
    for partition in events_topic(settings).partitions:
        for record in partition.read(0, 1_000_000):
            found[json.loads(record.value)["event_id"]] = json.loads(record.value)
    return found


def sample(name: str, function: str) -> float:
    return REGISTRY.get_sample_value(name, {"function": function}) or 0.0


def spec(name: str, **limits: Any) -> FunctionSpec:
    return FunctionSpec(name=name, handler="tests.handler", **limits)


def stream(**options: Any) -> StreamSource:
    defaults = {"topics": [TOPIC], "batch_size": 100, "batching_window_seconds": 0,
                "max_retries": 1, "bisect_on_error": True}
    return StreamSource(**(defaults | options))


def mapping(settings: Settings, handler: Any, source: StreamSource | None = None) -> StreamMapping:
    function = LocalFunction(spec("Archive", timeout_seconds=30), handler)
    return StreamMapping(function, source or stream(), events_topic(settings),
                         settings.home / "runtime", archive.advance_watermark,
                         backoff_seconds=0.001)


def append(topic: Topic, partition: int, values: list[bytes]) -> None:
    topic.partitions[partition].append(values)


def encoded(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode()


def master_rows(settings: Settings, event_type: str) -> list[dict[str, Any]]:
    store = open_store(settings.store_url)
    rows = []
    for key in master.data_keys(store, event_type):
        rows += pq.read_table(store.arrow_path(key)).to_pylist()
    return rows


def watermarks(settings: Settings) -> dict[int, dict[str, int]]:
    return master.watermarks(open_store(settings.store_url))


# ---------------------------------------------------------------- ingestion over HTTP


def test_one_event_is_acknowledged_once_durable_on_the_log(settings: Settings, gateway: str):
    reply = httpx.post(gateway, json=pageview("e1"))
    assert reply.status_code == 202
    assert reply.json() == {"accepted": 1, "rejected": []}
    assert logged(settings)["e1"]["url"] == "/home"


def test_a_batch_names_each_rejected_event_and_keeps_the_valid_ones(
    settings: Settings, gateway: str
):
    far_future = now_ms() + 3_600_000
    batch = [
        pageview("ok-1"),
        {**pageview("bad-type"), "type": "click"},
        pageview("bad-ts", ts=far_future),
        {k: v for k, v in pageview("bad-missing").items() if k != "user_id"},
        pageview("bad-huge", url="/" + "x" * MAX_EVENT_BYTES),
        purchase("ok-2"),
    ]
    reply = httpx.post(gateway, json={"events": batch})
    assert reply.status_code == 202
    body = reply.json()
    assert body["accepted"] == 2
    assert [(r["index"], r["field"]) for r in body["rejected"]] == [
        (1, "type"), (2, "ts"), (3, "user_id"), (4, "$"),
    ]
    assert "unknown event type 'click'" in body["rejected"][0]["error"]
    assert "future" in body["rejected"][1]["error"]
    assert f"larger than {MAX_EVENT_BYTES} bytes" in body["rejected"][3]["error"]
    assert set(logged(settings)) == {"ok-1", "ok-2"}
    assert logged(settings)["ok-2"]["ts"] == epoch_ms("2026-11-23T10:00:00Z")


def test_a_valid_batch_is_stored_as_the_careful_path_stores_it(settings: Settings):
    """A batch body of valid events takes the one-call path (jiter, pydantic-core); with one
    more key it takes the careful path, event by event: the records on the bus are the same
    bytes, and a batch with one bad event is judged event by event."""
    def batch(prefix: str) -> list[dict[str, Any]]:
        return [pageview(f"{prefix}1", url="/é\t😀", referrer=None, duration_ms=-7),
                pageview(f"{prefix}2", ts="2026-11-23T10:00:00.5Z"),
                {**purchase(f"{prefix}3"), "amount": "0.10"}]

    def handle(body: dict[str, Any]) -> dict[str, Any]:
        event = {"rawPath": "/events", "requestContext": {"http": {"method": "POST"}},
                 "body": json.dumps(body)}
        return json.loads(ingest.handler(event, None)["body"])

    fast, careful = {"events": batch("fast-")}, {"events": batch("careful-"), "note": 1}
    assert ingest.all_valid(json.dumps(fast).encode(), now_ms()) is not None
    assert ingest.all_valid(json.dumps(careful).encode(), now_ms()) is None
    assert handle(fast) == handle(careful) == {"accepted": 3, "rejected": []}
    records = {json.loads(record.value)["event_id"]: record.value
               for partition in events_topic(settings).partitions
               for record in partition.read(0, 1000)}
    for n in (1, 2, 3):
        assert records[f"fast-{n}"] == records[f"careful-{n}"].replace(b"careful-", b"fast-")
    bad = {"events": [*batch("bad-"), pageview("bad-4", duration_ms=1.5)]}
    assert handle(bad)["rejected"] == [{"index": 3, "field": "duration_ms",
                                         "error": "Input should be a valid integer"}]


def test_malformed_json_is_400_naming_the_body(settings: Settings, gateway: str):
    reply = httpx.post(gateway, content=b'{"event_id": "e1", ')
    assert reply.status_code == 400
    [problem] = reply.json()["rejected"]
    assert problem["field"] == "$" and problem["error"].startswith("malformed JSON")
    assert reply.json()["accepted"] == 0


@pytest.mark.parametrize(
    ("event", "field", "error"),
    [
        ({**pageview("e1"), "type": "click"}, "type", "unknown event type"),
        (pageview("e1", ts=now_ms() + 3_600_000), "ts", "more than 300 s in the future"),
        (pageview("e1", url="/" + "x" * (300 * 1024)), "$", "larger than"),
    ],
    ids=["unknown-type", "future-ts", "event-over-256-KiB"],
)
def test_nothing_valid_is_400_with_the_same_body(
    settings: Settings, gateway: str, event: dict[str, Any], field: str, error: str
):
    reply = httpx.post(gateway, json=event)
    assert reply.status_code == 400
    assert reply.json()["accepted"] == 0
    [problem] = reply.json()["rejected"]
    assert (problem["index"], problem["field"]) == (0, field) and error in problem["error"]
    assert logged(settings) == {}


def compact(event: dict[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()


def sized(event_id: str, size: int) -> bytes:
    """A compact pageview of exactly `size` bytes, its url filled with 4-byte characters."""
    room = size - len(compact(pageview(event_id, url="")))
    return compact(pageview(event_id, url="\U0001f600" * (room // 4) + "x" * (room % 4)))


def test_the_event_size_limit_counts_the_bytes_received(settings: Settings, gateway: str):
    at, over = sized("at", MAX_EVENT_BYTES), sized("over", MAX_EVENT_BYTES + 1)
    assert httpx.post(gateway, content=at).status_code == 202
    reply = httpx.post(gateway, content=over)
    assert reply.status_code == 400
    assert reply.json()["rejected"][0]["field"] == "$"
    # in a batch, each event's own bytes: the whitespace around them is not theirs
    batch = b'{"events": [\n  ' + sized("in-1", MAX_EVENT_BYTES) + b' ,\n  ' + over + b"\n]}"
    reply = httpx.post(gateway, content=batch)
    assert (reply.status_code, reply.json()["accepted"]) == (202, 1)
    assert [(r["index"], r["field"]) for r in reply.json()["rejected"]] == [(1, "$")]
    # 360 KB of \\u escapes decoding to 120 KB of text: what arrived is too large
    escaped = compact(pageview("esc", url="")).replace(
        b'"url":""', b'"url":"' + b"\\u00e9" * 60_000 + b'"')
    reply = httpx.post(gateway, content=b'{"events": [' + escaped + b"]}")
    assert reply.status_code == 400
    assert f"larger than {MAX_EVENT_BYTES} bytes" in reply.json()["rejected"][0]["error"]
    assert set(logged(settings)) == {"at", "in-1"}


def test_an_event_whose_record_outgrows_the_limit_on_the_bus_is_refused(
    settings: Settings, gateway: str
):
    """A decimal `1E15` is written "1000000000000000.00" on the bus (exactly its scale), 17
    bytes more: the record, read back by the speed layer and the archiver, must fit the same
    limit."""
    def purchase_of(event_id: str, size: int) -> bytes:
        body = compact({**purchase(event_id), "ts": now_ms(), "user_id": "", "amount": 0})
        body = body.replace(b'"amount":0', b'"amount":1E15')
        room = size - len(body)
        user = ("\U0001f600" * (room // 4) + "u" * (room % 4)).encode()
        return body.replace(b'"user_id":""', b'"user_id":"' + user + b'"')

    assert httpx.post(gateway, content=purchase_of("fits", MAX_EVENT_BYTES - 17)).status_code == 202
    [record] = [r for p in events_topic(settings).partitions for r in p.read(0, 10)]
    assert len(record.value) == MAX_EVENT_BYTES
    reply = httpx.post(gateway, content=purchase_of("grows", MAX_EVENT_BYTES - 16))
    assert reply.status_code == 400
    assert reply.json()["rejected"][0]["error"].endswith("bytes on the bus")


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (json.dumps(pageview("u16")).encode("utf-16"), "not UTF-16"),
        (json.dumps(pageview("u16le")).encode("utf-16-le"), "not UTF-16-LE"),
        (json.dumps(pageview("u32")).encode("utf-32"), "not UTF-32"),
        (json.dumps(pageview("latin", url="/café"), ensure_ascii=False).encode("latin-1"),
         "invalid UTF-8 at byte"),
    ],
    ids=["utf-16", "utf-16-le-no-bom", "utf-32", "latin-1"],
)
def test_a_body_not_in_utf8_is_400_naming_the_encoding_rule(
    settings: Settings, gateway: str, body: bytes, error: str
):
    reply = httpx.post(gateway, content=body)
    assert reply.status_code == 400
    [problem] = reply.json()["rejected"]
    assert problem["field"] == "$" and "must be UTF-8 encoded JSON (RFC 8259)" in problem["error"]
    assert error in problem["error"]
    assert logged(settings) == {}


def test_a_utf8_byte_order_mark_is_ignored(settings: Settings, gateway: str):
    reply = httpx.post(gateway, content=b"\xef\xbb\xbf" + compact(pageview("bom", url="/é")))
    assert reply.status_code == 202
    assert logged(settings)["bom"]["url"] == "/é"


@pytest.mark.parametrize(
    ("body", "key"),
    [
        (b'{"event_id":"d1","type":"pageview","ts":0,"url":"/a","url":"/b","user_id":"u"}',
         "url"),
        (b'{"events":[{"event_id":"d2","type":"pageview","ts":0,"url":"/a","user_id":"u",'
         b'"user_id":"v"}]}', "user_id"),
        (b'{"events":[{"event_id":"d3","type":"pageview","ts":0,"url":"/","user_id":"u"}],'
         b'"events":[]}', "events"),
    ],
    ids=["in-an-event", "in-a-batch", "at-the-top"],
)
def test_duplicate_keys_are_400_naming_the_key(
    settings: Settings, gateway: str, body: bytes, key: str
):
    reply = httpx.post(gateway, content=body)
    assert reply.status_code == 400
    [problem] = reply.json()["rejected"]
    assert (problem["field"], problem["error"].split(":")[0]) == (key, f"duplicate key {key!r}")
    assert logged(settings) == {}


def test_more_than_500_events_is_413(settings: Settings, gateway: str):
    reply = httpx.post(gateway, json={"events": [pageview(f"e{i}") for i in range(501)]})
    assert reply.status_code == 413
    assert reply.json()["rejected"][0]["field"] == "events"
    assert logged(settings) == {}
    assert httpx.post(gateway, json={"events": [pageview(f"e{i}") for i in range(500)]}).json()[
        "accepted"
    ] == 500


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_over_5_mib_is_413_before_it_is_read(
    settings: Settings, gateway: str, chunked: bool
):
    body = b" " * (5 * 1024 * 1024 + 1)
    content = (body[i : i + 65536] for i in range(0, len(body), 65536)) if chunked else body
    reply = httpx.post(gateway, content=content)
    assert reply.status_code == 413
    assert httpx.post(gateway, json=pageview("after")).status_code == 202


def test_the_handler_decodes_base64_bodies_as_api_gateway_sends_them(settings: Settings):
    body = base64.b64encode(json.dumps(pageview("b64")).encode()).decode()
    event = {"rawPath": "/events", "requestContext": {"http": {"method": "POST"}},
             "body": body, "isBase64Encoded": True}
    reply = ingest.handler(event, None)
    assert reply["statusCode"] == 202 and "b64" in logged(settings)
    reply = ingest.handler(event | {"body": "%%%"}, None)
    assert reply["statusCode"] == 400 and "base64" in reply["body"]


def test_a_failing_bus_is_503_and_nothing_is_claimed(
    settings: Settings, gateway: str, monkeypatch: pytest.MonkeyPatch
):
    class BrokenBus:
        def publish(self, events: list, timeout_s: float | None = None) -> None:
            raise OSError("No space left on device")

    monkeypatch.setattr(ingest, "bus", BrokenBus)
    reply = httpx.post(gateway, json={"events": [pageview("e1"), {"type": "click"}]})
    assert reply.status_code == 503
    assert reply.json()["accepted"] == 0
    assert "No space left on device" in reply.json()["error"]


def test_health_and_unknown_routes(settings: Settings, gateway: str):
    base = gateway.removesuffix("/events")
    assert httpx.get(f"{base}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{base}/nowhere").status_code == 404
    assert httpx.get(gateway).status_code == 404  # no GET /events route


def test_the_gateway_sends_each_response_without_waiting_for_an_ack(settings: Settings):
    """TCP_NODELAY on every connection: else a response's body waits behind its headers for
    the client's delayed ACK (Nagle), 40 ms a request whatever the work."""
    server = Gateway([LocalFunction(load_template().functions["Ingest"])], "127.0.0.1", 0)
    server.start()
    client = HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        client.request("GET", "/healthz")
        assert client.getresponse().read() == b'{"status": "ok"}'
        connections = list(server._server.server_state.connections)
        sockets = [c.transport.get_extra_info("socket") for c in connections]
        assert len(sockets) == 1
        assert sockets[0].getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        client.close()
        server.stop()


# ---------------------------------------------------------------- the runtime: limits, metrics


def test_over_the_reserved_concurrency_the_gateway_answers_429(settings: Settings):
    entered, release = threading.Event(), threading.Event()

    def busy(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
        entered.set()
        release.wait(10)
        return {"statusCode": 200, "body": "done"}

    limited = spec("Busy", reserved_concurrency=1, routes=[{"Method": "POST", "Path": "/busy"}])
    server = Gateway([LocalFunction(limited, busy)], "127.0.0.1", 0)
    server.start()
    replies: list[httpx.Response] = []
    first = threading.Thread(target=lambda: replies.append(httpx.post(f"{server.url}/busy")))
    try:
        first.start()
        assert entered.wait(5)
        assert httpx.post(f"{server.url}/busy").status_code == 429
        release.set()
        first.join()
        assert replies[0].status_code == 200 and replies[0].text == "done"
        assert sample("lambdalake_function_throttles_total", "Busy") == 1
        assert sample("lambdalake_function_invocations_total", "Busy") == 1
    finally:
        release.set()
        server.stop()


def test_an_invocation_past_its_timeout_is_an_error():
    remaining: list[int] = []
    entered = threading.Event()

    def slow(event: Any, context: LambdaContext) -> None:
        remaining.append(context.get_remaining_time_in_millis())
        entered.set()
        time.sleep(2)

    function = LocalFunction(spec("Slow", timeout_seconds=0.2), slow)
    started = time.monotonic()
    with pytest.raises(FunctionTimeout, match="timed out after 0.2 s"):
        function.invoke({})
    assert time.monotonic() - started < 1.0
    assert entered.wait(5) and 0 <= remaining[0] <= 200
    assert sample("lambdalake_function_errors_total", "Slow") == 1


def test_an_environment_runs_its_invocations_in_one_thread_until_it_times_out():
    """Warm invocations run in the thread of their environment; one past its timeout is
    discarded, so the next starts cold in a new thread, and its thread ends once the handler
    returns."""
    threads: list[threading.Thread] = []
    release = threading.Event()

    def record(event: Any, context: LambdaContext) -> None:
        threads.append(threading.current_thread())
        if event == "hang":
            release.wait(5)

    function = LocalFunction(spec("Environments", timeout_seconds=0.2), record)
    function.invoke("a")
    function.invoke("b")
    with pytest.raises(FunctionTimeout):
        function.invoke("hang")
    function.invoke("c")
    assert threads[1] is threads[0] and threads[2] is threads[0]
    assert threads[3] is not threads[0]
    assert sample("lambdalake_function_cold_starts_total", "Environments") == 2
    release.set()
    threads[0].join(5)
    assert not threads[0].is_alive()


def test_what_the_first_cold_start_built_is_frozen_out_of_the_cyclic_gc():
    """Full collections skip what a process's first environment built; what a warm
    invocation leaves is collected as usual; the garbage is not frozen. In a process of its
    own: freezing is once per process."""
    script = """
import gc, weakref
from lambdalake.functions.runtime.function import LocalFunction
from lambdalake.functions.runtime.template import FunctionSpec

class Cycle:
    def __init__(self):
        self.me = self

kept, garbage = [], []
def keep(event, context):
    kept.append([event])
    garbage.append(weakref.ref(Cycle()))

function = LocalFunction(FunctionSpec(name="Frozen", handler="tests.handler"), keep)
function.invoke("cold")
function.invoke("warm")
tracked = {id(obj) for obj in gc.get_objects()}
print(id(kept[0]) in tracked, id(kept[1]) in tracked, gc.get_freeze_count() > 0,
      garbage[0]() is None, garbage[1]() is None)
gc.collect()
print(garbage[1]() is None)
"""
    ran = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, check=True)
    assert ran.stdout.split() == ["False", "True", "True", "True", "False", "True"]


def test_metrics_count_invocations_errors_cold_starts_and_billed_time():
    def answer(event: Any, context: LambdaContext) -> str:
        if event == "fail":
            raise ValueError("boom")
        assert context.function_name == "Counted" and context.memory_limit_in_mb == 2048
        assert context.invoked_function_arn.endswith(":function:Counted")
        return "ok"

    function = LocalFunction(spec("Counted", memory_mb=2048), answer)
    assert [function.invoke("x") for _ in range(3)] == ["ok"] * 3
    with pytest.raises(FunctionError, match="ValueError: boom") as failure:
        function.invoke("fail")
    assert isinstance(failure.value.__cause__, ValueError)
    assert sample("lambdalake_function_invocations_total", "Counted") == 4
    assert sample("lambdalake_function_errors_total", "Counted") == 1
    assert sample("lambdalake_function_cold_starts_total", "Counted") == 1  # then warm
    assert sample("lambdalake_function_billed_gb_seconds_total", "Counted") >= 4 * 0.001 * 2
    assert billed_gb_seconds(0.0101, 1024) == pytest.approx(0.011)


def test_the_template_declares_the_functions_and_their_triggers(tmp_path: Path):
    functions = load_template().functions
    assert [r.key for r in functions["Ingest"].routes] == ["POST /events", "GET /healthz"]
    [source] = functions["Archive"].streams
    assert (source.topic, source.batch_size, source.batching_window_seconds) == (TOPIC, 10000, 1)
    assert functions["Archive"].handler == archive.__name__ + ".handler"

    other = tmp_path / "template.yaml"
    other.write_text(
        "Globals: {Function: {Timeout: 7}}\n"
        "Resources:\n"
        "  Nightly:\n"
        "    Type: AWS::Serverless::Function\n"
        "    Properties:\n"
        "      Handler: batch.nightly.handler\n"
        "      Environment: {Variables: {BUCKET: !Ref Bucket}}\n"
        "      Events: {Night: {Type: Schedule, Properties: {Schedule: 'cron(0 2 * * ? *)'}}}\n"
        "  Bucket: {Type: AWS::S3::Bucket}\n"
    )
    [nightly] = load_template(other).functions.values()
    assert (nightly.timeout_seconds, nightly.memory_mb, nightly.reserved_concurrency) == (7, 128,
                                                                                         None)
    assert [s.expression for s in nightly.schedules] == ["cron(0 2 * * ? *)"]


def test_a_batch_is_cut_where_its_event_would_pass_the_6_mb_payload_limit():
    mib = b"x" * 2**20  # 1,398,104 bytes in base64: four (with their JSON) fit in 6 MiB
    assert within_payload([mib] * 8, lambda data: data, 160) == [mib] * 4
    alone = b"x" * 7 * 2**20
    assert within_payload([alone, mib], lambda data: data, 160) == [alone]  # at least one


# ---------------------------------------------------------------- archiving


def test_published_events_are_archived_as_parquet_with_watermarks(settings: Settings):
    sent = [pageview(f"pv-{i}", duration_ms=i) for i in range(40)]
    sent += [purchase(f"buy-{i}") for i in range(10)]
    with LocalRuntime(settings, on_drained=archive.ON_DRAINED) as runtime:
        reply = httpx.post(f"{runtime.gateway.url}/events", json={"events": sent})
        assert reply.json()["accepted"] == 50
        deadline = time.monotonic() + 20
        while len(master_rows(settings, "pageview")) + len(master_rows(settings, "purchase")) < 50:
            assert time.monotonic() < deadline, "not archived in time"
            time.sleep(0.1)
    pageviews = {r["event_id"]: r for r in master_rows(settings, "pageview")}
    assert sorted(pageviews) == sorted(e["event_id"] for e in sent[:40])
    assert all(pageviews[f"pv-{i}"]["duration_ms"] == i for i in range(40))
    assert {r["event_id"] for r in master_rows(settings, "purchase")} == {
        f"buy-{i}" for i in range(10)
    }
    ends = {p.index: p.end for p in events_topic(settings).partitions}
    marks = watermarks(settings)
    assert {p: m["next_offset"] for p, m in marks.items()} == ends
    arrivals = [r["arrival"] for r in master_rows(settings, "pageview")]
    assert min(m["watermark"] for m in marks.values()) >= min(arrivals)


def test_a_retried_batch_rewrites_the_same_objects(settings: Settings):
    topic = events_topic(settings)
    append(topic, 0, [encoded(pageview(f"e{i}")) for i in range(5)] + [encoded(purchase("b"))])
    event = kafka_event(TOPIC, topic.partitions[0].read(0, 100))
    first = archive.handler(event, None)
    files = sorted(p for p in (settings.home / "lake").rglob("*") if p.is_file())
    again = archive.handler(event, None)
    assert first == again and first["archived"] == 6
    assert sorted(p for p in (settings.home / "lake").rglob("*") if p.is_file()) == files
    assert len(master_rows(settings, "pageview")) == 5


def test_the_mapping_retry_after_a_failure_does_not_duplicate(settings: Settings):
    failures = iter([RuntimeError("store went away after writing")])

    def flaky(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
        summary = archive.handler(event, context)
        if failure := next(failures, None):
            raise failure
        return summary

    append(events_topic(settings), 1, [encoded(pageview(f"e{i}")) for i in range(8)])
    runner = mapping(settings, flaky)
    assert runner.poll_once() == 8
    keys = master.data_keys(open_store(settings.store_url), "pageview")
    assert keys == [master.object_key("pageview", 1, 0, 7)]
    assert len(master_rows(settings, "pageview")) == 8
    assert events_topic(settings).committed(runner.group)[1] == 8


def test_a_poisoned_record_is_bisected_out_and_the_rest_archived(settings: Settings):
    def fussy(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
        for records in event["records"].values():
            if any(b"poison" in base64.b64decode(r["value"]) for r in records):
                raise ValueError("cannot handle poison")
        return archive.handler(event, context)

    values = [encoded(pageview(f"e{i}")) for i in range(16)]
    values[5] = encoded(pageview("poison"))
    append(events_topic(settings), 0, values)
    runner = mapping(settings, fussy)
    before = sample("lambdalake_function_on_failure_records_total", "Archive")
    assert runner.poll_once() == 16
    assert {r["event_id"] for r in master_rows(settings, "pageview")} == {
        f"e{i}" for i in range(16) if i != 5
    }
    assert runner.positions[0] == 16
    assert events_topic(settings).committed(runner.group)[0] == 16
    [failed] = (settings.home / "runtime" / "on_failure" / "Archive").rglob("*.json")
    sent = json.loads(failed.read_text())
    assert sent["KafkaBatchInfo"]["firstOffset"] == sent["KafkaBatchInfo"]["lastOffset"] == 5
    assert "cannot handle poison" in sent["error"]
    [record] = sent["payload"]["records"][f"{TOPIC}-0"]
    assert decode(base64.b64decode(record["value"])).event_id == "poison"
    assert sample("lambdalake_function_on_failure_records_total", "Archive") == before + 1


def test_invalid_records_on_the_bus_are_dead_lettered_not_blocking(settings: Settings):
    append(events_topic(settings), 2, [
        encoded(pageview("good-1")),
        b"\xff not json",
        encoded({**pageview("odd"), "type": "click"}),
        encoded(pageview("good-2")),
    ])
    before = REGISTRY.get_sample_value("lambdalake_archive_records_total",
                                       {"outcome": "dead_letter"}) or 0
    assert mapping(settings, archive.handler).poll_once() == 4
    assert {r["event_id"] for r in master_rows(settings, "pageview")} == {"good-1", "good-2"}
    store = open_store(settings.store_url)
    key = f"{archive.DEAD_LETTER}/p=2/{0:020d}-{3:020d}.jsonl"
    dead = [json.loads(line) for line in store.get(key).splitlines()]
    assert [d["offset"] for d in dead] == [1, 2]
    assert "not JSON" in dead[0]["reason"]
    assert "unknown event type 'click'" in dead[1]["reason"]
    assert base64.b64decode(dead[0]["value"]) == b"\xff not json"
    assert REGISTRY.get_sample_value("lambdalake_archive_records_total",
                                     {"outcome": "dead_letter"}) == before + 2
    assert watermarks(settings)[2]["next_offset"] == 4


def until(condition: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not in time"
        time.sleep(0.02)


def dead_letters(settings: Settings, partition: int) -> list[dict[str, Any]]:
    store = open_store(settings.store_url)
    return [json.loads(line) for key in store.list(f"{archive.DEAD_LETTER}/p={partition}/")
            for line in store.get(key).splitlines()]


@pytest.mark.parametrize("retries", [-1, 0, 2])
def test_a_poison_record_never_blocks_its_partition_whatever_the_retries(
    settings: Settings, retries: int
):
    """A 2^63 duration (the master dataset's column is int64) written straight to the bus is
    dead-lettered with its reason; the watermark passes it and later events are archived."""
    topic = events_topic(settings)
    poison = pageview("poison", duration_ms=2**63)
    append(topic, 0, [encoded(pageview("before")), encoded(poison), encoded(pageview("after"))])
    runner = mapping(settings, archive.handler, stream(max_retries=retries, bisect_on_error=False))
    runner.start()
    try:
        until(lambda: watermarks(settings).get(0, {}).get("next_offset") == 3)
        append(topic, 0, [encoded(pageview("later"))])
        until(lambda: watermarks(settings)[0]["next_offset"] == 4)
    finally:
        runner.stop()
    assert {r["event_id"] for r in master_rows(settings, "pageview")} == {
        "before", "after", "later"}
    [dead] = dead_letters(settings, 0)
    assert dead["offset"] == 1 and "duration_ms: must be a 64-bit integer" in dead["reason"]
    assert json.loads(base64.b64decode(dead["value"])) == poison
    assert not list((settings.home / "runtime").rglob("*.json"))  # the handler never failed


def test_the_embedded_speed_layer_counts_exactly_what_the_archiver_archives(
    settings: Settings
):
    topic = events_topic(settings)
    append(topic, 0, [encoded(pageview("ok-1")), encoded(pageview("big", duration_ms=2**63)),
                      encoded(pageview("nul", url="/a\x00")), encoded(pageview("ok-2"))])
    speed = EmbeddedSpeed(settings, project, topic, open_store(settings.store_url),
                          lambda updates, caught_up_at: None)
    speed.poll_once()
    summary = archive.handler(kafka_event(TOPIC, topic.partitions[0].read(0, 10)), None)
    assert (summary["archived"], summary["dead_lettered"]) == (2, 2)
    assert speed.state.tracked_ids == 2


OLDER_PAGEVIEW = EventSchema("pageview", {"url": "string", "user_id": "string",
                                          "referrer": "string?", "duration_ms": "string?"})


def test_a_row_its_column_cannot_hold_is_dead_lettered_and_the_rest_archived(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
):
    """Rows a validator accepted but the master dataset's columns cannot hold (here its
    validator is of an older project version, where `duration_ms` was text) are found one
    by one, dead-lettered with the column and why, and never retried, even with retries
    unbounded."""
    current = archive.Archiver.from_settings(settings)
    older = archive.Archiver(current.store, current.schemas,
                             Validator({**current.schemas, "pageview": OLDER_PAGEVIEW}, 300_000))
    monkeypatch.setattr(archive, "archiver", lambda: older)
    values = [encoded(pageview(f"e{i}")) for i in range(6)]
    values[1] = encoded(pageview("slow", duration_ms="slow"))
    values[4] = encoded(pageview("long", duration_ms="1200"))
    values.append(encoded(purchase("buy")))
    append(events_topic(settings), 3, values)
    runner = mapping(settings, archive.handler, stream(max_retries=-1))
    runner.start()
    try:
        until(lambda: watermarks(settings).get(3, {}).get("next_offset") == 7)
    finally:
        runner.stop()
    assert sorted(r["event_id"] for r in master_rows(settings, "pageview")) == [
        "e0", "e2", "e3", "e5"]
    assert [r["event_id"] for r in master_rows(settings, "purchase")] == ["buy"]
    dead = dead_letters(settings, 3)
    assert [d["offset"] for d in dead] == [1, 4]
    assert all(d["reason"].startswith("duration_ms: cannot be stored as int64") for d in dead)


def test_idle_partitions_get_their_watermark_advanced(settings: Settings):
    topic = events_topic(settings)
    append(topic, 3, [encoded(pageview("only"))])
    started = now_ms()
    runner = mapping(settings, archive.handler)
    runner.poll_once()  # archives partition 3; seals and marks the idle ones
    first = watermarks(settings)
    assert sorted(first) == [0, 1, 2, 3]
    assert all(first[p] == {"next_offset": 0, "watermark": first[p]["watermark"]} for p in range(3))
    assert all(first[p]["watermark"] >= started for p in range(3))
    time.sleep(1.1)
    runner.poll_once()  # partition 3 is drained now too
    later = watermarks(settings)
    assert all(later[p]["watermark"] > first[p]["watermark"] for p in range(4))
    assert later[3]["next_offset"] == 1


def test_a_watermark_never_moves_back(settings: Settings):
    archive.advance_watermark(0, 10, 5_000)
    archive.advance_watermark(0, 4, 2_000)  # a late retry of an older batch
    assert watermarks(settings)[0] == {"next_offset": 10, "watermark": 5_000}
    archive.advance_watermark(0, 10, 6_000)  # the same offset, sealed later
    assert watermarks(settings)[0] == {"next_offset": 10, "watermark": 6_000}
