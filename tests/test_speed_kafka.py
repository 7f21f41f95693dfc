"""The Kafka speed layer on a real broker: exact merge, kill -9, rebalance, dead letters.

Every test gets fresh topics. Answers are checked against an independent recompute from the
raw events: counts and distinct users exact, sums to float precision.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from exact import QuantilesOf
from hypothesis import given, settings
from hypothesis import strategies as st
from workers import worker_env, workers

pytest.importorskip("quixstreams")

from confluent_kafka import KafkaError, KafkaException, Producer  # noqa: E402
from prometheus_client import REGISTRY  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from lambdalake import catalog  # noqa: E402
from lambdalake.bus import KafkaBus  # noqa: E402
from lambdalake.events import Event, Validator  # noqa: E402
from lambdalake.example import project  # noqa: E402
from lambdalake.kafka_topics import dlq_topic, ensure_bus_topics  # noqa: E402
from lambdalake.monoids import Monoid, merge_all  # noqa: E402
from lambdalake.realtime import RealtimeCells  # noqa: E402
from lambdalake.serving.realtime_feed import RealtimeFeed  # noqa: E402
from lambdalake.settings import Settings  # noqa: E402
from lambdalake.speed import kafka_common  # noqa: E402
from lambdalake.speed.kafka_common import PartitionState, ids_key, meta_key  # noqa: E402
from lambdalake.speed.quix import QuixSpeed, group_id, reported  # noqa: E402
from lambdalake.storage import open_store  # noqa: E402
from lambdalake.synthetic import WebAnalyticsStream  # noqa: E402
from lambdalake.tables import table_schema  # noqa: E402
from lambdalake.testing import free_port  # noqa: E402
from lambdalake.testing.kafka import KafkaBroker, read_topic  # noqa: E402
from lambdalake.views import BUCKET_MS  # noqa: E402

needs_java = pytest.mark.skipif(not shutil.which("java"), reason="needs Java 17+")
HOUR = 3_600_000
KINDS = ("json", "schema")
Answer = dict[tuple[str, int, tuple[Any, ...]], dict[str, Any]]


@pytest.fixture(scope="module")
def broker(kafka_broker: KafkaBroker) -> KafkaBroker:
    return kafka_broker


def kafka_settings(broker: KafkaBroker, home: Path, **overrides: Any) -> Settings:
    values = {
        "bus": "kafka",
        "kafka_bootstrap": broker.bootstrap,
        "topic": f"events-{uuid.uuid4().hex[:10]}",
        "partitions": 4,
        "home": home,
        "store": (home / "lake").as_uri(),
        "slice_seconds": 1,
        "flush_interval_ms": 100,
    }
    settings = Settings(**(values | overrides))
    ensure_bus_topics(settings)
    return settings


# --- the independent recompute ----------------------------------------------------------


def recompute(events: list[dict[str, Any]]) -> Answer:
    """Every view from raw event dicts (the first copy of a (type, event_id) counts), by hand."""
    answer: Answer = {}
    seen: set[tuple[str, str]] = set()
    for event in events:
        identity = (event["type"], event["event_id"])
        if identity in seen:
            continue
        seen.add(identity)
        if event["type"] == "pageview":
            bucket = event["ts"] - event["ts"] % HOUR
            row = answer.setdefault(("pageviews_by_url_hour", bucket, (event["url"],)),
                                    {"pageviews": 0, "visitors": set()})
            row["pageviews"] += 1
            row["visitors"].add(event["user_id"])
            row = answer.setdefault(("durations_by_url_hour", bucket, (event["url"],)),
                                    {"duration_ms": [], "viewers": set()})
            if event.get("duration_ms") is not None:
                row["duration_ms"].append(event["duration_ms"])
            row["viewers"].add(event["user_id"])
        else:
            bucket = event["ts"] - event["ts"] % BUCKET_MS["day"]
            row = answer.setdefault(("revenue_by_sku_day", bucket, (event["sku"],)),
                                    {"revenue": Decimal(0), "orders": 0})
            row["revenue"] += Decimal(event["amount"])  # amount is decimal(18,2): exact
            row["orders"] += 1
            row = answer.setdefault(("buyers_by_sku_day", bucket, (event["sku"],)),
                                    {"buyers": set()})
            row["buyers"].add(event["user_id"])
    for row in answer.values():
        for name in ("visitors", "viewers", "buyers"):
            if name in row:
                row[name] = len(row[name])
        if "duration_ms" in row:
            row["duration_ms"] = QuantilesOf(tuple(row["duration_ms"]))
    return answer


def served(cells: RealtimeCells, batch: list[dict[str, Any]], cut: int) -> Answer:
    """What the serving layer answers: a batch (here a by-hand accumulation of the events
    that arrived before `cut`) merged with every real-time cell at or past `cut`."""
    rows: dict[tuple[str, int, tuple[Any, ...]], list[tuple[Any, ...]]] = {}
    for (name, bucket, key), values in recompute_accumulators(batch).items():
        rows.setdefault((name, bucket, key), []).append(values)
    for view in project.views.values():
        table = cells.table(view, table_schema(project, view), cut).to_pylist()
        for row in table:
            key = tuple(row[k] for k in view.keys)
            rows.setdefault((view.name, row["bucket"], key), []).append(
                tuple(row[m] for m in view.metrics)
            )
    answer: Answer = {}
    for (name, bucket, key), parts in rows.items():
        metrics = project.views[name].metrics
        answer[(name, bucket, key)] = {
            m: metric.result(merge_all(metric, [p[i] for p in parts]))
            for i, (m, metric) in enumerate(metrics.items())
        }
    return answer


def recompute_accumulators(events: list[dict[str, Any]]) -> dict[Any, tuple[Any, ...]]:
    """The by-hand batch as accumulators (sketches folded from each cell's first copies)."""
    cells: dict[Any, list[dict[str, Any]]] = {}
    seen: set[tuple[str, str]] = set()
    for event in events:
        if (event["type"], event["event_id"]) not in seen:  # the dedup rule: type and id
            seen.add((event["type"], event["event_id"]))
            for view in project.views_of(event["type"]):
                bucket = view.bucket_of(event["ts"])
                key = tuple(event[k] for k in view.keys)
                cells.setdefault((view.name, bucket, key), []).append(event)
    accumulators = {}
    for (name, bucket, key), rows in recompute(events).items():
        metrics = project.views[name].metrics
        accumulators[(name, bucket, key)] = tuple(
            rows[m] if metric.kind in ("count", "sum") else fold(metric, cells[(name, bucket, key)])
            for m, metric in metrics.items()
        )
    return accumulators


def fold(metric: Monoid, events: list[dict[str, Any]]) -> Any:
    working = metric.thaw(metric.zero())
    for event in events:
        working = metric.add(working, event.get(metric.field))
    return metric.freeze(working)


def same(got: Answer, want: Answer) -> bool:
    return got.keys() == want.keys() and all(
        got[k].keys() == want[k].keys()
        and all(close(got[k][m], want[k][m]) for m in want[k])
        for k in want
    )


def close(got: Any, want: Any) -> bool:
    """Numbers to float rounding; anything else (`QuantilesOf`) by its own equality."""
    return got == pytest.approx(want, rel=1e-9) if isinstance(want, int | float) else want == got


def wait_exact(answer: Callable[[], Answer], want: Answer, timeout: float = 90) -> None:
    """Until the answer equals the recompute; then it must stay equal (nothing counted late)."""
    deadline = time.monotonic() + timeout
    while not same(answer(), want):
        if time.monotonic() > deadline:
            got = answer()
            diff = {k: (got.get(k), want.get(k)) for k in got.keys() | want.keys()
                    if not same({k: got[k]} if k in got else {}, {k: want[k]} if k in want else {})}
            pytest.fail(f"{len(diff)} answers differ from the recompute, e.g. "
                        f"{list(diff.items())[:3]}")
        time.sleep(0.2)
    time.sleep(1.0)
    assert same(answer(), want)


# --- moving events and processes ------------------------------------------------------


def publish_raw(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    """Write straight to the event topic with another Kafka client (acks=all)."""
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True,
                         "linger.ms": 20})
    for key, value in records:
        while True:
            try:
                producer.produce(topic, value, key)
                break
            except BufferError:
                producer.poll(0.1)
    assert producer.flush(60) == 0


