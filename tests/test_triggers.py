"""The triggers of the AWS Lambda model: S3 landing, SQS webhooks, DynamoDB Streams CDC, the
schedules, and API Gateway routing; each through the AWS event shape (the stored
`sam local generate-event` samples in tests/events/) and through the local runtime reading the
shipped template, against the real moto server where AWS services are involved."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from batch_lakes import published
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from lambdalake import master
from lambdalake.batch.run import BatchRefused, next_cut, run_from_settings
from lambdalake.bus import events_topic
from lambdalake.events import decode
from lambdalake.example import project
from lambdalake.functions import (
    archive,
    cdc,
    compaction,
    environment,
    heartbeat,
    ingest,
    ingest_queue,
    landing,
)
from lambdalake.functions.runtime.folder_watch import FolderWatch, s3_put_event
from lambdalake.functions.runtime.function import LocalFunction
from lambdalake.functions.runtime.local import LocalRuntime
from lambdalake.functions.runtime.mapping import kafka_event
from lambdalake.functions.runtime.table_streams import TableStreamMapping
from lambdalake.functions.runtime.template import Template, load_template
from lambdalake.settings import Settings
from lambdalake.storage import open_store
from lambdalake.viewstate import ViewState

EVENTS = Path(__file__).parent / "events"
TEMPLATE = load_template()


def sample(name: str) -> dict[str, Any]:
    return json.loads((EVENTS / f"{name}.json").read_text())


def bound(settings: Settings) -> Iterator[Settings]:
    environment.bind(settings)
    yield settings
    environment.bind(None)


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    yield from bound(Settings(home=tmp_path / "home", gateway_port=0))


@pytest.fixture
def aws(tmp_path: Path, s3_server: str) -> Iterator[Settings]:
    """Settings whose lake, landing bucket, queues and tables are on the moto server."""
    suffix = uuid.uuid4().hex[:8]
    s3 = boto3.client("s3", endpoint_url=s3_server)
    for bucket in (f"lake-{suffix}", f"landing-{suffix}"):
        s3.create_bucket(Bucket=bucket)
    yield from bound(Settings(home=tmp_path / "home", gateway_port=0,
                              store=f"s3://lake-{suffix}/lake", s3_endpoint_url=s3_server,
                              landing_url=f"s3://landing-{suffix}", aws_endpoint_url=s3_server))


def on_the_bus(settings: Settings) -> list[tuple[str, str]]:
    """(type, event_id) of every record on the embedded log, repeats included."""
    found = []
    for partition in events_topic(settings).partitions:
        found += [(e.type, e.event_id) for e in
                  (decode(r.value) for r in partition.read(0, 1_000_000))]
    return sorted(found)


def counted_once(settings: Settings) -> int:
    """Events the speed layer's fold counts: the dedup rule, (type, event_id), applied."""
    state = ViewState(project, settings.slice_ms, settings.dedup_window_ms)
    check = ingest.validator()  # the speed layer's own reading of a record
    return state.apply_all((check.validate_json(r.value, r.arrival), r.arrival)
                           for p in events_topic(settings).partitions
                           for r in p.read(0, 1_000_000))


def until(condition: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)
    return found


def only(*names: str, **queue_settings: Any) -> Template:
    """The shipped template's functions `names`, with its queues (their properties changed
    by `queue_settings`: {logical id: {field: value}}) and tables."""
    queues = {name: queue.model_copy(update=queue_settings.get(name, {}))
              for name, queue in TEMPLATE.queues.items()}
    return Template(functions={n: TEMPLATE.functions[n] for n in names}, queues=queues,
                    tables=TEMPLATE.tables)


def pageview_line(event_id: str, **fields: Any) -> str:
    return json.dumps({"event_id": event_id, "type": "pageview", "ts": "2026-11-23T10:00:00Z",
                       "url": "/home", "user_id": "u1", **fields})


# ---------------------------------------------------------------- API Gateway routing


