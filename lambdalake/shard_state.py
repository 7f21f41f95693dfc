"""The Kinesis speed layer's state per shard in the object store: a snapshot plus deltas, and
a head naming them. Written by the speed workers (`speed.kinesis_state`), read back by a
worker that takes a shard over and, as the real-time feed, by every serving replica
(`serving.realtime_feed.StoreFeed`).

Per shard, under `speed/kinesis/<stream>/<shard id>/`:
- `head.json`: the lease epoch of its writer, the last sequence number folded, the shard's
  arrival (running maximum) and the floor it started from, whether the shard is finished
  (closed and read to its end), the heartbeat (`caught_up_at`, the views' digest), the
  snapshot and the deltas after it. Only
  ever changed by a conditional write on its entity tag (`ObjectStore.replace`), so of two
  writers that read the same head one wins; a worker that takes a shard over first rewrites
  the head with its epoch (a claim), which refuses every later write of the previous owner.
- `d-<epoch>-<n>.json`: a delta, the records one flush wrote, as the Kafka drivers write
  them to their compacted topics (`speed.kafka_common.PartitionState`): `realtime` (cells,
  tombstones, the heartbeat) and `changelog` (dedup ids, meta), each `[key, value|null]`.
- `s-<epoch>-<n>-realtime.json` and `-changelog.json`: a snapshot, the latest value of every
  key of the deltas before it (tombstones removed), cells apart from ids so that a serving
  replica reads only the cells.
Immutable objects are named by the writer's epoch, so two writers never write one key.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

from lambdalake.storage import NotFound, ObjectStore

PREFIX = "speed/kinesis"
HEAD_FORMAT = 1
Record = tuple[bytes, bytes | None]  # (key, value); a None value is a tombstone


def shard_prefix(stream: str, shard_id: str = "") -> str:
    return f"{PREFIX}/{stream}/{shard_id + '/' if shard_id else ''}"


def head_key(stream: str, shard_id: str) -> str:
    return f"{shard_prefix(stream, shard_id)}head.json"


@dataclass
class Head:
    shard_id: str
    epoch: int
    owner: str
    sequence: str | None = None  # the last sequence number folded (None: nothing yet)
    arrival: int = 0
    floor: int = 0  # the arrival the shard started from: its parents' final one
    finished: bool = False
    heartbeat: dict[str, Any] = field(default_factory=dict)
    snapshot: dict[str, str] = field(default_factory=dict)  # "realtime"/"changelog" -> key
    deltas: list[str] = field(default_factory=list)
    format: int = HEAD_FORMAT

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_json(cls, data: bytes) -> Head:
        return cls(**orjson.loads(data))


def read_head(store: ObjectStore, stream: str, shard_id: str) -> tuple[Head, str] | None:
    """The shard's head and its entity tag; None before any worker claimed the shard."""
    try:
        data, tag = store.get_tagged(head_key(stream, shard_id))
    except NotFound:
        return None
    return Head.from_json(data), tag


def shards_with_state(store: ObjectStore, stream: str) -> list[str]:
    """The shards of the stream some worker has written state for."""
    prefix = shard_prefix(stream)
    return sorted({key[len(prefix):].split("/", 1)[0] for key in store.list(prefix)
                   if key.endswith("/head.json")})


def encode_records(records: Iterable[Record]) -> list[list[str | None]]:
    return [[key.decode(), None if value is None else value.decode()] for key, value in records]


def decode_records(pairs: Iterable[list[str | None]]) -> list[Record]:
    return [(str(key).encode(), None if value is None else value.encode())
            for key, value in pairs]


def read_delta(store: ObjectStore, key: str) -> dict[str, list[Record]]:
    saved = orjson.loads(store.get(key))
    return {part: decode_records(saved[part]) for part in ("realtime", "changelog")}


def read_snapshot(store: ObjectStore, head: Head, part: str) -> list[Record]:
    """One part (`realtime` or `changelog`) of the head's snapshot; none before the first."""
    key = head.snapshot.get(part)
    return decode_records(orjson.loads(store.get(key))) if key else []


def records_of(store: ObjectStore, head: Head, part: str) -> Iterator[Record]:
    """Every record of one part the head names, snapshot first, then each delta in order."""
    yield from read_snapshot(store, head, part)
    for key in head.deltas:
        yield from read_delta(store, key)[part]


def latest(records: Iterable[Record]) -> dict[bytes, bytes]:
    """The latest value of every key, tombstones removed (a compacted topic's view)."""
    values: dict[bytes, bytes] = {}
    for key, value in records:
        if value is None:
            values.pop(key, None)
        else:
            values[key] = value
    return values
