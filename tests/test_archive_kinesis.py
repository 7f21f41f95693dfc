"""The archiver on Kinesis, on moto's Kinesis and S3 (the `s3_server` fixture): the local
runtime's Kinesis mapping (lineage, checkpoints, partial batch responses), the archive
handler on the AWS Kinesis event (sequence-named objects, per-shard watermarks, KPL, dead
letters, arrival), and the batch cut and answers through a split and a merge mid-stream.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import boto3
import pyarrow.parquet as pq
import pytest
from batch_lakes import published
from prometheus_client import REGISTRY

from lambdalake import kinesis, master
from lambdalake.batch.duckdb_engine import DuckDBEngine
from lambdalake.batch.run import run_batch
from lambdalake.bus import open_bus
from lambdalake.eventlog import now_ms
from lambdalake.events import Event, Validator
from lambdalake.example import project
from lambdalake.functions import archive, environment
from lambdalake.functions.runtime.function import LocalFunction
from lambdalake.functions.runtime.kinesis_source import KinesisMapping, kinesis_event
from lambdalake.functions.runtime.local import LocalRuntime
from lambdalake.functions.runtime.template import FunctionSpec, KinesisSource
from lambdalake.settings import Settings
from lambdalake.storage import ObjectStore, open_store
from lambdalake.synthetic import WebAnalyticsStream

pytestmark = pytest.mark.s3
VALIDATOR = Validator(project.schemas, 300_000)


# ---------------------------------------------------------------- helpers


@pytest.fixture
def settings(s3_server: str, tmp_path: Path) -> Settings:
    """A fresh stream of 2 shards and a fresh bucket on the moto server."""
    name = f"k{time.time_ns()}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return Settings(home=tmp_path, bus="kinesis", kinesis_stream=name, partitions=2,
                    kinesis_endpoint_url=s3_server, store=f"s3://{name}/lake",
                    s3_endpoint_url=s3_server, gateway_port=0, slice_seconds=1)


@pytest.fixture
def bound(settings: Settings):
    environment.bind(settings)
    yield settings
    environment.bind(None)


def client(settings: Settings) -> Any:
    return kinesis.client(settings.kinesis_endpoint_url)


def store_of(settings: Settings) -> ObjectStore:
    return open_store(settings.store_url, settings.s3_endpoint_url)


def valid_events(count: int, seed: int = 1) -> list[Event]:
    stream = WebAnalyticsStream(seed=seed, duplicate_share=0)
    found = []
    while len(found) < count:
        result = VALIDATOR.validate(stream.event(now_ms()), now_ms())
        if isinstance(result, Event):
            found.append(result)
    return found


def archived(store: ObjectStore) -> list[dict[str, Any]]:
    fs, root = store.arrow()
    rows: list[dict[str, Any]] = []
    for event_type in project.schemas:
        for key in master.data_keys(store, event_type):
            table = pq.read_table(f"{root}/{key}", filesystem=fs,
                                  columns=["event_id", "arrival", "partition", "offset"])
            rows += table.to_pylist()
    return rows


def dead_letters(store: ObjectStore) -> list[dict[str, Any]]:
    return [json.loads(line) for key in store.list(f"{master.DEAD_LETTER}/")
            for line in store.get(key).splitlines() if line]


def shard_records(settings: Settings, shard_id: str) -> list[kinesis.KinesisRecord]:
    shard = next(s for s in kinesis.list_shards(client(settings), settings.kinesis_stream)
                 if s.shard_id == shard_id)
    reader = kinesis.ShardReader(client(settings), settings.kinesis_stream, shard,
                                 kinesis.Position.trim_horizon(), deaggregate=False)
    return list(kinesis.read_until_quiet(reader))


def stream_arn(settings: Settings) -> str:
    summary = client(settings).describe_stream_summary(StreamName=settings.kinesis_stream)
    return str(summary["StreamDescriptionSummary"]["StreamARN"])


def wait_for(condition: Callable[[], bool], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def counter(outcome: str) -> float:
    return REGISTRY.get_sample_value("lambdalake_archive_records_total",
                                     {"outcome": outcome}) or 0.0


# ---------------------------------------------------------------- the runtime end to end


def test_events_on_the_bus_are_archived_once_per_shard_with_watermarks(settings: Settings):
    events = valid_events(600)
    open_bus(settings).publish(events)
    kpl = valid_events(5, seed=9)  # one KPL aggregate written by a producer directly
    client(settings).put_record(
        StreamName=settings.kinesis_stream, PartitionKey=kpl[0].event_id,
        Data=kinesis.aggregate([(e.event_id, e.to_json()) for e in kpl]))
    started, store = now_ms(), store_of(settings)
    with LocalRuntime(settings, on_shard=archive.ON_SHARD):
        wait_for(lambda: len(marks := master.watermarks(store)) == 2
                 and min(m["watermark"] for m in marks.values()) > started)
    rows = archived(store)
    assert sorted(r["event_id"] for r in rows) == sorted(e.event_id for e in events + kpl)
    for index, mark in master.watermarks(store).items():
        on_shard = sorted((r["offset"], r["arrival"]) for r in rows if r["partition"] == index)
        assert [offset for offset, _ in on_shard] == list(range(mark["next_offset"]))
        arrivals = [arrival for _, arrival in on_shard]
        assert arrivals == sorted(arrivals)  # never decreasing within a shard
        assert mark["sequence"] == shard_records(settings, mark["shard"])[-1].sequence_number
    for key in store.list("master/type="):
        first, last = key.rsplit("/", 1)[1].removesuffix(".parquet").split("-")
        assert int(first) <= int(last)  # named by the shard's sequence range