def test_ingest_routes_on_the_route_key_on_every_stage_and_domain(settings: Settings):
    named_stage = sample("apigateway-http-api-proxy-prod-events")
    assert named_stage["rawPath"] == "/prod/events"
    assert ingest.handler(named_stage, None)["statusCode"] == 202  # $default route, stage prod
    named_route = named_stage | {"routeKey": "POST /events"}
    assert json.loads(ingest.handler(named_route, None)["body"])["accepted"] == 1
    custom_domain = named_route | {"rawPath": "/analytics/v1/events"}
    custom_domain["requestContext"] = named_route["requestContext"] | {
        "domainName": "ingest.example.com"}
    assert ingest.handler(custom_domain, None)["statusCode"] == 202
    health = named_stage | {"rawPath": "/prod/healthz"}
    health["requestContext"] = named_stage["requestContext"] | {
        "http": named_stage["requestContext"]["http"] | {"method": "GET"}}
    assert ingest.handler(health, None)["statusCode"] == 200
    assert on_the_bus(settings) == [("pageview", "sam-pv-1")] * 3
    assert counted_once(settings) == 1


def test_ingest_answers_the_default_samples_and_wrong_shapes_without_failing(settings: Settings):
    default = ingest.handler(sample("apigateway-http-api-proxy"), None)
    assert default["statusCode"] == 404  # POST /path/to/resource: no such route
    wrong = ingest.handler(sample("sqs-receive-message"), None)
    assert wrong["statusCode"] == 400
    assert "not an API Gateway HTTP API event" in json.loads(wrong["body"])["rejected"][0]["error"]


# ---------------------------------------------------------------- S3 landing


def put(aws: Settings, key: str, data: bytes) -> None:
    boto3.client("s3", endpoint_url=aws.s3_endpoint_url).put_object(
        Bucket=aws.landing_store_url.removeprefix("s3://"), Key=key, Body=data)


def rejects(settings: Settings, key: str) -> list[dict[str, Any]]:
    text = open_store(settings.store_url, settings.s3_endpoint_url).get(
        f"{landing.REJECTS}/{key}.jsonl")
    return [json.loads(line) for line in text.splitlines()]


def test_landed_files_are_imported_once_through_bucket_notifications(aws: Settings):
    lines = [pageview_line(f"pv-{i}") for i in range(3)]
    body = "\n".join([lines[0], '{"event_id": "x", "type": "pageview", "ts": 1}',
                      "not json at all", *lines[1:]]).encode()
    with LocalRuntime(aws, only("Landing")):
        put(aws, "landing/partner/day-1.jsonl", body)
        until(lambda: len(on_the_bus(aws)) == 3)
        put(aws, "landing/partner/day-1-again.jsonl", body)  # the same file, uploaded again
        changed = body + b"\n" + pageview_line("pv-3").encode()
        put(aws, "landing/partner/day-1.jsonl", changed)  # fixed and uploaded again
        until(lambda: len(on_the_bus(aws)) == 7)
        time.sleep(1.5)  # what a second upload or notification would have published by now
    environment.bind(aws)  # as the runtime had bound it
    assert len(on_the_bus(aws)) == 7  # the same file twice: once; the changed one: again
    assert counted_once(aws) == 4  # ... and every event counts once
    found = rejects(aws, "landing/partner/day-1.jsonl")
    bucket = aws.landing_store_url.removeprefix("s3://")
    assert [(r["file"], r["line"]) for r in found[:1]] == [
        (f"s3://{bucket}/landing/partner/day-1.jsonl", 2)]
    assert {r["field"] for r in found if r["line"] == 2} == {"url", "user_id"}
    assert [(r["line"], r["field"]) for r in found if r["line"] == 3] == [(3, "$")]
    assert next(r for r in found if r["line"] == 3)["rule"].startswith("not JSON")
    redelivered = sample("s3-put-landing")
    redelivered["Records"][0]["s3"]["bucket"]["name"] = bucket
    redelivered["Records"][0]["s3"]["object"]["key"] = "landing%2Fpartner%2Fday-1-again.jsonl"
    [again] = landing.handler(redelivered, None)["files"]
    assert (again["published"], again["already_imported"]) == (0, True)
    assert len(on_the_bus(aws)) == 7