def encoded(events: list[dict[str, Any]]) -> list[tuple[bytes, bytes]]:
    return [(e["event_id"].encode(), json.dumps(e).encode()) for e in events]


def read_all(bootstrap: str, topic: str) -> list[tuple[Any, ...]]:
    """(partition, offset, arrival, value, headers) of every record, in offset order."""
    running: dict[int, int] = {}
    found = []
    for m in read_topic(bootstrap, topic):
        running[m.partition()] = max(running.get(m.partition(), 0), m.timestamp()[1])
        found.append((m.partition(), m.offset(), running[m.partition()], m.value(),
                      dict(m.headers() or [])))
    return found


def wait_until(condition: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def publish_cut(settings: Settings, cut: int) -> None:
    store = open_store(settings.store_url, settings.s3_endpoint_url)
    version = catalog.new_version()
    covered = {name: catalog.ViewFiles(files=[], rows=0) for name in project.views}
    catalog.write_manifest(store, catalog.Manifest(
        version=version, cut=cut, created="test", engine="test", rows_read=0, views=covered,
        fingerprints=project.fingerprints))
    catalog.publish(store, version)


@contextmanager
def in_process_worker(settings: Settings) -> Iterator[QuixSpeed]:
    with running(QuixSpeed(settings, project, open_store(settings.store_url),
                           uuid.uuid4().hex)) as speed:
        yield speed


@contextmanager
def running(speed: Any) -> Iterator[Any]:
    """A speed driver's `run(stop)` in a thread of this process, stopped on leaving."""
    stop = threading.Event()
    thread = threading.Thread(target=speed.run, args=(stop,))
    thread.start()
    try:
        yield speed
    finally:
        stop.set()
        thread.join(60)


@contextmanager
def feed_of(settings: Settings) -> Iterator[RealtimeCells]:
    cells = RealtimeCells(project)
    feed = RealtimeFeed(settings.kafka_bootstrap, settings.topic, cells)
    feed.start()
    try:
        yield cells
    finally:
        feed.stop()


ENGINES = ["quix", "faust"]
# The Faust driver (not the default) runs the kill and pause cases under `make test-long`;
# `make test` keeps its exact merge, poison and whole-flow cases.
FAUST_LONG = pytest.param("faust", 12_000, marks=pytest.mark.long)
COMMANDS = {
    "quix": lambda worker_id: ["-m", "lambdalake.speed.quix", "--worker-id", worker_id],
    "faust": lambda worker_id: ["-m", "lambdalake.speed.faust_app"],
}


def worker_process(
    settings: Settings, worker_id: str, log: Path, engine: str = "quix"
) -> subprocess.Popen[bytes]:
    env = worker_env(settings, ("bus", "kafka_bootstrap", "topic", "partitions", "home",
                                "store", "slice_seconds", "flush_interval_ms",
                                "speed_metrics_port"))
    return subprocess.Popen(
        [sys.executable, *COMMANDS[engine](worker_id)],
        env=env, cwd=settings.home, stdout=subprocess.DEVNULL, stderr=open(log, "ab"),
    )


@pytest.fixture
def spawn(broker: KafkaBroker) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start worker processes; any still running at the end is killed (before the broker)."""
    with workers(worker_process) as start:
        yield start


def synthetic(n: int, seed: int) -> list[dict[str, Any]]:
    stream = WebAnalyticsStream(seed, users=300)
    now = int(time.time() * 1000)
    return [stream.event(now) for _ in range(n)]


def counted(cells: RealtimeCells) -> int:
    return sum(row.get("pageviews", 0) for row in served(cells, [], 0).values())


# --- the tests --------------------------------------------------------------------------


def test_partition_state_restores_from_what_it_wrote() -> None:
    """Unit: the records a transaction writes rebuild the same view state (no broker)."""
    s = Settings(slice_seconds=1)
    validator = Validator(project.schemas, 300_000)
    events = synthetic(3_000, seed=7)
    first = PartitionState(0, project, s)
    realtime: dict[bytes, bytes | None] = {}
    changelog: dict[bytes, bytes | None] = {}
    t0 = int(time.time() * 1000)
    for i, event in enumerate(events):
        assert first.take(json.dumps(event).encode(), t0 + i, validator) is None
        first.next_offset = i + 1
        if i % 700 == 0:
            first.follow(t0 + i - 300)
            realtime.update(first.realtime_records())
            changelog.update(first.changelog_records())
    realtime.update(first.realtime_records())
    changelog.update(first.changelog_records())
    second = PartitionState(0, project, s)
    second.restore({k: v for k, v in realtime.items() if v is not None},
                   {k: v for k, v in changelog.items() if v is not None})
    assert results(second) == results(first)
    assert (second.view.cut, second.arrival) == (first.view.cut, first.arrival)
    assert second.next_offset == first.next_offset == len(events)
    assert second.view.tracked_ids == first.view.tracked_ids
    replayed = [Event(e["event_id"], e["type"], e["ts"], {}) for e in events[-50:]]
    assert not any(second.view.apply(e, second.arrival) for e in replayed)


def test_a_burst_of_ids_is_written_in_records_under_the_size_limit() -> None:
    """Unit: 10,000 events of one partition between two transactions, with the longest event
    ids allowed, land in changelog records each well under Kafka's 1 MB and restore whole."""
    s = Settings(slice_seconds=1)
    validator = Validator(project.schemas, 300_000)
    first = PartitionState(0, project, s)
    t0 = int(time.time() * 1000)
    for i, event in enumerate(synthetic(10_000, seed=5)):
        event["event_id"] = f"{i:06d}".ljust(256, "x")
        assert first.take(json.dumps(event).encode(), t0 + i // 100, validator) is None
    changelog = dict(first.changelog_records())
    assert max(len(value) for value in changelog.values()) < 300_000
    second = PartitionState(0, project, s)
    second.restore(dict(first.realtime_records()), changelog)
    assert second.view.tracked_ids == first.view.tracked_ids == 10_000


def test_the_keys_of_dropped_cells_cost_their_size() -> None:
    """Unit: a floor's advance holds a tombstone key per dropped cell until the next
    transaction; each cost orjson's 4 KB buffer, so a floor moving minutes of 1 s slices at
    once grew a driver by tens of MB. Now about its length."""
    part = PartitionState(0, project, Settings(slice_seconds=1))
    validator = Validator(project.schemas, 300_000)
    t0 = int(time.time() * 1000)
    for i, event in enumerate(synthetic(3_000, seed=3)):
        assert part.take(json.dumps(event).encode(), t0 + i * 100, validator) is None
    everything = part.view.everything()
    cells = len(everything)
    tracemalloc.start()
    part.follow(t0 + 300_000)
    held = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(True, kafka_common.__file__)])
    tracemalloc.stop()
    assert sum(len(view) for view in part.view.cells.values()) == 0
    assert sum(t.size for t in held.traces) < 200 * cells
    assert {key for key, value in part.realtime_records() if value is None} == \
        {kafka_common.cell_key(0, u.view, (u.slice, u.bucket, u.key)) for u in everything}


