"""The Kinesis speed layer on the moto server (Kinesis, DynamoDB, S3): exact merge, kill -9,
two workers splitting the shards, a split and a merge mid-stream, fencing.

Answers are checked as in tests/test_speed_kafka.py, against an independent recompute from
the raw events, through the serving layer's feed of the object store (`StoreFeed`).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_speed_kafka import (
    events_strategy,
    publish_cut,
    recompute,
    running,
    served,
    synthetic,
    to_events,
    wait_exact,
    wait_until,
)
from workers import worker_env, workers

from lambdalake import kinesis as streams
from lambdalake.example import project
from lambdalake.realtime import RealtimeCells
from lambdalake.serving.realtime_feed import StoreFeed
from lambdalake.settings import Settings
from lambdalake.shard_state import read_head, shard_prefix
from lambdalake.speed import kinesis_state
from lambdalake.speed.kinesis import KinesisSpeed, lease_table_name
from lambdalake.speed.kinesis_leases import LeaseLost, LeaseTable
from lambdalake.speed.kinesis_state import Fenced, claim
from lambdalake.storage import ObjectStore, open_store

HALF = 2**127


def kinesis_settings(endpoint: str, home: Path, shards: int = 2, **overrides: Any) -> Settings:
    """Fresh stream, bucket and lease table for one test."""
    name = uuid.uuid4().hex[:10]
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=f"lake-{name}")
    values = {
        "bus": "kinesis", "kinesis_stream": f"events-{name}", "kinesis_endpoint_url": endpoint,
        "s3_endpoint_url": endpoint, "store": f"s3://lake-{name}/lake", "partitions": shards,
        "home": home, "slice_seconds": 1, "flush_interval_ms": 100, "kinesis_lease_seconds": 2,
    }
    s = Settings(**(values | overrides))
    kinesis = streams.client(endpoint)
    kinesis.create_stream(StreamName=s.kinesis_stream, ShardCount=shards)
    wait_until(lambda: kinesis.describe_stream_summary(StreamName=s.kinesis_stream)[
        "StreamDescriptionSummary"]["StreamStatus"] == "ACTIVE")
    return s


def store_of(s: Settings) -> ObjectStore:
    return open_store(s.store_url, s.s3_endpoint_url)


def put(s: Settings, values: list[tuple[str, bytes]]) -> None:
    """PutRecords straight to the stream (partition key, data), retrying what failed."""
    kinesis = streams.client(s.kinesis_endpoint_url)
    for at in range(0, len(values), 500):
        batch = [{"PartitionKey": key, "Data": data} for key, data in values[at:at + 500]]
        while batch:
            reply = kinesis.put_records(StreamName=s.kinesis_stream, Records=batch)
            batch = [r for r, out in zip(batch, reply["Records"], strict=True)
                     if "ErrorCode" in out]


def put_events(s: Settings, events: list[dict[str, Any]]) -> None:
    put(s, [(e["event_id"], json.dumps(e).encode()) for e in events])


def arrivals(s: Settings) -> list[tuple[int, dict[str, Any]]]:
    """(arrival, event) of every valid record, every shard read in lineage order from its
    parents' final arrival, as the archiver reads them."""
    kinesis = streams.client(s.kinesis_endpoint_url)
    found: list[tuple[int, dict[str, Any]]] = []
    final: dict[str, int] = {}
    for shard in streams.in_lineage_order(streams.list_shards(kinesis, s.kinesis_stream)):
        floor = max((final.get(p, 0) for p in shard.parents), default=0)
        reader = streams.ShardReader(kinesis, s.kinesis_stream, shard,
                                     streams.Position.trim_horizon(), floor)
        for record in streams.read_until_quiet(reader, max_empty=2):
            with suppress(ValueError):  # poison: not an event
                found.append((record.arrival_ms, json.loads(record.data)))
        final[shard.shard_id] = reader.arrival
    return found


@contextmanager
def feed_of(s: Settings) -> Iterator[RealtimeCells]:
    cells = RealtimeCells(project)
    feed = StoreFeed(store_of(s), s.kinesis_stream, cells, poll_s=0.05)
    feed.start()
    try:
        yield cells
    finally:
        feed.stop()


def worker_thread(s: Settings, worker_id: str = "t1") -> AbstractContextManager[KinesisSpeed]:
    return running(KinesisSpeed(s, project, store_of(s), worker_id))