def test_a_landed_file_that_keeps_failing_ends_in_the_on_failure_queue(aws: Settings):
    unavailable = aws.model_copy(update={"store": f"s3://no-such-bucket-{uuid.uuid4().hex}/x"})
    sqs = boto3.client("sqs", endpoint_url=aws.aws_endpoint_url)
    with LocalRuntime(unavailable, only("Landing")):
        failed = sqs.get_queue_url(QueueName="LandingFailures")["QueueUrl"]
        sqs.purge_queue(QueueUrl=failed)
        put(aws, "landing/stuck.jsonl", pageview_line("stuck").encode())
        [kept] = until(lambda: sqs.receive_message(QueueUrl=failed).get("Messages"))
    [record] = json.loads(kept["Body"])["Records"]
    assert unquote_plus(record["s3"]["object"]["key"]) == "landing/stuck.jsonl"
    assert on_the_bus(aws) == []  # the lake store, where imports are recorded, is down


def parquet_file(rows: list[dict[str, Any]]) -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue()


def test_a_watched_folder_imports_jsonl_gz_and_parquet_and_rejects_what_it_cannot_read(
    settings: Settings,
):
    root = Path(settings.landing_store_url.removeprefix("file://"))
    folder = root / "landing" / "partner"
    folder.mkdir(parents=True)
    (folder / "a.jsonl.gz").write_bytes(gzip.compress(pageview_line("gz-1").encode()))
    (folder / "b.parquet").write_bytes(parquet_file([
        {"event_id": "pq-1", "type": "purchase", "ts": "2026-11-23T10:00:00Z", "user_id": "u",
         "sku": "s", "amount": "9.99", "url": None},
        {"event_id": "pq-2", "type": "purchase", "ts": "2026-11-23T10:00:00Z", "user_id": "u",
         "sku": "s", "amount": "1.001", "url": None}]))
    (folder / "c.csv").write_text("event_id,type\n")
    (folder / "d.jsonl.gz").write_bytes(b"not gzip")
    (root / "elsewhere.jsonl").write_text(pageview_line("ignored"))
    function = LocalFunction(TEMPLATE.functions["Landing"])
    watch = FolderWatch(function, TEMPLATE.functions["Landing"].buckets[0], root)
    assert watch.scan() == []  # seen once: maybe still being written
    assert len(watch.scan()) == 4
    assert watch.scan() == []
    assert on_the_bus(settings) == [("pageview", "gz-1"), ("purchase", "pq-1")]
    [amount] = rejects(settings, "landing/partner/b.parquet")
    assert (amount["line"], amount["field"]) == (2, "amount")
    [csv] = rejects(settings, "landing/partner/c.csv")
    assert (csv["line"], csv["field"]) == (None, "key") and "unknown format" in csv["rule"]
    [gz] = rejects(settings, "landing/partner/d.jsonl.gz")
    assert gz["rule"].startswith("not a gzip file")
    [outside] = landing.handler(sample("s3-put"), None)["files"]  # key test/key
    assert outside["rejected"] == 1
    assert "not under the landing prefix" in rejects(settings, "test/key")[0]["rule"]


def test_the_runtime_that_up_starts_watches_the_landing_folder(
    settings: Settings,
):
    with LocalRuntime(settings, on_drained=archive.ON_DRAINED) as runtime:
        assert {type(m).__name__ for m in runtime.mappings} == {"StreamMapping", "FolderWatch"}
        drop = Path(settings.landing_store_url.removeprefix("file://")) / "landing"
        (drop / "today.jsonl").write_text(pageview_line("dropped") + "\n")
        until(lambda: on_the_bus(settings) == [("pageview", "dropped")])


