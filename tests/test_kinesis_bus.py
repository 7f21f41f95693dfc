"""Kinesis as the bus, on moto's Kinesis (the `s3_server` fixture): ingestion publishes with
PutRecords keyed by event_id within the API's limits and retries only what a partial failure
left out; the kernel's reader (lineage, iterators, the end of a closed shard, arrival) and
the KPL aggregated format.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import settings as examples
from hypothesis import strategies as st

from lambdalake import kinesis
from lambdalake.bus import BusError, open_bus, put_all, put_batches
from lambdalake.eventlog import now_ms
from lambdalake.events import Event, Validator
from lambdalake.example import project
from lambdalake.functions import environment, ingest
from lambdalake.functions.runtime.function import LocalFunction
from lambdalake.functions.runtime.gateway import Gateway
from lambdalake.functions.runtime.template import load_template
from lambdalake.settings import Settings

pytestmark = pytest.mark.s3
VALIDATOR = Validator(project.schemas, 300_000)


@pytest.fixture
def settings(s3_server: str, tmp_path: Path) -> Iterator[Settings]:
    settings = Settings(home=tmp_path, bus="kinesis", kinesis_stream=f"b{time.time_ns()}",
                        partitions=2, kinesis_endpoint_url=s3_server, gateway_port=0)
    environment.bind(settings)
    yield settings
    environment.bind(None)


def client(settings: Settings) -> Any:
    return kinesis.client(settings.kinesis_endpoint_url)


def on_stream(settings: Settings) -> list[kinesis.KinesisRecord]:
    found = []
    for shard in kinesis.list_shards(client(settings), settings.kinesis_stream):
        reader = kinesis.ShardReader(client(settings), settings.kinesis_stream, shard,
                                     kinesis.Position.trim_horizon())
        found += list(kinesis.read_until_quiet(reader))
    return found


def pageview(event_id: str, **fields: Any) -> dict[str, Any]:
    return {"event_id": event_id, "type": "pageview", "ts": now_ms(), "url": "/home",
            "user_id": "u1", **fields}


def event(raw: dict[str, Any]) -> Event:
    result = VALIDATOR.validate(raw, now_ms())
    assert isinstance(result, Event), result
    return result


# ---------------------------------------------------------------- ingestion


def test_ingest_answers_202_once_every_event_is_on_the_stream_keyed_by_event_id(
        settings: Settings):
    server = Gateway([LocalFunction(load_template().functions["Ingest"])], "127.0.0.1", 0)
    server.start()
    try:
        batch = [pageview(f"e{i}") for i in range(20)] + [{"type": "pageview"}]
        reply = httpx.post(f"{server.url}/events", json={"events": batch})
    finally:
        server.stop()
    assert reply.status_code == 202
    assert reply.json()["accepted"] == 20 and len(reply.json()["rejected"]) >= 1
    records = on_stream(settings)
    assert sorted(r.partition_key for r in records) == sorted(f"e{i}" for i in range(20))
    for record in records:
        assert json.loads(record.data)["event_id"] == record.partition_key
    assert len({r.shard_id for r in records}) == 2


def test_publish_splits_requests_within_the_put_records_limits(settings: Settings):
    text = "x" * 60_000
    big = [event(pageview(f"big{i}", url=text, user_id=text, referrer=text))
           for i in range(30)]
    small = [event(pageview(f"s{i}")) for i in range(1_100)]
    entries = [{"Data": e.to_json(), "PartitionKey": e.event_id} for e in big + small]
    batches = put_batches(entries)
    sizes = [sum(len(e["Data"]) + len(e["PartitionKey"]) for e in b) for b in batches]
    assert len(batches[0]) < len(big)  # cut by bytes
    assert sizes[0] + len(entries[len(batches[0])]["Data"]) > kinesis.MAX_PUT_BYTES
    assert kinesis.MAX_PUT_RECORDS in [len(b) for b in batches]  # and by records
    assert max(sizes) <= kinesis.MAX_PUT_BYTES
    assert [e for b in batches for e in b] == entries
    open_bus(settings).publish(big + small)  # moto refuses a request past either limit
    assert len(on_stream(settings)) == len(big) + len(small)


def test_concurrent_publishes_go_out_together_and_every_event_is_on_the_stream(
        settings: Settings):
    """One PutRecords in flight per stream: the publishes made while it is (here held 0.5 s)
    go out in the next call, together, and each returns once its own events are stored."""
    bus = open_bus(settings)
    calls: list[int] = []

    def held_first(params: dict[str, Any], **_: Any) -> None:
        calls.append(len(params["Records"]))
        if len(calls) == 1:
            time.sleep(0.5)

    bus.kinesis.meta.events.register("provide-client-params.kinesis.PutRecords", held_first)
    try:
        batches = [[event(pageview(f"c{t}-{i}")) for i in range(50)] for t in range(8)]
        together = threading.Barrier(len(batches))

        def publish(events: list[Event]) -> None:
            together.wait()
            bus.publish(events)

        threads = [threading.Thread(target=publish, args=(b,)) for b in batches]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        bus.kinesis.meta.events.unregister("provide-client-params.kinesis.PutRecords",
                                           held_first)
    # all 8 may be waiting before the first call goes: then one call takes them all
    assert len(calls) <= 2 and sum(calls) == 400
    assert sorted(r.partition_key for r in on_stream(settings)) == sorted(
        e.event_id for b in batches for e in b)


def test_the_test_server_keeps_every_record_put_to_a_shard_at_once(settings: Settings):
    """moto alone stores two concurrent writes to a shard under one sequence number, the
    second replacing the first (`lambdalake.testing.moto_kinesis`): probes of the Kinesis
    bench were lost so (unpatched, 2 to 6 of these 4,000 records are). Every acknowledged
    record is read back."""
    kinesis.ensure_stream(client(settings), settings.kinesis_stream, 2)
    acknowledged: list[str] = []

    def put_many() -> None:
        own = client(settings)
        for _ in range(4):
            keys = [uuid.uuid4().hex for _ in range(250)]
            own.put_records(StreamName=settings.kinesis_stream,
                            Records=[{"Data": k.encode(), "PartitionKey": k} for k in keys])
            acknowledged.extend(keys)

    threads = [threading.Thread(target=put_many) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    read = [r.partition_key for r in on_stream(settings)]
    assert len(read) == len(acknowledged) == 4_000
    assert set(read) == set(acknowledged)


def test_a_partial_failure_is_retried_for_the_records_it_left_out_only(settings: Settings):
    """moto's PutRecords never fails some records of a request (FailedRecordCount > 0), so
    the first request here stores its first half on the real stream and answers for the
    rest as Kinesis answers a throttled record; later requests go to the stream as they are."""
    kinesis_client = client(settings)
    kinesis.ensure_stream(kinesis_client, settings.kinesis_stream, 2)
    events = [event(pageview(f"p{i}")) for i in range(10)]
    sent: list[list[str]] = []

    def put(entries: list[dict[str, Any]]) -> dict[str, Any]:
        sent.append([e["PartitionKey"] for e in entries])
        if len(sent) > 1:
            return dict(kinesis_client.put_records(StreamName=settings.kinesis_stream,
                                                   Records=entries))
        stored = kinesis_client.put_records(StreamName=settings.kinesis_stream,
                                            Records=entries[:5])["Records"]
        throttled = {"ErrorCode": "ProvisionedThroughputExceededException",
                     "ErrorMessage": "Rate exceeded for shard shardId-000000000000"}
        return {"FailedRecordCount": 5, "Records": stored + [throttled] * 5}

    put_all(put, [{"Data": e.to_json(), "PartitionKey": e.event_id} for e in events],
            time.monotonic() + 5)
    assert sent == [[e.event_id for e in events], [e.event_id for e in events[5:]]]
    assert sorted(r.partition_key for r in on_stream(settings)) == sorted(
        e.event_id for e in events)


def test_records_still_failing_at_the_deadline_raise_bus_error():
    throttled = {"ErrorCode": "ProvisionedThroughputExceededException", "ErrorMessage": "x"}
    attempts: list[int] = []

    def put(entries: list[dict[str, Any]]) -> dict[str, Any]:
        attempts.append(len(entries))  # the last record is throttled, every time
        stored = {"SequenceNumber": "1", "ShardId": "shardId-000000000000"}
        return {"FailedRecordCount": 1, "Records": [stored] * (len(entries) - 1) + [throttled]}

    started = time.monotonic()
    with pytest.raises(BusError, match="1 records not stored .ProvisionedThroughput"):
        put_all(put, [{"Data": b"a", "PartitionKey": "a"}, {"Data": b"b", "PartitionKey": "b"}],
                started + 0.5)
    assert time.monotonic() - started < 0.6
    assert attempts[0] == 2 and set(attempts[1:]) == {1}


def test_ingest_answers_503_with_nothing_claimed_when_the_stream_is_unavailable(
        settings: Settings):
    ingest.bus()  # the stream exists, the producer is built: then the stream goes away
    client(settings).delete_stream(StreamName=settings.kinesis_stream)
    received = ingest.parse_events(json.dumps(pageview("gone")).encode())
    started = time.monotonic()
    reply = ingest.ingest(received, timeout_s=0.5)
    assert time.monotonic() - started < 2
    assert reply["statusCode"] == 503
    assert reply["headers"]["retry-after"] == "1"
    body = json.loads(reply["body"])
    assert body["accepted"] == 0 and "nothing accepted" in body["error"]


# ---------------------------------------------------------------- the kernel's reader


def test_lineage_orders_parents_before_children_through_a_split_and_a_merge(
        settings: Settings):
    kinesis_client = client(settings)
    kinesis.ensure_stream(kinesis_client, settings.kinesis_stream, 2)
    kinesis_client.split_shard(StreamName=settings.kinesis_stream,
                               ShardToSplit="shardId-000000000000",
                               NewStartingHashKey=str(2**126))
    kinesis_client.merge_shards(StreamName=settings.kinesis_stream,
                                ShardToMerge="shardId-000000000002",
                                AdjacentShardToMerge="shardId-000000000003")
    shards = kinesis.list_shards(kinesis_client, settings.kinesis_stream)
    ids = [s.shard_id.removeprefix("shardId-00000000000") for s in shards]
    assert ids == ["0", "1", "2", "3", "4"]
    assert [s.shard_id[-1] for s in kinesis.readable(shards, set())] == ["0", "1"]
    finished = {"shardId-000000000000"}
    assert [s.shard_id[-1] for s in kinesis.readable(shards, finished)] == ["1", "2", "3"]
    finished.add("shardId-000000000002")
    assert [s.shard_id[-1] for s in kinesis.readable(shards, finished)] == ["1", "3"]
    finished.add("shardId-000000000003")
    assert [s.shard_id[-1] for s in kinesis.readable(shards, finished)] == ["1", "4"]
    assert kinesis.children(shards, "shardId-000000000002") == ["shardId-000000000004"]
    order = [s.shard_id for s in kinesis.in_lineage_order(reversed(shards))]
    for shard in shards:
        assert all(order.index(p) < order.index(shard.shard_id) for p in shard.parents)


def test_a_closed_shard_is_finished_once_read_to_its_end_and_a_child_starts_at_its_floor(
        settings: Settings):
    kinesis_client = client(settings)
    kinesis.ensure_stream(kinesis_client, settings.kinesis_stream, 1)
    put = [{"PartitionKey": f"k{i}", "Data": b"x"} for i in range(3)]
    kinesis_client.put_records(StreamName=settings.kinesis_stream, Records=put)
    kinesis_client.split_shard(StreamName=settings.kinesis_stream,
                               ShardToSplit="shardId-000000000000",
                               NewStartingHashKey=str(2**127))
    kinesis_client.put_records(StreamName=settings.kinesis_stream, Records=put)
    parent, *children = kinesis.list_shards(kinesis_client, settings.kinesis_stream)
    assert parent.closed and not any(c.closed for c in children)
    reader = kinesis.ShardReader(kinesis_client, settings.kinesis_stream, parent,
                                 kinesis.Position.trim_horizon())
    assert len(reader.read(limit=2)) == 2 and not reader.finished
    assert len(reader.read()) == 1
    while not reader.finished:
        assert reader.read() == []
    floor = reader.arrival + 60_000  # as if the parent's last record came a minute later
    child = next(c for c in children if kinesis.ShardReader(
        kinesis_client, settings.kinesis_stream, c, kinesis.Position.trim_horizon()).read())
    read = kinesis.ShardReader(kinesis_client, settings.kinesis_stream, child,
                               kinesis.Position.trim_horizon(), arrival_floor=floor).read()
    assert read and all(r.arrival_ms == floor for r in read)
    assert all(r.approximate_arrival_ms < floor for r in read)
    resumed = kinesis.ShardReader(kinesis_client, settings.kinesis_stream, child,
                                  kinesis.Position.after(read[0].sequence_number))
    assert [r.sequence_number for r in resumed.read()] == [r.sequence_number for r in read[1:]]


@given(st.lists(st.integers(-10**6, 10**6), max_size=50), st.integers(0, 10**6))
def test_arrival_is_the_running_maximum_from_the_floor(stamps: list[int], floor: int):
    arrivals, previous = [], floor
    for stamp in stamps:
        previous = kinesis.next_arrival(previous, stamp)
        arrivals.append(previous)
    assert arrivals == sorted(arrivals) and all(a >= floor for a in arrivals)
    assert all(a == max([floor, *stamps[:i + 1]]) for i, a in enumerate(arrivals))


def test_arrival_ms_reads_the_boto3_and_the_lambda_forms_alike():
    from datetime import UTC, datetime

    assert kinesis.arrival_ms(datetime(2026, 1, 1, 0, 0, 0, 987000, tzinfo=UTC)) == \
        kinesis.arrival_ms(1767225600.987) == 1767225600987


# ---------------------------------------------------------------- KPL aggregated records

keys = st.text(min_size=1, max_size=20)
user_records = st.lists(st.tuples(keys, st.binary(max_size=300)), min_size=1, max_size=30)


@examples(max_examples=50)
@given(user_records)
def test_kpl_aggregates_are_read_back_record_for_record(records: list[tuple[str, bytes]]):
    assert kinesis.deaggregate(kinesis.aggregate(records)) == records


def test_data_that_only_looks_aggregated_is_a_plain_record():
    aggregated = kinesis.aggregate([("k", b"v")])
    assert kinesis.deaggregate(b'{"event_id": "e"}') is None
    assert kinesis.deaggregate(aggregated[:-1] + b"\x00") is None  # the MD5 does not match
    body = b"\x1a\x05\x08\x07\x1a\x01v"  # a user record naming a key the table lacks
    assert kinesis.deaggregate(kinesis.KPL_MAGIC + body + hashlib.md5(body).digest()) is None
    truncated = b"\x0a\x09k"
    assert kinesis.deaggregate(
        kinesis.KPL_MAGIC + truncated + hashlib.md5(truncated).digest()) is None


def test_kpl_records_on_the_stream_are_read_as_their_user_records(settings: Settings):
    kinesis_client = client(settings)
    kinesis.ensure_stream(kinesis_client, settings.kinesis_stream, 1)
    users = [(f"u{i}", json.dumps({"n": i}).encode()) for i in range(5)]
    kinesis_client.put_record(StreamName=settings.kinesis_stream, PartitionKey="agg",
                              Data=kinesis.aggregate(users))
    records = on_stream(settings)
    assert [(r.partition_key, r.data) for r in records] == users
    assert [r.sub_sequence for r in records] == list(range(5))
    assert len({r.sequence_number for r in records}) == 1