def worker_process(s: Settings, worker_id: str, cli: bool = False) -> subprocess.Popen[bytes]:
    """`python -m lambdalake.speed.kinesis`, or the same through `lambdalake speed`."""
    env = worker_env(s, ("bus", "kinesis_stream", "kinesis_endpoint_url", "s3_endpoint_url",
                         "store", "partitions", "home", "slice_seconds", "flush_interval_ms",
                         "kinesis_lease_seconds"))
    command = ([str(Path(sys.executable).parent / "lambdalake"), "speed"] if cli
               else [sys.executable, "-m", "lambdalake.speed.kinesis"])
    log = open(s.home / f"{worker_id}.log", "ab")
    return subprocess.Popen([*command, "--worker-id", worker_id], env=env, cwd=s.home,
                            stdout=subprocess.DEVNULL, stderr=log)


@pytest.fixture
def spawn(s3_server: str) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Worker processes; any still running at the end is killed."""
    with workers(worker_process) as start:
        yield start


def owners(s: Settings) -> dict[str, str | None]:
    table = LeaseTable(boto3.client("dynamodb", endpoint_url=s.kinesis_endpoint_url),
                       lease_table_name(s), "observer", s.kinesis_lease_seconds)
    table.ensure()  # workers may not have created it yet
    return {shard: lease.owner for shard, lease in table.all().items() if not lease.finished}


def pageviews(cells: RealtimeCells) -> int:
    return sum(row.get("pageviews", 0) for row in served(cells, [], 0).values())


# --- the tests --------------------------------------------------------------------------


@settings(max_examples=3)
@given(first=events_strategy, second=events_strategy, cut_first=st.booleans())
def test_exact_merge_through_kinesis(
    s3_server: str, tmp_path_factory: pytest.TempPathFactory,
    first: list[dict[str, Any]], second: list[dict[str, Any]], cut_first: bool,
) -> None:
    """Invariant 1 through Kinesis: random events with retries, in two waves a slice apart,
    a batch cut between them published before or after the speed layer read the first wave:
    batch(cut) + real-time cells >= cut equals the recompute of every event."""
    s = kinesis_settings(s3_server, tmp_path_factory.mktemp("merge"))
    now = int(time.time() * 1000)
    events = to_events(first + second, now)
    with feed_of(s) as cells:
        put_events(s, events[: len(first)])
        time.sleep(1.1)
        cut = max(a for a, _ in arrivals(s)) // 1000 * 1000 + 1000
        if cut_first:
            publish_cut(s, cut)
        with worker_thread(s):
            put_events(s, events[len(first):])
            if not cut_first:
                publish_cut(s, cut)
            cells.drop_below(cut)
            below = [e for a, e in arrivals(s) if a < cut]
            wait_exact(lambda: served(cells, below, cut), recompute(events), timeout=60)


def test_a_worker_killed_mid_stream_restarts_without_double_counting(
    s3_server: str, tmp_path: Path, spawn: Any
) -> None:
    """Killed with -9 while events flow in and it folds and writes them, then restarted."""
    s = kinesis_settings(s3_server, tmp_path, slice_seconds=60)
    events = synthetic(6_000, seed=21)
    worker = spawn(s, "w1")
    wait_until(lambda: list(owners(s).values()) == ["w1", "w1"])
    with feed_of(s) as cells, producing(s, events) as done:
        wait_until(lambda: pageviews(cells) > 1_000)
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        assert not done.is_set(), "killed too late to be mid-stream"
        worker = spawn(s, "w1")  # the same id: it takes its leases back at once
        done.wait(120)
        wait_exact(lambda: served(cells, [], 0), recompute(events), timeout=90)
        worker.terminate()
        assert worker.wait(30) == 0
    assert all(owner is None for owner in owners(s).values()), "leases released on stop"


@contextmanager
def producing(s: Settings, events: list[dict[str, Any]], batch: int = 100,
              pause_s: float = 0.05) -> Iterator[threading.Event]:
    """Put the events in small batches from a thread; the event is set once all are put."""
    done = threading.Event()

    def run() -> None:
        for at in range(0, len(events), batch):
            put_events(s, events[at:at + batch])
            time.sleep(pause_s)
        done.set()

    thread = threading.Thread(target=run)
    thread.start()
    try:
        yield done
    finally:
        thread.join(300)


def test_two_workers_split_the_shards_then_one_is_killed(
    s3_server: str, tmp_path: Path, spawn: Any
) -> None:
    s = kinesis_settings(s3_server, tmp_path, shards=4, slice_seconds=60)
    events = synthetic(6_000, seed=31)
    put_events(s, events[:3_000])
    with feed_of(s) as cells:
        a, b = spawn(s, "a"), spawn(s, "b", cli=True)
        wait_until(lambda: sorted(owners(s).values(), key=str) == ["a", "a", "b", "b"],
                   timeout=60)
        wait_exact(lambda: served(cells, [], 0), recompute(events[:3_000]), timeout=60)
        a.send_signal(signal.SIGKILL)
        a.wait()
        put_events(s, events[3_000:])
        wait_until(lambda: list(owners(s).values()) == ["b"] * 4, timeout=60)
        wait_exact(lambda: served(cells, [], 0), recompute(events), timeout=60)
        b.terminate()
        assert b.wait(30) == 0


def test_a_split_and_a_merge_mid_stream_stay_exact(
    s3_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Children are read only once their parents are finished; a retry landing in a child
    after its first copy landed in the parent is counted once; poison never blocks a shard.
    Snapshots every few deltas, written while the deltas go on, and read by the feed."""
    monkeypatch.setattr(kinesis_state, "SNAPSHOT_AFTER_DELTAS", 3)
    s = kinesis_settings(s3_server, tmp_path, shards=2, slice_seconds=60)
    kinesis = streams.client(s3_server)
    waves = [synthetic(1_500, seed=41 + i) for i in range(3)]
    retries = [dict(e) for e in waves[0][::50]]
    poison = [("p1", b"not json {"), ("p2", json.dumps({"event_id": "x", "type": "pageview",
                                                        "ts": 1}).encode())]
    with feed_of(s) as cells, worker_thread(s):
        put_events(s, waves[0])
        put(s, poison)
        wait_until(lambda: pageviews(cells) > 0)
        kinesis.split_shard(StreamName=s.kinesis_stream, ShardToSplit="shardId-000000000000",
                            NewStartingHashKey=str(HALF // 2))
        put_events(s, waves[1] + retries)
        wait_exact(lambda: served(cells, [], 0), recompute(waves[0] + waves[1]), timeout=60)
        kinesis.merge_shards(StreamName=s.kinesis_stream, ShardToMerge="shardId-000000000003",
                             AdjacentShardToMerge="shardId-000000000001")
        put_events(s, waves[2] + retries)
        everything = waves[0] + waves[1] + waves[2]
        wait_exact(lambda: served(cells, [], 0), recompute(everything), timeout=60)
    store = store_of(s)
    heads = {sid: read_head(store, s.kinesis_stream, sid)[0]
             for sid in (f"shardId-00000000000{i}" for i in range(5))}
    for parent, child in (("shardId-000000000000", "shardId-000000000002"),
                          ("shardId-000000000001", "shardId-000000000004"),
                          ("shardId-000000000003", "shardId-000000000004")):
        assert heads[parent].finished
        assert heads[child].arrival >= heads[parent].arrival


def test_a_fenced_worker_late_write_is_refused(s3_server: str, tmp_path: Path) -> None:
    """A worker whose lease was taken over: its renewal fails and its next state write is
    refused; what a restore reads is the new owner's state."""
    s = kinesis_settings(s3_server, tmp_path, shards=1)
    put_events(s, synthetic(200, seed=51))
    store, shard = store_of(s), "shardId-000000000000"
    dynamodb = boto3.client("dynamodb", endpoint_url=s3_server)
    old = LeaseTable(dynamodb, lease_table_name(s), "old", s.kinesis_lease_seconds)
    new = LeaseTable(dynamodb, lease_table_name(s), "new", s.kinesis_lease_seconds)
    old.ensure()
    old.add([shard])
    old_lease = old.take(old.all()[shard])
    assert old_lease is not None and old_lease.epoch == 1
    stale = claim(store, s.kinesis_stream, shard, 0, 1, "old", project, s, [])
    reader = streams.ShardReader(streams.client(s3_server), s.kinesis_stream,
                                 streams.list_shards(streams.client(s3_server),
                                                     s.kinesis_stream)[0],
                                 streams.Position.trim_horizon())
    records = reader.read()
    from lambdalake.event_columns import BatchDecoder
    from lambdalake.events import Validator
    stale.part.take_all([r.data for r in records], [r.arrival_ms for r in records],
                        BatchDecoder(project.schemas, 300_000), Validator(project.schemas, 300_000))
    new_lease = new.take(new.all()[shard])  # a steal: the old owner has not expired here
    assert new_lease is not None and new_lease.epoch == 2
    fresh = claim(store, s.kinesis_stream, shard, 0, 2, "new", project, s, [])
    with pytest.raises(Fenced):
        stale.flush(records[-1].sequence_number)
    with pytest.raises(LeaseLost):
        old.renew(old_lease, records[-1].sequence_number)
    head = read_head(store, s.kinesis_stream, shard)[0]
    assert (head.epoch, head.owner, head.sequence) == (2, "new", None)
    assert fresh.part.view.everything() == []
    with pytest.raises(Fenced):
        claim(store, s.kinesis_stream, shard, 0, 1, "old", project, s, [])
    late = [k for k in store.list(shard_prefix(s.kinesis_stream, shard)) if "-0000000001-" in k]
    assert late, "the fenced worker's delta object was written, just never named"
    fresh.snapshot()  # deletes what it replaces, and objects of older epochs no head names
    assert not [k for k in store.list(shard_prefix(s.kinesis_stream, shard))
                if "-0000000001-" in k]


def test_views_changed_across_a_restart_are_rebuilt_from_the_shards(
    s3_server: str, tmp_path: Path
) -> None:
    """A worker restarted with a changed view (and two added) rebuilds them from each shard's
    records up to its saved sequence number, a finished parent's too, then goes on: exact
    from the first answer."""
    from lambdalake.example import PAGEVIEW, PURCHASE
    from lambdalake.monoids import Count
    from lambdalake.project import Project
    from lambdalake.views import View

    before = Project.of(schemas=[PAGEVIEW, PURCHASE], views=[
        View(name="pageviews_by_url_hour", event_type="pageview", keys=("referrer",),
             bucket="hour", metrics={"pageviews": Count()}),
        project.views["revenue_by_sku_day"],
    ])
    s = kinesis_settings(s3_server, tmp_path, slice_seconds=60)
    events = synthetic(3_000, seed=61)
    put_events(s, events[:1_000])
    streams.client(s3_server).split_shard(StreamName=s.kinesis_stream,
                                          ShardToSplit="shardId-000000000000",
                                          NewStartingHashKey=str(HALF // 2))
    put_events(s, events[1_000:2_000])
    children = {"shardId-000000000001", "shardId-000000000002", "shardId-000000000003"}
    with running(KinesisSpeed(s, before, store_of(s), "w1")) as old:
        wait_until(lambda: set(old.held) == children
                   and all(h.state.head.sequence for h in old.held.values())
                   and not any(h.changed for h in old.held.values()))
    put_events(s, events[2_000:])
    with feed_of(s) as cells, worker_thread(s, "w1"):
        wait_until(cells.restored.is_set)
        wait_exact(lambda: served(cells, [], 0), recompute(events), timeout=60)


@pytest.mark.long  # a `lambdalake serve` process: 30 s on a loaded machine
def test_a_serve_replica_answers_from_the_kinesis_speed_layer(
    s3_server: str, tmp_path: Path
) -> None:
    """`lambdalake serve --bus kinesis` beside a Kinesis speed worker: its feed is the shards'
    state in the store; its HTTP answers equal the recompute."""
    from test_flow import recompute as pageviews_by_url
    from test_replicas import wait_ready

    from lambdalake.testing import free_port

    s = kinesis_settings(s3_server, tmp_path)
    events = synthetic(400, seed=31)
    put_events(s, events)
    port = free_port()
    env = worker_env(s, ("kinesis_stream", "kinesis_endpoint_url", "s3_endpoint_url", "store",
                         "home", "slice_seconds"))
    replica = subprocess.Popen(
        [str(Path(sys.executable).parent / "lambdalake"), "serve", "--bus", "kinesis",
         "--port", str(port), "--pg-port", "0"],
        env=env, cwd=s.home, stdout=subprocess.DEVNULL, stderr=open(s.home / "serve.log", "ab"))
    api = f"http://127.0.0.1:{port}"
    try:
        with worker_thread(s):
            wait_ready(api, replica)
            want, _ = pageviews_by_url(events)

            def answered() -> dict[str, int]:
                reply = httpx.get(f"{api}/views/pageviews_by_url_hour",
                                  params={"bucket": "total", "group_by": "url"}, timeout=30)
                return {r["url"]: r["pageviews"] for r in reply.json()["rows"]}

            wait_until(lambda: answered() == dict(want), timeout=60)
    finally:
        replica.kill()
        replica.wait()