def test_a_landed_file_uploaded_again_changed_counts_once_in_the_batch_view(tmp_path: Path):
    """The whole flow: landing, the bus, the archive, the heartbeat, a batch run."""
    for settings in bound(Settings(home=tmp_path / "home", slice_seconds=1)):
        root = Path(settings.landing_store_url.removeprefix("file://")) / "landing"
        root.mkdir(parents=True)
        purchases = [json.dumps({"event_id": f"buy-{i}", "type": "purchase", "user_id": "u",
                                 "ts": "2026-11-23T10:00:00Z", "sku": f"sku-{i % 2}",
                                 "amount": "2.50"}) for i in range(5)]
        for count in (3, 5):  # the first three, then the file again with two more
            (root / "orders.jsonl").write_text("\n".join(purchases[:count]))
            landing.handler(s3_put_event("landing", "landing/orders.jsonl", 0), None)
        topic = events_topic(settings)
        for partition in topic.partitions:
            if partition.end:
                archive.handler(kafka_event(settings.topic, partition.read(0, 100)), None)
        time.sleep(1.1)  # past the slice of the last arrival
        heartbeat.handler(sample("cloudwatch-scheduled-event"), None)
        store = open_store(settings.store_url)
        manifest = run_from_settings(settings, "duckdb")
        view = published(store, manifest)["revenue_by_sku_day"].to_pylist()
    assert len(on_the_bus(settings)) == 8
    assert sorted((row["sku"], row["orders"], str(row["revenue"])) for row in view) == [
        ("sku-0", 3, "7.50"), ("sku-1", 2, "5.00")]


LINES = st.sampled_from([f"e{i}" for i in range(6)] + ["not json", '{"type": "pageview"}'])


@given(files=st.lists(st.lists(LINES, min_size=1, max_size=5), min_size=1, max_size=3),
       deliveries=st.lists(st.tuples(st.integers(0, 2), st.booleans()), min_size=1,
                           max_size=6))
@hypothesis_settings(max_examples=25)
def test_any_deliveries_and_uploads_publish_each_file_once_and_count_each_event_once(
    tmp_path_factory: pytest.TempPathFactory, files: list[list[str]],
    deliveries: list[tuple[int, bool]],
):
    """Files landed, notified again and uploaded again under new names, in any order: each
    content is published once, and each valid (type, event_id) counted once."""
    home = tmp_path_factory.mktemp("landing")
    for settings in bound(Settings(home=home)):
        root = Path(settings.landing_store_url.removeprefix("file://"))
        contents = ["\n".join(pageview_line(line) if line.startswith("e") else line
                               for line in lines) for lines in files]
        delivered: set[str] = set()
        for step, (index, new_name) in enumerate(deliveries):
            content = contents[index % len(contents)]
            key = f"landing/{'upload-' + str(step) if new_name else index % len(contents)}.jsonl"
            (root / key).parent.mkdir(parents=True, exist_ok=True)
            (root / key).write_text(content)
            landing.handler(s3_put_event("landing", key, len(content)), None)
            delivered.add(content)
        valid = [[line for line in files[contents.index(c)] if line.startswith("e")]
                 for c in delivered]
        assert len(on_the_bus(settings)) == sum(len(lines) for lines in valid)
        assert counted_once(settings) == len({line for lines in valid for line in lines})


def test_landing_refuses_an_event_of_another_shape_naming_it(settings: Settings):
    with pytest.raises(ValueError, match="S3 event notification"):
        landing.handler(sample("sqs-receive-message"), None)


# ---------------------------------------------------------------- SQS webhooks