def test_ids_forgotten_by_the_cap_leave_the_changelog() -> None:
    """Unit: past `dedup_max_ids` the changelog's old id records are tombstoned as the state
    forgets them, so what a restart reads stays near the cap too."""
    s = Settings(slice_seconds=1, dedup_max_ids=1_000)
    validator = Validator(project.schemas, 300_000)
    part = PartitionState(0, project, s)
    changelog: dict[bytes, bytes | None] = {}
    t0 = int(time.time() * 1000)
    for i, event in enumerate(synthetic(6_000, seed=9)):
        event["event_id"] = f"id-{i}"
        assert part.take(json.dumps(event).encode(), t0 + i, validator) is None
        if i % 500 == 499:
            changelog.update(part.changelog_records())
    live = {k: v for k, v in changelog.items() if v is not None}
    held = sum(len(orjson.loads(v)) for k, v in live.items() if b'"ids"' in k)
    assert part.view.tracked_ids == 1_000 and held <= 1_000 + 500
    restored = PartitionState(0, project, s)
    restored.restore({}, live)
    assert restored.view.tracked_ids == 1_000
    assert restored.view.apply(Event("id-4999", "pageview", t0, {}), part.arrival)
    assert not restored.view.apply(Event("id-5999", "pageview", t0, {}), part.arrival)


