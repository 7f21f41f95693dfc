"""The archiver on Kafka: the local runtime's stream mapping polls the real broker, lands
every event in the master dataset once, commits only after the objects are written, and
advances the watermarks of idle partitions.
"""

from __future__ import annotations

import time
from pathlib import Path

import orjson
import pyarrow.parquet as pq
import pytest

from lambdalake.bus import open_bus
from lambdalake.eventlog import now_ms
from lambdalake.events import Validator
from lambdalake.example import project
from lambdalake.functions import archive
from lambdalake.functions.runtime.local import LocalRuntime
from lambdalake.master import data_keys, watermarks
from lambdalake.settings import Settings
from lambdalake.storage import open_store
from lambdalake.synthetic import WebAnalyticsStream

pytestmark = pytest.mark.kafka


def archived_ids(store, event_type: str) -> list[str]:
    fs, root = store.arrow()
    ids: list[str] = []
    for key in data_keys(store, event_type):
        ids += pq.read_table(f"{root}/{key}", filesystem=fs, columns=["event_id"])[0].to_pylist()
    return ids


def test_kafka_events_are_archived_once_with_watermarks(kafka_broker, tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, bus="kafka", kafka_bootstrap=kafka_broker.bootstrap,
                        topic=f"archive-{time.time_ns()}", partitions=3, gateway_port=0)
    validator = Validator(project.schemas, settings.max_future_seconds * 1000)
    stream = WebAnalyticsStream(seed=3, duplicate_share=0)
    events = [validator.validate(stream.event(now_ms()), now_ms()) for _ in range(2_000)]
    open_bus(settings).publish(events)
    started = now_ms()
    store = open_store(settings.store_url)
    with LocalRuntime(settings, on_drained=archive.ON_DRAINED):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            marks = watermarks(store)
            if len(marks) == 3 and min(m["watermark"] for m in marks.values()) > started:
                break
            time.sleep(0.2)
    ids = archived_ids(store, "pageview") + archived_ids(store, "purchase")
    assert sorted(ids) == sorted(e.event_id for e in events)
    marks = watermarks(store)
    assert sum(m["next_offset"] for m in marks.values()) == len(events)
    assert min(m["watermark"] for m in marks.values()) > started  # idle partitions advance


def test_a_partition_reads_from_any_offset_again_and_at_most_max_records(
        kafka_broker, tmp_path: Path) -> None:
    """The mapping reads a batch again from its first offset after a failure, and a shorter
    one when the payload bound cut it: each read starts where it is asked."""
    from lambdalake.functions.runtime.kafka_source import KafkaTopic

    settings = Settings(home=tmp_path, bus="kafka", kafka_bootstrap=kafka_broker.bootstrap,
                        topic=f"reads-{time.time_ns()}", partitions=1)
    validator = Validator(project.schemas, settings.max_future_seconds * 1000)
    stream = WebAnalyticsStream(seed=5, duplicate_share=0)
    events = [validator.validate(stream.event(now_ms()), now_ms()) for _ in range(50)]
    open_bus(settings).publish(events)
    topic = KafkaTopic(settings.kafka_bootstrap, settings.topic)
    try:
        (partition,) = topic.partitions
        assert partition.end == 50
        first = partition.read(0, 20)
        assert [r.offset for r in first] == list(range(len(first))) and 0 < len(first) <= 20
        assert [r.value for r in partition.read(5, 1)] == [first[5].value]  # back, one
        rest, offset = [], 6
        while offset < 50:
            rest += partition.read(offset, 50)
            offset = rest[-1].offset + 1
        read = first[:6] + rest
        assert [r.offset for r in read] == list(range(50))
        assert sorted(orjson.loads(r.value)["event_id"] for r in read) == sorted(
            e.event_id for e in events)
        assert all(a.arrival <= b.arrival for a, b in zip(read, read[1:], strict=False))
    finally:
        topic.close()