def test_queue_messages_fail_alone_and_reach_the_dead_letter_queue(aws: Settings):
    fast = {"IngestQueue": {"visibility_timeout_seconds": 1,
                            "redrive": {"deadLetterTargetArn": {"Ref": "IngestDeadLetterQueue"},
                                        "maxReceiveCount": 2}}}
    suffix = uuid.uuid4().hex[:6]
    template = only("IngestQueueFunction", **fast)
    template = template.model_copy(update={"queues": {
        name: q.model_copy(update={"name": f"{q.name}-{suffix}"})
        for name, q in template.queues.items()}})
    sqs = boto3.client("sqs", endpoint_url=aws.aws_endpoint_url)
    bodies = [pageview_line("q-1"), json.dumps({"events": [json.loads(pageview_line("q-2")),
                                                           {"type": "pageview"}]}),
              "{not json", json.dumps({"events": [json.loads(pageview_line("q-3"))]})]
    with LocalRuntime(aws, template) as runtime:
        [mapping] = [m for m in runtime.mappings if m.function.name == "IngestQueueFunction"]
        for body in bodies:
            sqs.send_message(QueueUrl=mapping.url, MessageBody=body)
        dead_letters = mapping.client.get_queue_url(
            QueueName=f"IngestDeadLetterQueue-{suffix}")["QueueUrl"]

        def in_dead_letter_queue() -> list[str]:
            return [m["Body"] for m in sqs.receive_message(
                QueueUrl=dead_letters, MaxNumberOfMessages=10,
                VisibilityTimeout=30).get("Messages", [])]

        dead: list[str] = []
        until(lambda: dead.extend(in_dead_letter_queue()) or len(dead) == 2, timeout=30)
    assert sorted(dead) == sorted(bodies[1:3])
    assert on_the_bus(aws) == [("pageview", "q-1"), ("pageview", "q-3")]  # once: never redelivered


def test_the_queue_handler_answers_partial_batch_failures_naming_the_message(
    settings: Settings,
):
    good = sample("sqs-receive-message-webhook")
    bad = sample("sqs-receive-message")  # "Hello from SQS!"
    bad["Records"][0]["messageId"] = "bad-1"
    answer = ingest_queue.handler({"Records": good["Records"] + bad["Records"]}, None)
    assert answer == {"batchItemFailures": [{"itemIdentifier": "bad-1"}]}
    assert on_the_bus(settings) == [("pageview", "sam-pv-1")]
    with pytest.raises(ingest_queue.MessageRefused, match="message bad-1: \\$: malformed JSON"):
        ingest_queue.ingest_message(ingest_queue.SQSRecord(bad["Records"][0]))


# ---------------------------------------------------------------- DynamoDB Streams CDC


def test_an_order_paid_is_one_purchase_through_replays_and_later_changes(aws: Settings):
    suffix = uuid.uuid4().hex[:6]
    orders = TEMPLATE.tables["OrdersTable"].model_copy(update={"name": f"orders-{suffix}"})
    template = only("Cdc").model_copy(update={"tables": {"OrdersTable": orders}})
    table = boto3.resource("dynamodb", endpoint_url=aws.aws_endpoint_url)
    runtime = LocalRuntime(aws, template)
    [stream] = runtime.mappings
    stream.poll_once()  # creates the table as the template declares it
    items = table.Table(orders.name)
    order = {"order_id": "o-1", "user_id": "u1", "sku": "sku-1", "amount": "19.90"}
    items.put_item(Item=order | {"status": "new"})
    items.put_item(Item=order | {"status": "paid"})
    items.put_item(Item=order | {"status": "shipped"})  # later modifications
    items.put_item(Item=order | {"status": "paid", "note": "paid twice"})
    items.put_item(Item=order | {"order_id": "o-2", "status": "paid"})  # inserted paid
    items.put_item(Item={"order_id": "o-3", "status": "paid", "user_id": "u3"})  # no sku
    while stream.poll_once():
        pass
    paid = [("purchase", "orders/order_id=o-1/paid"), ("purchase", "orders/order_id=o-2/paid")]
    assert sorted(set(on_the_bus(aws))) == paid
    assert counted_once(aws) == 2
    stream.state.delete(f"{stream.shards()[0]}.json")  # replay the stream from its start
    while stream.poll_once():
        pass
    assert sorted(set(on_the_bus(aws))) == paid and counted_once(aws) == 2
    lake = open_store(aws.store_url, aws.s3_endpoint_url)
    [rejected] = [json.loads(lake.get(key)) for key in lake.list(f"{cdc.REJECTS}/")]
    assert rejected["reason"] == "NewImage.sku: field required; NewImage.amount: field required"
    assert rejected["sequence_number"]