def test_ids_are_held_by_type_and_an_untyped_changelog_still_restores() -> None:
    """Unit: the changelog holds each id with its type, so a purchase under a pageview's id
    is counted after a restore too; ids written before, as (id, arrival) pairs, restore as
    held for every type."""
    s = Settings(slice_seconds=1)
    validator = Validator(project.schemas, 300_000)
    t0 = int(time.time() * 1000)
    pageview = {"event_id": "x1", "type": "pageview", "ts": t0, "url": "/", "user_id": "u"}
    purchase = {"event_id": "x1", "type": "purchase", "ts": t0, "user_id": "u", "sku": "s",
                "amount": "2.50"}
    first = PartitionState(0, project, s)
    assert first.take(json.dumps(pageview).encode(), t0, validator) is None
    changelog = dict(first.changelog_records())
    second = PartitionState(0, project, s)
    second.restore({}, changelog)
    assert second.take(json.dumps(purchase).encode(), t0 + 1, validator) is None
    assert not second.view.apply(Event("x1", "pageview", t0, {}), t0 + 2)
    drained = second.view.drain()
    assert [u.values for u in drained if u.view == "revenue_by_sku_day"] == [(2.5, 1)]

    untyped = {ids_key(0, 0): orjson.dumps([["x1", t0]]), meta_key(0): changelog[meta_key(0)]}
    legacy = PartitionState(0, project, s)
    legacy.restore({}, untyped)
    assert not legacy.view.apply(Event("x1", "purchase", t0, {}), t0 + 1)
    assert not legacy.view.apply(Event("x1", "pageview", t0, {}), t0 + 1)
    assert legacy.view.apply(Event("x2", "purchase", t0, {}), t0 + 1)


