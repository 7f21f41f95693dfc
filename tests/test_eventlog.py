"""The embedded event log: offsets, arrival times, reads across segments, durability."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lambdalake.eventlog as eventlog
from lambdalake.eventlog import EventLog

ROOT = Path(__file__).resolve().parents[1]


def value_for(offset: int) -> bytes:
    """A record whose content says where it belongs, of varying length."""
    return f"{offset}:".encode() + bytes([65 + offset % 26]) * (offset * 37 % 300)


def segment_files(log_root: Path, topic: str = "events", partition: int = 0) -> list[Path]:
    return sorted((log_root / topic / f"p{partition:04d}").glob("*.log"))


class Clock:
    """A settable wall clock for `eventlog.now_ms` (which may step backwards)."""

    def __init__(self, now: int):
        self.now = now

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    fake = Clock(1_000_000)
    monkeypatch.setattr(eventlog, "now_ms", fake)
    return fake


# --- offsets and arrival times -----------------------------------------------------------

ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("append"),
            st.lists(st.binary(max_size=120), max_size=12),
            st.integers(0, 10_000),
        ),
        st.tuples(st.just("seal"), st.just([]), st.integers(0, 10_000)),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=75, deadline=None)
@given(ops, st.sampled_from([64, 400, 64 * 1024 * 1024]))
def test_offsets_increase_and_arrival_never_decreases(script, segment_bytes):
    """arrival = max(previous arrival, seal floor, now), whatever the clock does."""
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as patch:
        clock = Clock(0)
        patch.setattr(eventlog, "now_ms", clock)
        patch.setattr(eventlog, "SEGMENT_BYTES", segment_bytes)
        log = EventLog(Path(tmp))
        partition = log.topic("events").partitions[0]
        written: list[tuple[int, int, bytes]] = []
        arrival = floor = 0
        for op, values, now in script:
            clock.now = now
            if op == "seal":
                end, sealed = partition.seal()
                floor = max(arrival, floor, now)
                assert (end, sealed) == (len(written), floor)
                continue
            acks = partition.append(values)
            arrival = max(arrival, floor, now)
            assert [offset for offset, _ in acks] == list(
                range(len(written), len(written) + len(values))
            )
            assert all(a == arrival for _, a in acks)
            written += [(o, a, v) for (o, a), v in zip(acks, values, strict=True)]
        assert partition.end == len(written)
        log.close()

        reopened = EventLog(Path(tmp))
        records = reopened.topic("events").partitions[0].read(0, 10_000)
        assert [(r.offset, r.arrival, r.value) for r in records] == written
        arrivals = [r.arrival for r in records]
        assert arrivals == sorted(arrivals)
        clock.now = 0  # the clock went back across the restart: arrival still never
        # decreases, nor falls below a seal
        [(offset, again)] = reopened.topic("events").partitions[0].append([b"after"])
        assert (offset, again) == (len(written), max([floor, *arrivals]))
        reopened.close()


def test_arrival_is_the_wall_clock_when_it_moves_forward(tmp_path):
    log = EventLog(tmp_path)
    partition = log.topic("events").partitions[0]
    before = eventlog.now_ms()
    [(_, arrival)] = partition.append([b"x"])
    assert before <= arrival <= eventlog.now_ms()
    log.close()


# --- reads -------------------------------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(0, 25), min_size=1, max_size=15), st.sampled_from([100, 700, 3000]))
def test_read_from_any_offset_across_segment_rolls(batch_sizes, segment_bytes):
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as patch:
        patch.setattr(eventlog, "SEGMENT_BYTES", segment_bytes)
        log = EventLog(Path(tmp))
        partition = log.topic("events").partitions[0]
        expected = []
        segments, size = 1, 0  # a batch goes to a new segment once the last is over the size
        for count in batch_sizes:
            values = [value_for(len(expected) + i) for i in range(count)]
            acks = partition.append(values)
            expected += [(o, a, v) for (o, a), v in zip(acks, values, strict=True)]
            if size > segment_bytes:
                segments, size = segments + 1, 0
            size += sum(16 + len(v) for v in values)
        total = len(expected)
        assert len(segment_files(Path(tmp))) == segments

        def check(part):
            for offset in range(total + 2):
                for limit in (1, 17, 10_000):
                    got = [(r.offset, r.arrival, r.value) for r in part.read(offset, limit)]
                    assert got == expected[offset : offset + limit]
                    assert all(r.partition == 0 for r in part.read(offset, limit))

        check(partition)
        log.close()
        reopened = EventLog(Path(tmp))
        check(reopened.topic("events").partitions[0])
        reopened.close()


def test_reads_during_appends_see_only_whole_acknowledged_records(tmp_path, monkeypatch):
    """A reader racing a writer never gets a torn or not-yet-durable record."""
    monkeypatch.setattr(eventlog, "SEGMENT_BYTES", 256 * 1024)
    log = EventLog(tmp_path)
    partition = log.topic("events").partitions[0]
    acknowledged = 0
    done = threading.Event()
    failures: list[BaseException] = []

    def write():
        nonlocal acknowledged
        try:
            for _ in range(60):
                first = partition.end
                acks = partition.append([value_for(first + i) * 4 for i in range(400)])
                acknowledged = acks[-1][0] + 1
        except BaseException as exc:  # pragma: no cover - reported below
            failures.append(exc)
        finally:
            done.set()

    writer = threading.Thread(target=write)
    writer.start()
    reads = 0
    try:
        while not done.is_set() or reads < 5:
            seen_before = acknowledged
            start = max(0, seen_before - 500)
            records = partition.read(start, 100_000)
            reads += 1
            for record in records:
                assert record.value == value_for(record.offset) * 4
            assert [r.offset for r in records] == list(range(start, start + len(records)))
            # Nothing past what the writer has been told is durable (its next batch at most).
            assert start + len(records) <= acknowledged + 400
    finally:
        writer.join()
        log.close()
    assert not failures
    assert acknowledged == 60 * 400


# --- seal --------------------------------------------------------------------------------


def test_seal_floor_holds_for_later_appends(tmp_path, clock):
    log = EventLog(tmp_path)
    partition = log.topic("events").partitions[0]
    clock.now = 5_000
    assert partition.append([b"a", b"b"]) == [(0, 5_000), (1, 5_000)]
    clock.now = 9_000
    assert partition.seal() == (2, 9_000)
    clock.now = 7_000  # the wall clock steps back: the floor still holds
    assert partition.append([b"c"]) == [(2, 9_000)]
    clock.now = 8_000
    assert partition.seal() == (3, 9_000)  # a seal never lowers the floor
    clock.now = 12_000
    assert partition.append([b"d"]) == [(3, 12_000)]
    log.close()


@pytest.mark.parametrize("records_before", [0, 2])
def test_the_seal_floor_survives_a_restart_with_the_clock_stepped_back(
    tmp_path, clock, records_before
):
    log = EventLog(tmp_path)
    partition = log.topic("events", 2).partitions[0]
    clock.now = 5_000
    partition.append([b"x"] * records_before)
    clock.now = 9_000
    assert partition.seal() == (records_before, 9_000)  # a cut may be chosen at 9_000 now
    log.close()
    clock.now = 6_000  # the wall clock steps back across the restart
    reopened = EventLog(tmp_path)
    partitions = reopened.topic("events").partitions
    assert partitions[0].seal() == (records_before, 9_000)
    assert partitions[0].append([b"late"]) == [(records_before, 9_000)]
    assert partitions[1].append([b"never sealed"]) == [(0, 6_000)]
    reopened.close()


def test_an_unreadable_seal_floor_stops_the_open_naming_the_file(tmp_path):
    log = EventLog(tmp_path)
    log.topic("events").partitions[0].seal()
    log.close()
    (tmp_path / "events" / "p0000" / "floor.json").write_text("{")
    reopened = EventLog(tmp_path)
    with pytest.raises(RuntimeError, match="floor.json: unreadable seal floor"):
        reopened.topic("events")
    reopened.close()


def test_seal_with_the_real_clock(tmp_path):
    log = EventLog(tmp_path)
    partitions = log.topic("events", 3).partitions
    partitions[1].append([b"x"])
    sealed = [p.seal() for p in partitions]
    assert [end for end, _ in sealed] == [0, 1, 0]
    for partition, (end, floor) in zip(partitions, sealed, strict=True):
        [(offset, arrival)] = partition.append([b"later"])
        assert offset == end
        assert arrival >= floor
    log.close()


# --- consumer groups ---------------------------------------------------------------------


def test_committed_positions_are_per_group_and_survive_reopen(tmp_path):
    log = EventLog(tmp_path)
    topic = log.topic("events", 3)
    assert topic.committed("speed") == {0: 0, 1: 0, 2: 0}
    topic.commit("speed", {0: 5, 2: 9})
    topic.commit("archive", {1: 3})
    topic.commit("speed", {2: 11})  # a partial commit keeps the other partitions
    assert topic.committed("speed") == {0: 5, 1: 0, 2: 11}
    assert topic.committed("archive") == {0: 0, 1: 3, 2: 0}
    log.close()

    reopened = EventLog(tmp_path)
    topic = reopened.topic("events")  # the partition count comes from the folder
    assert len(topic.partitions) == 3
    assert topic.committed("speed") == {0: 5, 1: 0, 2: 11}
    assert topic.committed("archive") == {0: 0, 1: 3, 2: 0}
    assert topic.committed("nobody") == {0: 0, 1: 0, 2: 0}
    assert not list((tmp_path / "events" / "_positions").glob("*.tmp"))
    reopened.close()


def test_partition_for_is_stable_and_in_range(tmp_path):
    log = EventLog(tmp_path)
    topic = log.topic("events", 4)
    keys = [f"event-{i}" for i in range(200)]
    chosen = [topic.partition_for(k) for k in keys]
    assert set(chosen) == {0, 1, 2, 3}
    assert chosen == [topic.partition_for(k) for k in keys]
    log.close()


# --- one process at a time ---------------------------------------------------------------


def test_a_second_event_log_on_the_same_folder_is_refused(tmp_path):
    log = EventLog(tmp_path)
    with pytest.raises(RuntimeError, match="open in another process"):
        EventLog(tmp_path)
    other = subprocess.run(
        [sys.executable, "-c",
         "import sys; from pathlib import Path; from lambdalake.eventlog import EventLog\n"
         "try:\n    EventLog(Path(sys.argv[1]))\n"
         "except RuntimeError as exc:\n    print(exc); sys.exit(3)\n",
         str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )
    assert other.returncode == 3, other.stderr
    assert "open in another process" in other.stdout
    log.close()
    EventLog(tmp_path).close()  # free again once closed


# --- crash safety ------------------------------------------------------------------------

WRITER = """
import random, sys
from pathlib import Path
import lambdalake.eventlog as eventlog
from lambdalake.eventlog import EventLog


