"""The embedded event log: the bus of the embedded default.

A topic is a folder of partitions; a partition is a folder of append-only segment files.
Each record is framed `length u32 | crc32 u32 | arrival_ms i64 | value`, the crc covering
length, arrival and value, and an append returns only after its bytes are fsynced, so an
acknowledged record survives kill -9. On open, a torn tail (a crash mid-append, never
acknowledged; zero-filled blocks included) is cut off.

Every record gets an arrival time that never decreases within its partition:
`max(previous arrival, floor, now)`. `seal` raises the floor to now and returns the end
offset, which lets a reader that has consumed up to that offset say "every later record
arrives at or after this time", which is what the batch cut needs from idle partitions.
The floor is written durably (the partition's `floor.json`) before `seal` returns it, so a
wall clock that steps back across a restart never gives a record an arrival below a seal
(nor below a cut chosen from one).
Consumer groups keep independent committed positions.

Retention deletes whole segments: `roll_older_than` closes the open segment once its first
record is old enough, and `drop_segments` deletes closed segments whose records are all
before a position (read by every consumer) and arrived before a time (the cut of the oldest
batch version kept). Reads from a position in a deleted segment start at the first kept one.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import time
import zlib
from array import array
from dataclasses import dataclass
from pathlib import Path

_HEADER = struct.Struct("<IIq")
_CHECKED = struct.Struct("<Iq")  # the header fields the crc covers, with the value
SEGMENT_BYTES = 64 * 1024 * 1024


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _crc(value: bytes, arrival: int) -> int:
    # Covering the header too: a zero-filled tail (length 0, crc 0) is no valid empty record.
    return zlib.crc32(value, zlib.crc32(_CHECKED.pack(len(value), arrival)))


@dataclass(frozen=True, slots=True)
class Record:
    partition: int
    offset: int
    arrival: int
    value: bytes


class _Segment:
    def __init__(self, path: Path, base: int):
        self.path, self.base = path, base
        self.positions = array("q")
        self.size = 0
        self.first_arrival = self.last_arrival = 0

    def recover(self) -> int:
        """Index the valid records, cut a torn tail; return the last arrival (or 0)."""
        last_arrival = 0
        with open(self.path, "rb") as src:
            data = src.read()
        position = 0
        while position + _HEADER.size <= len(data):
            length, crc, arrival = _HEADER.unpack_from(data, position)
            end = position + _HEADER.size + length
            if end > len(data):
                break
            value = data[position + _HEADER.size : end]
            if _crc(value, arrival) != crc:
                break
            self.positions.append(position)
            self.first_arrival = self.first_arrival or arrival
            last_arrival, position = arrival, end
        if position != len(data):
            with open(self.path, "r+b") as out:
                out.truncate(position)
                os.fsync(out.fileno())
        self.size, self.last_arrival = position, last_arrival
        return last_arrival

    @property
    def end(self) -> int:
        return self.base + len(self.positions)


class Partition:
    def __init__(self, folder: Path, index: int):
        self.folder, self.index = folder, index
        folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._segments = [_Segment(p, int(p.stem)) for p in sorted(folder.glob("*.log"))]
        self._arrival = max([s.recover() for s in self._segments], default=0)
        self._floor_path = folder / "floor.json"
        self._floor = self._read_floor()
        if not self._segments:
            self._roll(0)
        self._out = open(self._segments[-1].path, "ab")

    @property
    def end(self) -> int:
        last = self._segments[-1]
        return last.base + len(last.positions)

    def _roll(self, base: int) -> None:
        path = self.folder / f"{base:020d}.log"
        path.touch()
        self._segments.append(_Segment(path, base))

    def append(self, values: list[bytes]) -> list[tuple[int, int]]:
        """Append durably; return (offset, arrival) per value."""
        with self._lock:
            if self._segments[-1].size > SEGMENT_BYTES:
                self._roll_open()
            segment = self._segments[-1]
            arrival = max(self._arrival, self._floor, now_ms())
            positions, frames, size = array("q"), [], segment.size
            for value in values:
                positions.append(size)
                frames.append(_HEADER.pack(len(value), _crc(value, arrival), arrival) + value)
                size += _HEADER.size + len(value)
            try:
                self._out.write(b"".join(frames))
                self._out.flush()
                os.fsync(self._out.fileno())
            except OSError:
                self._out.truncate(segment.size)  # nothing of a failed append stays
                raise
            first = segment.base + len(segment.positions)
            segment.first_arrival = segment.first_arrival or arrival
            segment.positions.extend(positions)
            segment.size, self._arrival, segment.last_arrival = size, arrival, arrival
            acks = [(first + i, arrival) for i in range(len(values))]
            return acks

    def seal(self) -> tuple[int, int]:
        """(end offset, t): every record at or past the end offset arrives at t or later,
        across restarts too."""
        with self._lock:
            floor = max(self._arrival, self._floor, now_ms())
            if floor > self._floor:
                _replace_durably(self._floor_path, json.dumps({"floor": floor}).encode())
                self._floor = floor
            return self.end, floor

    def _read_floor(self) -> int:
        try:
            return int(json.loads(self._floor_path.read_bytes())["floor"])
        except FileNotFoundError:
            return 0
        except (ValueError, KeyError, TypeError) as exc:
            raise RuntimeError(f"{self._floor_path}: unreadable seal floor ({exc!r})") from None

    def roll_older_than(self, arrival: int) -> bool:
        """Close the open segment if its first record arrived before `arrival`."""
        with self._lock:
            segment = self._segments[-1]
            if not segment.positions or segment.first_arrival >= arrival:
                return False
            self._roll_open()
            return True

    def _roll_open(self) -> None:
        self._out.close()
        self._roll(self.end)
        self._out = open(self._segments[-1].path, "ab")

    def drop_segments(self, before_offset: int, arrived_before: int) -> int:
        """Delete the closed segments whose every record is before `before_offset` and
        arrived before `arrived_before`; how many."""
        with self._lock:
            # The newest record's arrival is recovered from the segments on open: while the
            # open segment is empty, the newest closed one keeps it.
            closed = self._segments[:-1] if self._segments[-1].positions else self._segments[:-2]
            doomed = [s for s in closed
                      if s.end <= before_offset and s.last_arrival < arrived_before]
            self._segments = [s for s in self._segments if s not in doomed]
        for segment in doomed:
            segment.path.unlink(missing_ok=True)
        return len(doomed)

    @property
    def start(self) -> int:
        """The first offset still kept."""
        return self._segments[0].base

    def read(self, offset: int, max_records: int) -> list[Record]:
        with self._lock:
            end = self.end
            segments = [s for s in self._segments if s.base + len(s.positions) > offset]
        records: list[Record] = []
        for segment in segments:
            if len(records) >= max_records or offset >= end:
                break
            first = max(offset, segment.base) - segment.base
            # Bounded by `end` as of the lock: positions of an append in progress (not yet
            # written and fsynced) may already be indexed.
            last = min(len(segment.positions), end - segment.base)
            last = min(last, first + max_records - len(records))
            start = segment.positions[first]
            stop = segment.positions[last] if last < len(segment.positions) else None
            with open(segment.path, "rb") as src:
                src.seek(start)
                data = src.read() if stop is None else src.read(stop - start)
            position = 0
            for number in range(segment.base + first, segment.base + last):
                length, _crc, arrival = _HEADER.unpack_from(data, position)
                body = position + _HEADER.size
                records.append(Record(self.index, number, arrival, data[body : body + length]))
                position = body + length
            offset = segment.base + last
        return records

    def close(self) -> None:
        self._out.close()


class Topic:
    def __init__(self, folder: Path, partitions: int):
        self.folder = folder
        existing = sorted(folder.glob("p*"))
        count = max(len(existing), partitions)
        self.partitions = [Partition(folder / f"p{i:04d}", i) for i in range(count)]
        self._positions = folder / "_positions"
        self._positions.mkdir(exist_ok=True)

    def partition_for(self, key: str) -> int:
        return zlib.crc32(key.encode()) % len(self.partitions)

    def committed(self, group: str) -> dict[int, int]:
        path = self._positions / f"{group}.json"
        stored = json.loads(path.read_text()) if path.exists() else {}
        return {p.index: stored.get(str(p.index), 0) for p in self.partitions}

    def retain(self, consumed: dict[int, int], arrived_before: int, roll_before: int) -> int:
        """Close each open segment whose first record arrived before `roll_before`, then delete
        the segments read by every consumer (`consumed`, and every group's committed position)
        that arrived before `arrived_before`; how many were deleted."""
        committed = [self.committed(group) for group in self.groups()]
        deleted = 0
        for partition in self.partitions:
            partition.roll_older_than(roll_before)
            read = min([consumed.get(partition.index, 0), *(c[partition.index] for c in committed)])
            deleted += partition.drop_segments(read, arrived_before)
        return deleted

    def groups(self) -> list[str]:
        """Every consumer group that committed a position."""
        return sorted(path.stem for path in self._positions.glob("*.json"))

    def commit(self, group: str, positions: dict[int, int]) -> None:
        merged = self.committed(group) | positions
        body = json.dumps({str(k): v for k, v in merged.items()}).encode()
        _replace_durably(self._positions / f"{group}.json", body)

    def close(self) -> None:
        for partition in self.partitions:
            partition.close()


def _replace_durably(path: Path, data: bytes) -> None:
    """Replace the file whole: a crash leaves the old content or the new, never a mix."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself
    finally:
        os.close(folder)


class EventLog:
    """A folder of topics, opened by one process at a time."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._lockfile = open(root / ".lock", "w")
        try:
            import fcntl

            fcntl.flock(self._lockfile, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"event log {root} is open in another process") from None
        self._topics: dict[str, Topic] = {}

    def topic(self, name: str, partitions: int = 1) -> Topic:
        if name not in self._topics:
            self._topics[name] = Topic(self.root / name, partitions)
        return self._topics[name]

    def close(self) -> None:
        for topic in self._topics.values():
            topic.close()
        self._lockfile.close()