def results(part: PartitionState) -> list[tuple[Any, ...]]:
    """Every cell with its metric results (equal sketches may differ in their bytes)."""
    return sorted(
        (u.view, u.slice, u.bucket, u.key, tuple(
            m.result(v) for m, v in zip(project.views[u.view].metrics.values(), u.values,
                                        strict=True)))
        for u in part.view.everything()
    )


events_strategy = st.lists(
    st.fixed_dictionaries({
        "n": st.integers(0, 59),
        "kind": st.sampled_from(["pageview"] * 4 + ["purchase"]),
        "url": st.sampled_from(["/a", "/b", "/c"]),
        "user": st.integers(0, 30),
        "sku": st.sampled_from(["s1", "s2"]),
        "cents": st.integers(1, 20_000),
        "hours_ago": st.integers(0, 30),
        "duplicate_of": st.none() | st.integers(0, 200),
        "id_of": st.none() | st.integers(0, 200),  # a new event under an earlier one's id
    }),
    min_size=1, max_size=200,
)


def to_events(drawn: list[dict[str, Any]], now: int) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    for i, d in enumerate(drawn):
        if d["duplicate_of"] is not None and d["duplicate_of"] < len(events):
            events.append(dict(events[d["duplicate_of"]]))  # a producer retry
            continue
        reused = d["id_of"] is not None and d["id_of"] < len(events)
        event_id = events[d["id_of"]]["event_id"] if reused else f"e{i}"
        base = {"event_id": event_id, "ts": now - d["hours_ago"] * 2_345_678 - d["n"]}
        if d["kind"] == "pageview":
            events.append(base | {"type": "pageview", "url": d["url"],
                                  "user_id": f"u{d['user']}"})
        else:
            events.append(base | {"type": "purchase", "user_id": f"u{d['user']}",
                                  "sku": d["sku"], "amount": str(Decimal(d["cents"]).scaleb(-2))})
    return events


