"""Reading a Kinesis Data Stream with boto3: shards and their lineage, iterators, records,
KPL de-aggregation and the arrival time every reader of a shard agrees on.

The API (what the archive mapping and the speed driver build on):

- `client(endpoint_url)`: a boto3 Kinesis client (an endpoint URL for moto in tests);
  `ensure_stream(client, stream, shards)` creates the stream if missing and waits for it.
- `list_shards(client, stream)` -> `[Shard]`: every shard the stream still holds, open or
  closed, with `parents` (ParentShardId, AdjacentParentShardId) and `ending_sequence`
  (set once the shard is closed by a split or a merge).
- `readable(shards, finished)`: the shards to read now. A child is read only once each of
  its parents is finished, i.e. closed and read to its end; a parent no longer listed (past
  the stream's retention) counts as finished. `in_lineage_order(shards)` orders a whole
  listing parents first; `children(shards, shard_id)` the shards it was split or merged into.
- `Position`: where a reader starts (`Position.trim_horizon()`, `.latest()`,
  `.at_timestamp(ms)`, `.after(sequence)`, `.at(sequence)`); `shard_iterator(...)` turns one
  into a shard iterator.
- `ShardReader(client, stream, shard, position, arrival_floor)`: `read(limit)` one
  GetRecords call -> `[KinesisRecord]` (de-aggregated unless `deaggregate=False`, arrival
  clamped), `millis_behind` (MillisBehindLatest), `finished` once a
  closed shard is read to its end, `arrival` the shard's running arrival, `position` where a
  reader resumes after what was returned.
  `read_until_quiet(reader)` reads a shard to its end or until it stays empty (tests, tools).
- `KinesisRecord`: shard id, sequence number (decimal text), sub-sequence (the index of a
  user record inside a KPL aggregate; 0 for a plain record), partition key, data bytes,
  the service's `approximate_arrival_ms` and the clamped `arrival_ms`.
- `deaggregate(data)` -> `[(partition key, data)]` of a KPL aggregated record, or None for a
  plain one; `aggregate(...)` writes the KPL format (producers, tests).
- `arrival_ms(value)`: ApproximateArrivalTimestamp (a boto3 datetime, or the Lambda event's
  epoch seconds) in integer milliseconds, rounded the same way for both.
- `next_arrival(previous, approximate_ms)`: the arrival rule, below.
- `shard_index(shard_id)`: the number in `shardId-000000000007` (the master dataset's
  partition column); `sequence_key(sequence)` the number a sequence number orders by.

Arrival on Kinesis. `ApproximateArrivalTimestamp` is stamped by the service and may step
back within a shard (it is approximate, stamped by several hosts). A record's arrival is the
running maximum of the approximate arrival times of its shard, in sequence order, starting
from the shard's floor: 0 for a shard without parents, else the largest final arrival of its
parents. So arrival never decreases within a shard, and a child's records never arrive
before its parents' last ones. Every reader that reads a shard in order from the same floor
computes the same arrivals; the archiver keeps the running maximum in the shard's watermark.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

KPL_MAGIC = b"\xf3\x89\x9a\xc2"
_MD5_BYTES = 16
_SHARD_ID = re.compile(r"^shardId-(\d{1,12})$")
MAX_GET_RECORDS = 10_000
MAX_PUT_RECORDS = 500
MAX_PUT_BYTES = 5 * 1024 * 1024
MAX_RECORD_BYTES = 1024 * 1024  # data plus partition key


def client(endpoint_url: str | None = None) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=5, read_timeout=10,
                    retries={"mode": "standard", "max_attempts": 3})
    return boto3.client("kinesis", endpoint_url=endpoint_url, config=config)


def ensure_stream(kinesis: Any, stream: str, shards: int, wait_s: float = 60.0) -> None:
    """Create the stream with `shards` shards if it does not exist; return once it is
    ACTIVE (or UPDATING: readable and writable while it reshards)."""
    with contextlib.suppress(kinesis.exceptions.ResourceInUseException):  # it exists
        kinesis.create_stream(StreamName=stream, ShardCount=shards)
    deadline = time.monotonic() + wait_s
    while True:
        status = kinesis.describe_stream_summary(StreamName=stream)[
            "StreamDescriptionSummary"]["StreamStatus"]
        if status in ("ACTIVE", "UPDATING"):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"Kinesis stream {stream} is still {status} after {wait_s:g} s")
        time.sleep(0.5)


def shard_index(shard_id: str) -> int:
    """The number of a shard id (`shardId-000000000007` -> 7): Kinesis numbers shards in the
    order it creates them, so a child's is larger than its parents'."""
    found = _SHARD_ID.match(shard_id)
    if found is None:
        raise ValueError(f"not a Kinesis shard id: {shard_id!r}")
    return int(found.group(1))


def sequence_key(sequence: str) -> int:
    """What a sequence number orders by within a shard (they are decimal, up to 128 digits)."""
    return int(sequence)


def arrival_ms(value: datetime | float | int) -> int:
    """ApproximateArrivalTimestamp in whole ms: a boto3 datetime or epoch seconds (the Lambda
    event's `approximateArrivalTimestamp`)."""
    seconds = value.timestamp() if isinstance(value, datetime) else float(value)
    return round(seconds * 1000)


def next_arrival(previous: int, approximate_ms: int) -> int:
    """A record's arrival: the running maximum of its shard's approximate arrival times."""
    return approximate_ms if approximate_ms > previous else previous


# ---------------------------------------------------------------- shards and their lineage


@dataclass(frozen=True, slots=True)
class Shard:
    shard_id: str
    parents: tuple[str, ...]
    starting_sequence: str
    ending_sequence: str | None  # None: open

    @property
    def closed(self) -> bool:
        return self.ending_sequence is not None

    @property
    def index(self) -> int:
        return shard_index(self.shard_id)

    @classmethod
    def from_api(cls, found: dict[str, Any]) -> Shard:
        parents = tuple(
            found[key] for key in ("ParentShardId", "AdjacentParentShardId") if found.get(key)
        )
        numbers = found["SequenceNumberRange"]
        return cls(found["ShardId"], parents, numbers["StartingSequenceNumber"],
                   numbers.get("EndingSequenceNumber"))


def list_shards(kinesis: Any, stream: str) -> list[Shard]:
    """Every shard the stream holds (ListShards, all pages), ordered by shard id."""
    shards, token = [], None
    while True:
        page = (kinesis.list_shards(NextToken=token) if token
                else kinesis.list_shards(StreamName=stream))
        shards += [Shard.from_api(found) for found in page["Shards"]]
        token = page.get("NextToken")
        if not token:
            return sorted(shards, key=lambda s: s.index)


def readable(shards: Iterable[Shard], finished: set[str]) -> list[Shard]:
    """The shards to read now: not finished, and every parent finished (or gone from the
    listing, past the stream's retention)."""
    shards = list(shards)
    listed = {shard.shard_id for shard in shards}
    return [
        shard for shard in shards
        if shard.shard_id not in finished
        and all(p in finished or p not in listed for p in shard.parents)
    ]


def in_lineage_order(shards: Iterable[Shard]) -> list[Shard]:
    """The shards, every parent before its children (shard ids grow from parent to child)."""
    return sorted(shards, key=lambda s: s.index)


def children(shards: Iterable[Shard], shard_id: str) -> list[str]:
    return [s.shard_id for s in shards if shard_id in s.parents]


# ---------------------------------------------------------------- positions and iterators


@dataclass(frozen=True, slots=True)
class Position:
    """Where a reader starts in a shard (a ShardIteratorType and its argument)."""

    kind: str
    sequence: str | None = None
    timestamp_ms: int | None = None

    @classmethod
    def trim_horizon(cls) -> Position:
        return cls("TRIM_HORIZON")

    @classmethod
    def latest(cls) -> Position:
        return cls("LATEST")

    @classmethod
    def at_timestamp(cls, timestamp_ms: int) -> Position:
        return cls("AT_TIMESTAMP", timestamp_ms=timestamp_ms)

    @classmethod
    def after(cls, sequence: str) -> Position:
        return cls("AFTER_SEQUENCE_NUMBER", sequence=sequence)

    @classmethod
    def at(cls, sequence: str) -> Position:
        return cls("AT_SEQUENCE_NUMBER", sequence=sequence)


def shard_iterator(kinesis: Any, stream: str, shard_id: str, position: Position) -> str:
    arguments: dict[str, Any] = {"StreamName": stream, "ShardId": shard_id,
                                 "ShardIteratorType": position.kind}
    if position.sequence is not None:
        arguments["StartingSequenceNumber"] = position.sequence
    if position.timestamp_ms is not None:
        arguments["Timestamp"] = position.timestamp_ms / 1000
    return str(kinesis.get_shard_iterator(**arguments)["ShardIterator"])


# ---------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class KinesisRecord:
    shard_id: str
    sequence_number: str
    sub_sequence: int  # a user record's index inside a KPL aggregate; 0 for a plain record
    partition_key: str
    data: bytes
    approximate_arrival_ms: int
    arrival_ms: int  # never decreasing within the shard (see the module's docstring)


def user_records(
    shard_id: str, sequence: str, partition_key: str, data: bytes, approximate_ms: int,
    arrival: int,
) -> list[KinesisRecord]:
    """The user records one Kinesis record holds: itself, or each record of its KPL
    aggregate (with the aggregate's sequence number and arrival)."""
    parts = deaggregate(data) or [(partition_key, data)]
    return [KinesisRecord(shard_id, sequence, index, key, value, approximate_ms, arrival)
            for index, (key, value) in enumerate(parts)]


class ShardReader:
    """Reads one shard in order with GetRecords, from `position`, clamping arrival from
    `arrival_floor` (the largest final arrival of the shard's parents; 0 without any)."""

    def __init__(self, kinesis: Any, stream: str, shard: Shard, position: Position,
                 arrival_floor: int = 0, deaggregate: bool = True):
        self.kinesis, self.stream, self.shard = kinesis, stream, shard
        self.position, self.arrival = position, arrival_floor
        self.deaggregate = deaggregate  # False: a KPL aggregate stays one record (Lambda's)
        self.finished = False
        self.millis_behind = 0
        self._iterator: str | None = None

    def read(self, limit: int = MAX_GET_RECORDS) -> list[KinesisRecord]:
        """One GetRecords call: the next records (possibly none), de-aggregated."""
        if self.finished:
            return []
        if self._iterator is None:
            self._iterator = shard_iterator(self.kinesis, self.stream, self.shard.shard_id,
                                            self.position)
        answer = self.kinesis.get_records(ShardIterator=self._iterator, Limit=limit)
        self._iterator = answer.get("NextShardIterator")
        self.millis_behind = int(answer.get("MillisBehindLatest", 0))
        records: list[KinesisRecord] = []
        for found in answer["Records"]:
            approximate = arrival_ms(found["ApproximateArrivalTimestamp"])
            self.arrival = next_arrival(self.arrival, approximate)
            sequence, key, data = found["SequenceNumber"], found["PartitionKey"], found["Data"]
            shard_id = self.shard.shard_id
            records += (
                user_records(shard_id, sequence, key, data, approximate, self.arrival)
                if self.deaggregate
                else [KinesisRecord(shard_id, sequence, 0, key, data, approximate, self.arrival)])
        if records:
            self.position = Position.after(records[-1].sequence_number)
        self.finished = self._at_end(records)
        return records

    def _at_end(self, records: list[KinesisRecord]) -> bool:
        """A closed shard read to its end: AWS ends its iterator there; moto's never ends,
        so an empty answer with nothing behind on a closed shard ends it too."""
        if self._iterator is None:
            return True
        ending = self.shard.ending_sequence
        if ending is None:
            return False
        if records and sequence_key(records[-1].sequence_number) >= sequence_key(ending):
            return True
        return not records and self.millis_behind == 0

    def restart(self, position: Position) -> None:
        """Read from `position` again (after a failed batch, or a newer listing of the shard)."""
        self.position, self._iterator, self.finished = position, None, False

    def reopen(self, shard: Shard) -> None:
        """The shard as listed now (e.g. closed since), keeping the position."""
        self.shard = shard
        self._iterator = None


def read_until_quiet(reader: ShardReader, pause_s: float = 0.05,
                     max_empty: int = 3) -> Iterator[KinesisRecord]:
    """Every record up to the shard's end or until `max_empty` empty answers in a row
    (tests and tools; long-running readers poll `read` themselves)."""
    empty = 0
    while not reader.finished and empty < max_empty:
        records = reader.read()
        empty = 0 if records else empty + 1
        yield from records
        if not records:
            time.sleep(pause_s)


# ---------------------------------------------------------------- the KPL aggregated format


class _Protobuf:
    """A protobuf message's fields, read by hand: (field number, wire type, value)."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def varint(self) -> int:
        result, shift = 0, 0
        while True:
            if self.pos >= len(self.data) or shift > 63:
                raise ValueError("truncated varint")
            byte = self.data[self.pos]
            self.pos += 1
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                return result
            shift += 7

    def fields(self) -> Iterator[tuple[int, int, Any]]:
        while self.pos < len(self.data):
            key = self.varint()
            number, wire = key >> 3, key & 7
            if wire == 0:
                yield number, wire, self.varint()
            elif wire == 2:
                size = self.varint()
                end = self.pos + size
                if end > len(self.data):
                    raise ValueError("truncated field")
                yield number, wire, self.data[self.pos:end]
                self.pos = end
            elif wire in (1, 5):
                self.pos += 8 if wire == 1 else 4
                if self.pos > len(self.data):
                    raise ValueError("truncated field")
            else:
                raise ValueError(f"unsupported wire type {wire}")


def deaggregate(data: bytes) -> list[tuple[str, bytes]] | None:
    """The (partition key, data) of every user record of a KPL aggregated record, or None
    when `data` is not one (no magic, a wrong MD5, or a body that is not an
    AggregatedRecord: then it is a plain record, as the KCL reads it)."""
    if not data.startswith(KPL_MAGIC) or len(data) < len(KPL_MAGIC) + _MD5_BYTES:
        return None
    body, digest = data[len(KPL_MAGIC):-_MD5_BYTES], data[-_MD5_BYTES:]
    if hashlib.md5(body).digest() != digest:
        return None
    try:
        return _aggregated_records(body)
    except (ValueError, IndexError, UnicodeDecodeError):
        return None


def _aggregated_records(body: bytes) -> list[tuple[str, bytes]]:
    keys: list[str] = []
    records: list[tuple[int, bytes]] = []
    for number, wire, value in _Protobuf(body).fields():
        if number == 1 and wire == 2:
            keys.append(value.decode())
        elif number == 3 and wire == 2:
            records.append(_user_record(value))
    return [(keys[key_index], data) for key_index, data in records]


def _user_record(message: bytes) -> tuple[int, bytes]:
    key_index, data = None, None
    for number, wire, value in _Protobuf(message).fields():
        if number == 1 and wire == 0:
            key_index = value
        elif number == 3 and wire == 2:
            data = value
    if key_index is None or data is None:
        raise ValueError("a user record without its partition key index or data")
    return key_index, data


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def aggregate(records: list[tuple[str, bytes]]) -> bytes:
    """A KPL aggregated record of (partition key, data) user records."""
    keys = {key: index for index, key in enumerate(dict.fromkeys(k for k, _ in records))}
    body = b"".join(_field(1, key.encode()) for key in keys)
    for key, data in records:
        user = _varint(1 << 3) + _varint(keys[key]) + _field(3, data)
        body += _field(3, user)
    return KPL_MAGIC + body + hashlib.md5(body).digest()