def test_a_change_the_function_keeps_failing_on_is_bisected_out_to_the_on_failure_file(
    aws: Settings,
):
    def fails_on_poison(event: dict[str, Any], context: Any) -> None:
        if any("poison" in r["dynamodb"]["NewImage"] for r in event["Records"]):
            raise RuntimeError("poisoned change")
        seen.extend(r["dynamodb"]["Keys"]["order_id"]["S"] for r in event["Records"])

    seen: list[str] = []
    orders = TEMPLATE.tables["OrdersTable"].model_copy(update={"name": uuid.uuid4().hex})
    spec = TEMPLATE.functions["Cdc"]
    source = spec.tables[0].model_copy(update={"max_retries": 1})
    clients = [boto3.client(s, endpoint_url=aws.aws_endpoint_url)
               for s in ("dynamodb", "dynamodbstreams")]
    stream = TableStreamMapping(LocalFunction(spec, fails_on_poison), source, orders, *clients,
                                aws.home / "runtime", backoff_seconds=0.001)
    stream.poll_once()
    items = boto3.resource("dynamodb", endpoint_url=aws.aws_endpoint_url).Table(orders.name)
    for i in range(6):
        items.put_item(Item={"order_id": f"o-{i}"} | ({"poison": True} if i == 3 else {}))
    while stream.poll_once():
        pass
    assert seen == ["o-0", "o-1", "o-2", "o-4", "o-5"]
    [failed] = [json.loads(stream.failures.get(k)) for k in stream.failures.list("")]
    assert failed["DDBStreamBatchInfo"]["batchSize"] == 1
    assert failed["error"].endswith("RuntimeError: poisoned change")


def stream_records(changes: list[tuple[int, str]]) -> list[dict[str, Any]]:
    """The DynamoDB Streams records of orders' status changes, in order."""
    records, current = [], {}
    for sequence, (order, status) in enumerate(changes, start=1):
        key = {"order_id": {"S": f"o-{order}"}}
        new = key | {"status": {"S": status}, "user_id": {"S": "u"}, "sku": {"S": "s"},
                     "amount": {"N": "4.25"}}
        change = {"Keys": key, "NewImage": new, "SequenceNumber": str(sequence),
                  "ApproximateCreationDateTime": 1_796_000_000 + sequence,
                  "StreamViewType": "NEW_AND_OLD_IMAGES"}
        if order in current:
            change["OldImage"] = current[order]
        current[order] = new
        records.append({"eventID": str(sequence), "eventSource": "aws:dynamodb",
                        "eventName": "MODIFY" if "OldImage" in change else "INSERT",
                        "eventVersion": "1.1", "awsRegion": "us-east-1", "dynamodb": change})
    return records


@given(changes=st.lists(st.tuples(st.integers(0, 3),
                                  st.sampled_from(["new", "paid", "shipped", "refunded"])),
                        min_size=1, max_size=12),
       replay_from=st.integers(0, 12), batch_size=st.integers(1, 5))
@hypothesis_settings(max_examples=30)
def test_replays_and_later_changes_never_count_an_order_twice(
    tmp_path_factory: pytest.TempPathFactory, changes: list[tuple[int, str]],
    replay_from: int, batch_size: int,
):
    """Each order that ever became paid is one purchase, however its stream is delivered:
    in batches of any size, then replayed from any point."""
    records = stream_records(changes)
    delivered = records + records[min(replay_from, len(records)):]
    for settings in bound(Settings(home=tmp_path_factory.mktemp("cdc"))):
        for start in range(0, len(delivered), batch_size):
            answer = cdc.handler({"Records": delivered[start:start + batch_size]}, None)
            assert answer == {"batchItemFailures": []}
        paid = {f"orders/order_id=o-{order}/paid" for order, status in changes
                if status == "paid"}
        assert {event_id for _, event_id in on_the_bus(settings)} == paid
        assert counted_once(settings) == len(paid)


def test_the_cdc_handler_takes_the_sample_update_and_ignores_what_is_no_payment(
    settings: Settings,
):
    assert cdc.handler(sample("dynamodb-update"), None) == {"batchItemFailures": []}
    assert on_the_bus(settings) == []
    with pytest.raises(ValueError, match="DynamoDB Streams event"):
        cdc.handler(sample("cloudwatch-scheduled-event"), None)