@pytest.mark.kafka
@needs_java
@pytest.mark.parametrize("engine", ["quix", pytest.param("faust", marks=pytest.mark.long)])
@settings(max_examples=2)
@given(first=events_strategy, second=events_strategy, cut_first=st.booleans())
def test_exact_merge_through_kafka(
    broker: KafkaBroker, tmp_path_factory: pytest.TempPathFactory, engine: str,
    first: list[dict[str, Any]], second: list[dict[str, Any]], cut_first: bool,
) -> None:
    """Invariant 1 through Kafka: random events with retries, in two waves a slice apart,
    a batch cut between them published before or after the speed layer read the first wave:
    batch(cut) + real-time cells >= cut equals the recompute of every event."""
    home = tmp_path_factory.mktemp("merge")
    s = kafka_settings(broker, home)
    now = int(time.time() * 1000)
    events = to_events(first + second, now)
    bus = KafkaBus(s.kafka_bootstrap, s.topic)
    validator = Validator(project.schemas, 300_000)
    waves = [events[: len(first)], events[len(first):]]
    with feed_of(s) as cells:
        bus.publish([validator.validate(e, now) for e in waves[0]])
        time.sleep(1.1)
        cut = max(r[2] for r in read_all(s.kafka_bootstrap, s.topic)) // 1000 * 1000 + 1000
        if cut_first:
            publish_cut(s, cut)
        with worker_of(engine, s, home / "worker.log"):
            bus.publish([validator.validate(e, now) for e in waves[1]])
            if not cut_first:
                publish_cut(s, cut)
            cells.drop_below(cut)
            records = read_all(s.kafka_bootstrap, s.topic)
            below = [json.loads(r[3]) for r in records if r[2] < cut]
            wait_exact(lambda: served(cells, below, cut), recompute(events))
    bus.close()


@pytest.mark.kafka
@needs_java
@pytest.mark.parametrize("engine", ENGINES)
def test_poison_goes_to_the_dead_letter_topic_and_the_partition_keeps_flowing(
    broker: KafkaBroker, tmp_path: Path, engine: str
) -> None:
    s = kafka_settings(broker, tmp_path, partitions=1, speed_metrics_port=free_port())
    good = synthetic(400, seed=3)
    poison = [
        b"not json {",
        json.dumps({"event_id": "p1", "type": "pageview", "ts": 1}).encode(),
        json.dumps({"event_id": "p2", "type": "refund", "ts": 1}).encode(),
        json.dumps([1, 2]).encode(),
        json.dumps({"event_id": "p3", "type": "pageview", "ts": 1, "url": "/", "user_id": "u",
                    "duration_ms": 2**63}).encode(),  # past int64: the archiver refuses it too
    ]
    before = dead_letters(s, engine)
    records = encoded(good[:200]) + [(b"k", p) for p in poison] + encoded(good[200:])
    publish_raw(s.kafka_bootstrap, s.topic, records)
    with feed_of(s) as cells, worker_of(engine, s, tmp_path / "worker.log"):
        wait_exact(lambda: served(cells, [], 0), recompute(good))
        after = dead_letters(s, engine)
    dead = read_all(s.kafka_bootstrap, dlq_topic(s.topic))
    assert [r[3] for r in dead] == poison
    reasons = [r[4]["reason"].decode() for r in dead]
    assert reasons[0].startswith("$: not JSON")
    assert "url" in reasons[1] and "user_id" in reasons[1]
    assert "unknown event type 'refund'" in reasons[2]
    assert "JSON object" in reasons[3]
    assert reasons[4].startswith("duration_ms: must be a 64-bit integer")
    assert [r[4]["source"].decode() for r in dead] == [f"{s.topic}/0/{200 + i}" for i in range(5)]
    assert (after["json"] - before["json"], after["schema"] - before["schema"]) == (1, 4)