def value_for(offset):  # as in the test
    return f"{offset}:".encode() + bytes([65 + offset % 26]) * (offset * 37 % 300)


eventlog.SEGMENT_BYTES = 32 * 1024
partition = EventLog(Path(sys.argv[1])).topic("events").partitions[0]
rng = random.Random(int(sys.argv[2]))
while True:
    first = partition.end
    values = [value_for(first + i) * rng.randint(1, 40) for i in range(rng.randint(1, 30))]
    for offset, _arrival in partition.append(values):
        print(offset, flush=True)
"""


def expected_value(offset: int, value: bytes) -> bool:
    unit = value_for(offset)
    return len(value) % len(unit) == 0 and value == unit * (len(value) // len(unit))


@pytest.mark.parametrize("seed", [1, 2])
def test_kill_9_loses_no_acknowledged_record(tmp_path, seed):
    acknowledged: list[int] = []
    for round_ in range(2):  # crash, recover, write more, crash again
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(tmp_path), str(seed * 10 + round_)],
            stdout=subprocess.PIPE, text=True, cwd=ROOT,
        )
        assert writer.stdout is not None
        target = len(acknowledged) + 400 + 97 * seed
        for line in writer.stdout:
            acknowledged.append(int(line))
            if len(acknowledged) >= target:
                break
        os.kill(writer.pid, signal.SIGKILL)
        acknowledged += [int(line) for line in writer.stdout]  # acked before the kill
        writer.wait(timeout=30)
        assert writer.returncode == -signal.SIGKILL

    # Offsets only increase; a restarted writer may skip past records that were durable but
    # not yet acknowledged when it was killed.
    assert acknowledged == sorted(set(acknowledged))
    log = EventLog(tmp_path)
    partition = log.topic("events").partitions[0]
    records = partition.read(0, 1_000_000)
    assert partition.end > acknowledged[-1]
    assert [r.offset for r in records] == list(range(partition.end))
    assert all(expected_value(r.offset, r.value) for r in records)
    arrivals = [r.arrival for r in records]
    assert arrivals == sorted(arrivals)
    assert len(segment_files(tmp_path)) > 1
    [(offset, _)] = partition.append([value_for(partition.end)])
    assert offset == len(records)
    log.close()


GARBAGE = {
    "random bytes": bytes(range(7, 250, 3)),
    "zero-filled block": bytes(4096),
    "one zeroed header": bytes(16),
    "half a header": b"\x05\x00\x00",
    "header longer than the file": (10_000).to_bytes(4, "little") + bytes(12) + b"partial",
    "frame with a bad checksum": (5).to_bytes(4, "little") + bytes(12) + b"hello",
}


@pytest.mark.parametrize("garbage", GARBAGE.values(), ids=GARBAGE.keys())
def test_a_torn_tail_is_cut_off_on_reopen_and_appends_continue(tmp_path, garbage):
    log = EventLog(tmp_path)
    partition = log.topic("events").partitions[0]
    acks = partition.append([value_for(i) for i in range(10)])
    last_arrival = acks[-1][1]
    log.close()
    [segment] = segment_files(tmp_path)
    intact = segment.stat().st_size
    with open(segment, "ab") as out:
        out.write(garbage)

    log = EventLog(tmp_path)
    partition = log.topic("events").partitions[0]
    assert segment.stat().st_size == intact
    assert partition.end == 10
    records = partition.read(0, 100)
    assert [(r.offset, r.value) for r in records] == [(i, value_for(i)) for i in range(10)]
    [(offset, arrival)] = partition.append([b"after the tear"])
    assert offset == 10
    assert arrival >= last_arrival
    log.close()

    log = EventLog(tmp_path)
    records = log.topic("events").partitions[0].read(0, 100)
    assert [r.value for r in records] == [value_for(i) for i in range(10)] + [b"after the tear"]
    log.close()


# --- retention: segments deleted once read by every consumer, below the oldest kept cut ----


def aged_segments(tmp_path: Path, clock: Clock) -> tuple[EventLog, eventlog.Topic]:
    """Partition 0 with three segments: offsets 0-2 at t=1000s, 3-5 at t=2000s, 6-8 open."""
    log = EventLog(tmp_path / "log")
    topic = log.topic("events", 1)
    for start in (0, 3, 6):
        clock.now = 1_000_000 * (start // 3 + 1)
        topic.partitions[0].append([value_for(o) for o in range(start, start + 3)])
        topic.retain({0: 0}, 0, roll_before=clock.now + 1)  # rolls, deletes nothing
    return log, topic


def test_retention_deletes_only_segments_every_consumer_read_below_the_kept_cut(tmp_path, clock):
    log, topic = aged_segments(tmp_path, clock)
    assert len(segment_files(tmp_path / "log")) == 4  # three closed, one open and empty
    topic.commit("archive", {0: 9})
    # the speed layer has read to 4: only the first segment is read by everyone
    assert topic.retain({0: 4}, arrived_before=10**9, roll_before=0) == 1
    # everything read, but a kept batch version's cut at 2000 s: the second is still needed
    assert topic.retain({0: 9}, arrived_before=2_000_000, roll_before=0) == 0
    # the archive lags behind: nothing it has not read goes
    topic.commit("archive", {0: 5})
    assert topic.retain({0: 9}, arrived_before=10**9, roll_before=0) == 0
    topic.commit("archive", {0: 9})
    # the newest closed segment stays while the open one is empty: it keeps the last arrival
    assert topic.retain({0: 9}, arrived_before=10**9, roll_before=0) == 1
    assert topic.partitions[0].start == 6
    assert [r.offset for r in topic.partitions[0].read(0, 100)] == [6, 7, 8]
    log.close()
    reopened = EventLog(tmp_path / "log").topic("events", 1)
    clock.now = 0  # a clock stepped back: arrival still never decreases
    assert reopened.partitions[0].append([b"x"]) == [(9, 3_000_000)]