@pytest.mark.parametrize(("handler", "said"), [
    (ingest_queue.handler, "ingest_queue takes an SQS event: Records[0] comes from 'aws:kinesis'"),
    (cdc.handler, "cdc takes a DynamoDB Streams event: Records[0] comes from 'aws:kinesis'"),
    (landing.handler, "landing takes an S3 event notification"),
    (heartbeat.handler, "watermark_heartbeat takes an EventBridge Scheduled Event"),
    (compaction.handler, "compaction takes an EventBridge Scheduled Event"),
])
def test_an_event_of_another_trigger_is_refused_naming_what_was_expected(
    settings: Settings, handler: Callable[[Any, Any], Any], said: str,
):
    with pytest.raises(ValueError) as refused:
        handler(sample("kinesis-get-records"), None)
    assert str(refused.value).startswith(said)
    assert on_the_bus(settings) == []


# ---------------------------------------------------------------- schedules


def test_the_heartbeat_advances_idle_partitions_so_the_cut_moves(settings: Settings):
    topic = events_topic(settings)
    topic.partitions[3].append([pageview_line("only").encode()])
    archive.handler(kafka_event(settings.topic, topic.partitions[3].read(0, 10)), None)
    store = open_store(settings.store_url)
    with pytest.raises(BatchRefused, match=r"partition\(s\) 0, 1, 2"):
        next_cut(settings, store)
    topic.partitions[2].append([pageview_line("not-archived").encode()])
    advanced = heartbeat.handler(sample("cloudwatch-scheduled-event"), None)["advanced"]
    assert advanced == [0, 1, 3]  # partition 2 has a record the archive has not taken yet
    archive.handler(kafka_event(settings.topic, topic.partitions[2].read(0, 10)), None)
    marks = master.watermarks(store)
    assert sorted(marks) == [0, 1, 2, 3]
    assert next_cut(settings, store) > 0
    with pytest.raises(ValueError, match="Scheduled Event"):
        heartbeat.handler(sample("sqs-receive-message"), None)


@pytest.mark.kafka
def test_the_heartbeat_reads_kafka_partitions_ends(kafka_broker: Any, tmp_path: Path):
    for _ in bound(Settings(home=tmp_path, bus="kafka", partitions=2,
                            kafka_bootstrap=kafka_broker.bootstrap,
                            topic=f"heartbeat-{uuid.uuid4().hex[:8]}")):
        ingest.handler(sample("apigateway-http-api-proxy-prod-events"), None)
        ends = {p.index: p.end for p in heartbeat.partitions()}
        assert sorted(ends.values()) == [0, 1]
        advanced = heartbeat.handler(sample("cloudwatch-scheduled-event"), None)["advanced"]
        assert advanced == [p for p, end in ends.items() if end == 0]  # not the unarchived one


def test_the_runtime_runs_the_template_rate_schedules(settings: Settings):
    with LocalRuntime(settings, only("WatermarkHeartbeat", "Compaction", "NightlyBatch"),
                      run_schedules=True) as runtime:
        assert sorted(m.function.name for m in runtime.mappings) == [
            "Compaction", "WatermarkHeartbeat"]  # a cron(...) schedule is up's
        store = open_store(settings.store_url)
        until(lambda: sorted(master.watermarks(store)) == [0, 1, 2, 3])


def test_scheduled_compaction_runs_from_the_sample_schedule_event(settings: Settings):
    summary = compaction.handler(sample("cloudwatch-scheduled-event"), None)
    assert summary["compaction"] == {"objects_before": 0, "objects_after": 0}
    assert summary["pruned"] == {"runs": 0, "dead_letters": 0}


def test_the_ingestion_handlers_load_no_engine() -> None:
    probe = ("import sys, lambdalake.functions.ingest_queue, lambdalake.functions.cdc; "
             "print(sorted(m for m in ('pyarrow', 'duckdb', 'pyspark') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          cwd=Path(__file__).parent, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