@pytest.mark.kafka
@needs_java
def test_the_quix_worker_publishes_once_read_to_the_end_not_at_its_cadence(
    broker: KafkaBroker, tmp_path: Path
) -> None:
    """Caught up, the worker commits what it read at once: events are served exactly within
    seconds although the backlog cadence (`flush_interval_ms`) is 60 s."""
    s = kafka_settings(broker, tmp_path, flush_interval_ms=60_000)
    first, second = synthetic(50, seed=21), synthetic(50, seed=22)
    with feed_of(s) as cells, in_process_worker(s):
        publish_raw(s.kafka_bootstrap, s.topic, encoded(first))
        wait_exact(lambda: served(cells, [], 0), recompute(first), timeout=30)
        publish_raw(s.kafka_bootstrap, s.topic, encoded(second))
        wait_exact(lambda: served(cells, [], 0), recompute(first + second), timeout=20)


@pytest.mark.kafka
@needs_java
def test_a_fenced_quix_worker_stops_on_its_failed_transaction(
    broker: KafkaBroker, tmp_path: Path
) -> None:
    """A transaction commits in the background while the worker folds on: when it fails (a
    successor with the worker's transactional id fenced it), the worker raises that error
    at its next transaction rather than folding on and publishing nothing."""
    s = kafka_settings(broker, tmp_path)
    speed = QuixSpeed(s, project, open_store(s.store_url), "fenced")
    stop, failed = threading.Event(), []

    def run() -> None:
        try:
            speed.run(stop)
        except KafkaException as exc:
            failed.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        with feed_of(s) as cells:
            first = synthetic(50, seed=41)
            publish_raw(s.kafka_bootstrap, s.topic, encoded(first))
            wait_exact(lambda: served(cells, [], 0), recompute(first), timeout=30)
        successor = Producer({"bootstrap.servers": s.kafka_bootstrap,
                              "transactional.id": f"{group_id(s)}.fenced"})
        successor.init_transactions(30)
        publish_raw(s.kafka_bootstrap, s.topic, encoded(synthetic(50, seed=42)))
        thread.join(30)
        assert not thread.is_alive(), "the fenced worker folds on"
        # Fenced, the producer is in a fatal state: the commit's error says so itself; a
        # produce that comes first fails with the code of that state instead.
        assert failed and is_fatal(failed[0].args[0])
    finally:
        stop.set()
        thread.join(60)


def is_fatal(error: KafkaError) -> bool:
    return bool(error.fatal() or error.code() == KafkaError._FATAL)


def dead_letters(settings: Settings, engine: str) -> dict[str, float]:
    """The speed layer's dead-letter counters: this process's for the Quix driver (a thread
    here), scraped from the worker's /metrics for Faust (a fresh process: zero before)."""
    if engine == "quix":
        return {kind: REGISTRY.get_sample_value("lambdalake_speed_dead_letters_total",
                                                {"kind": kind}) or 0 for kind in KINDS}
    base = f"http://127.0.0.1:{settings.speed_metrics_port}"
    try:
        assert httpx.get(f"{base}/healthz").json() == {"status": "ok"}
        text = httpx.get(f"{base}/metrics").text
    except httpx.ConnectError:  # not started yet
        return dict.fromkeys(KINDS, 0)
    samples = {s.labels["kind"]: s.value for family in text_string_to_metric_families(text)
               for s in family.samples if s.name == "lambdalake_speed_dead_letters_total"}
    return {kind: samples.get(kind, 0) for kind in KINDS}


@contextmanager
def worker_of(engine: str, settings: Settings, log: Path) -> Iterator[None]:
    """The Quix driver in a thread of this process, or a Faust worker process."""
    if engine == "quix":
        with in_process_worker(settings):
            yield
        return
    with workers(worker_process) as start:
        worker = start(settings, "w1", log, engine)
        yield
        worker.terminate()
        assert worker.wait(60) == 0


