"""The archiver on Kafka: the local runtime's stream mapping polls the real broker, lands
every event in the master dataset once, commits only after the objects are written, and
advances the watermarks of idle partitions.
"""

from __future__ import annotations

import time
from pathlib import Path

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