@pytest.mark.kafka
@needs_java
@pytest.mark.parametrize(("engine", "n"), [("quix", 200_000), FAUST_LONG])
def test_worker_killed_mid_stream_restarts_without_double_counting(
    broker: KafkaBroker, spawn: Any, tmp_path: Path, engine: str, n: int
) -> None:
    s = kafka_settings(broker, tmp_path, slice_seconds=60)
    first, second = synthetic(n, seed=11), synthetic(n // 6, seed=12)
    publish_raw(s.kafka_bootstrap, s.topic, encoded(first))
    log = tmp_path / "worker.log"
    with feed_of(s) as cells:
        worker = spawn(s, "w1", log, engine)
        wait_until(lambda: counted(cells) > n // 8)
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        assert counted(cells) < 0.95 * len(first), "killed too late to be mid-stream"
        publish_raw(s.kafka_bootstrap, s.topic, encoded(second))
        worker = spawn(s, "w1", log, engine)
        wait_exact(lambda: served(cells, [], 0), recompute(first + second))
        worker.terminate()
        assert worker.wait(60) == 0


@pytest.mark.kafka
@needs_java
@pytest.mark.long
@pytest.mark.parametrize(("engine", "n"), [("quix", 200_000), FAUST_LONG])
def test_a_broker_pause_mid_stream_neither_loses_nor_doubles(
    broker: KafkaBroker, tmp_path: Path, engine: str, n: int
) -> None:
    """The broker frozen for 5 s while a worker reads, folds and commits: its open
    transaction waits, then commits or is aborted and read again; the answers stay exact."""
    s = kafka_settings(broker, tmp_path, slice_seconds=60)
    first, second = synthetic(n, seed=31), synthetic(n // 6, seed=32)
    publish_raw(s.kafka_bootstrap, s.topic, encoded(first))
    with feed_of(s) as cells, worker_of(engine, s, tmp_path / "worker.log"):
        wait_until(lambda: counted(cells) > n // 8)
        with broker.paused():
            time.sleep(5)
        publish_raw(s.kafka_bootstrap, s.topic, encoded(second))
        wait_exact(lambda: served(cells, [], 0), recompute(first + second))


@pytest.mark.kafka
@needs_java
@pytest.mark.parametrize(
    "engine", [pytest.param(e, marks=pytest.mark.long) if e == "faust" else e for e in ENGINES])
def test_two_workers_split_the_partitions_and_stay_exact_through_rebalances(
    broker: KafkaBroker, spawn: Any, tmp_path: Path, engine: str
) -> None:
    s = kafka_settings(broker, tmp_path, slice_seconds=60)
    waves = [synthetic(20_000, seed=21), synthetic(20_000, seed=22), synthetic(10_000, seed=23)]
    publish_raw(s.kafka_bootstrap, s.topic, encoded(waves[0]))
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    with feed_of(s) as cells:
        a = spawn(s, "a", logs[0], engine)
        wait_until(lambda: counted(cells) > 2_000)
        b = spawn(s, "b", logs[1], engine)  # joins the group: a rebalance
        publish_raw(s.kafka_bootstrap, s.topic, encoded(waves[1]))
        wait_until(lambda: any(0 < len(p) < 4 for p in assignments(logs[1])))
        a.terminate()  # leaves the group: b takes every partition
        assert a.wait(60) == 0
        publish_raw(s.kafka_bootstrap, s.topic, encoded(waves[2]))
        wait_exact(lambda: served(cells, [], 0), recompute(waves[0] + waves[1] + waves[2]), 150)
        b.terminate()
        assert b.wait(60) == 0
    split = [p for p in assignments(logs[0]) if 0 < len(p) < 4]
    assert split and set(split[-1]).isdisjoint(assignments(logs[1])[0])
    assert sorted(assignments(logs[1])[-1]) == [0, 1, 2, 3]


def assignments(log: Path) -> list[list[int]]:
    """The partitions a worker was given, in order, from its JSON log lines."""
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    return [line["partitions"] for line in lines if line["msg"].startswith("partitions assigned")]


def test_a_failing_rebalance_callback_is_logged_with_its_cause(caplog):
    """Raised inside `consume`, confluent-kafka reports a callback's exception as a bare
    SystemError naming nothing: the worker logs the cause before it exits."""

    @reported
    def _assign(_consumer: object, partitions: list) -> None:
        raise KafkaException("Failed to get committed offsets: Local: Timed out")

    with pytest.raises(KafkaException):
        _assign(None, [])
    [record] = [r for r in caplog.records if r.name == "lambdalake.speed.quix"]
    assert record.callback == "_assign" and "Timed out" in record.exc_text
