"""The Kinesis speed driver: the kernel's view state over a Kinesis data stream, with shard
leases in DynamoDB and each shard's state in the object store.

One worker, one thread: it renews and balances its leases (`speed.kinesis_leases`), reads
each shard it holds with GetRecords (`lambdalake.kinesis.ShardReader`: KPL de-aggregation,
the arrival every reader of the shard agrees on), folds the records into the shard's view
state column-wise (`PartitionState.take_all`, the Kafka drivers' own), and every
`flush_interval_ms` writes what changed (`speed.kinesis_state`). Kinesis has no
transactions; the sequence number a state covers is written in the same conditional write
of the head as the state itself, so a worker killed at any moment restarts from a
consistent pair: nothing counted twice, nothing lost. The heads and deltas are also the
serving layer's feed (`serving.realtime_feed.StoreFeed`).

Resharding: a child shard is taken only once every parent is finished (closed, read to its
end, its final state written and its lease marked finished), and starts with its parents'
dedup ids and final arrival. A record that is not a valid event is counted and logged with
its shard and sequence number (the archiver keeps it in the dead letters), never blocking
the shard.

    python -m lambdalake.speed.kinesis [--worker-id NAME]  (settings from LAMBDALAKE_* variables)
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from lambdalake import catalog
from lambdalake import kinesis as streams
from lambdalake.event_columns import BatchDecoder
from lambdalake.eventlog import now_ms
from lambdalake.events import Validator
from lambdalake.kinesis import shard_index
from lambdalake.project import Project
from lambdalake.settings import Settings
from lambdalake.shard_state import read_head
from lambdalake.speed.kinesis_leases import Lease, LeaseLost, LeaseTable
from lambdalake.speed.kinesis_state import Fenced, ShardState, claim
from lambdalake.speed.worker import read_floor, run_worker
from lambdalake.storage import ObjectStore

log = logging.getLogger("lambdalake.speed.kinesis")
IDLE_POLL_S = 0.2  # a shard read to its end is asked again at most this often (5 reads/s)
IDLE_FLUSH_S = 1.0  # the heartbeat of a quiet shard
CATALOG_EVERY_S = 1.0
LIST_SHARDS_EVERY_S = 5.0
FETCH_THREADS = 4  # GetRecords calls (and state writes) in flight at once, one per shard


def fast_client(endpoint_url: str | None) -> Any:
    """A Kinesis client that leaves timestamps as the service sends them (epoch seconds):
    `kinesis.arrival_ms` takes either, and a datetime in the local zone per record costs
    as much as the rest of reading it."""
    import botocore.session
    from botocore.config import Config

    session = botocore.session.get_session()
    session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=float)
    # 10,000 records a call: a loaded service can take seconds to answer one
    config = Config(connect_timeout=5, read_timeout=60,
                    retries={"mode": "standard", "max_attempts": 3})
    return session.create_client("kinesis", endpoint_url=endpoint_url, config=config)


def lease_table_name(settings: Settings) -> str:
    return settings.kinesis_lease_table or f"{settings.kinesis_stream}-speed-leases"


@dataclass
class Held:
    """A shard this worker holds: its lease, its reader and its state."""

    lease: Lease
    reader: streams.ShardReader
    state: ShardState
    sequence: str | None
    polled_at: float = 0.0
    changed: bool = False
    flushed_at: float = 0.0
    fetch: Future[tuple[int, list[streams.KinesisRecord] | None]] | None = None  # in flight
    closed: streams.Shard | None = None  # the shard as listed once closed, for its reader
    write: Future[None] | None = None  # the state's write in flight


class KinesisSpeed:
    def __init__(self, settings: Settings, project: Project, store: ObjectStore, worker_id: str,
                 kinesis: Any = None, dynamodb: Any = None):
        import boto3

        self.settings, self.project, self.store = settings, project, store
        self.worker_id, self.stream = worker_id, settings.kinesis_stream
        self.kinesis = kinesis or fast_client(settings.kinesis_endpoint_url)
        self.fetcher = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="get-records")
        self.writer = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="state-writes")
        self.cleaner = ThreadPoolExecutor(1, thread_name_prefix="state-deletes")
        dynamodb = dynamodb or boto3.client("dynamodb",
                                            endpoint_url=settings.kinesis_endpoint_url)
        self.leases = LeaseTable(dynamodb, lease_table_name(settings), worker_id,
                                 settings.kinesis_lease_seconds)
        self.validator = Validator(project.schemas, settings.max_future_seconds * 1000)
        self.decoder = BatchDecoder(project.schemas, settings.max_future_seconds * 1000)
        self.flush_s = settings.flush_interval_ms / 1000
        self.kept = catalog.KeptVersions(store, project)
        self.floor = 0
        self.held: dict[str, Held] = {}
        self.shards: dict[str, streams.Shard] = {}
        self._current: set[str] = set()  # finished shards whose state names today's views
        self._listed_at = self._catalog_at = 0.0
        self._floor: Future[int | None] | None = None  # the floor being read
        self._lock = threading.Lock()  # `held`, changed by the lease keeper too
        self._keeper_error: Exception | None = None

    def run(self, stop: threading.Event) -> None:
        """Read until `stop` is set; then write every shard's state and release the leases.
        The leases are kept by a thread of their own: their calls never hold up a read."""
        self.leases.ensure()
        keeper = threading.Thread(target=self._keep_leases, args=(stop,), name="leases")
        keeper.start()
        try:
            while not stop.is_set():
                if not self.step():
                    stop.wait(0.02)
        finally:
            stop.set()
            keeper.join()
            self.close()

    def _keep_leases(self, stop: threading.Event) -> None:
        """Balance every third of the lease time; a failure stops the worker (`step` raises
        it), so that its supervisor restarts it rather than it reading without leases."""
        while not stop.is_set():
            try:
                self.balance()
            except Exception as exc:
                self._keeper_error = exc
                return
            stop.wait(self.settings.kinesis_lease_seconds / 3)

    def step(self) -> bool:
        """Read each shard due, flush when due, follow the batch catalog; whether any record
        was read."""
        if self._keeper_error is not None:
            raise RuntimeError("keeping the shard leases failed") from self._keeper_error
        now = time.monotonic()
        self.follow_batch()
        held = self.holding()
        for one in held:  # closed since it was taken: its reader must know, between reads
            if one.closed is not None and one.fetch is None:
                one.reader.reopen(one.closed)
                one.closed = None
        read = sum(self._read(one) for one in held)
        # a shard read to its end writes what it folded at once (it reads again only after
        # IDLE_POLL_S: no more writes than the flush interval's); one catching up, at the
        # flush interval
        self.flush_all([
            one for one in held
            if (one.changed and (one.fetch is None or now - one.flushed_at >= self.flush_s))
            or now - one.flushed_at >= IDLE_FLUSH_S])
        return read > 0

    def holding(self) -> list[Held]:
        """The shards held now (the lease keeper adds and removes some)."""
        with self._lock:
            return list(self.held.values())

    # ------------------------------------------------------------------ reading

    def _read(self, held: Held) -> int:
        """Fold the shard's GetRecords answer once it is in; the next one is asked for before
        folding (from a thread: waiting on the service overlaps the fold)."""
        if held.fetch is None:
            if time.monotonic() - held.polled_at >= IDLE_POLL_S:
                held.fetch = self._fetch(held)
            return 0
        if not held.fetch.done():
            return 0
        started, records = held.fetch.result()
        held.fetch = None
        if records is None:  # a failed call: ask again after a pause
            held.polled_at = time.monotonic()
            return 0
        reader = held.reader
        caught_up = reader.millis_behind == 0 and len(records) < streams.MAX_GET_RECORDS
        if caught_up:
            held.state.part.caught_up_at = started
            held.polled_at = time.monotonic()  # at the end: ask again after IDLE_POLL_S
        elif not reader.finished:
            held.fetch = self._fetch(held)
        if records:
            self._fold(held, records)
        if reader.finished:
            self._finish(held)
        return len(records)

    def _fetch(self, held: Held) -> Future[tuple[int, list[streams.KinesisRecord] | None]]:
        def fetch() -> tuple[int, list[streams.KinesisRecord] | None]:
            started = now_ms()
            try:
                return started, held.reader.read()
            except (ClientError, BotoCoreError) as exc:  # throttled, expired iterator, outage
                log.warning("GetRecords failed; reading again from the last record",
                            extra={"shard": held.lease.shard_id, "error": str(exc)})
                held.reader.restart(held.reader.position)
                return started, None

        return self.fetcher.submit(fetch)

    def _fold(self, held: Held, records: list[streams.KinesisRecord]) -> None:
        poison = held.state.part.take_all([r.data for r in records],
                                          [r.arrival_ms for r in records],
                                          self.decoder, self.validator)
        for i, reason in poison:
            log.error("record is not a valid event", extra={
                "shard": held.lease.shard_id, "sequence": records[i].sequence_number,
                "sub_sequence": records[i].sub_sequence, "reason": str(reason)})
        held.sequence, held.changed = records[-1].sequence_number, True

    def _finish(self, held: Held) -> None:
        """The shard is closed and read to its end: write its final state, mark its lease
        finished (its children may now be read) and let it go."""
        if self._flush(held, finished=True):
            # else the new owner reads the final head and finishes the lease itself
            with contextlib.suppress(LeaseLost):
                self.leases.renew(held.lease, held.sequence, finished=True)
            with self._lock:
                self.held.pop(held.lease.shard_id, None)
            log.info("shard finished", extra={"shard": held.lease.shard_id})

    def _flush(self, held: Held, finished: bool = False) -> bool:
        """Write the shard's state now (after its write in flight); False when it was refused
        (fenced: the shard is gone)."""
        if not self._written(held, wait=True):
            return False
        try:
            held.state.part.flush_metrics()
            held.state.flush(held.sequence, finished)
        except Fenced:
            self._drop(held, "fenced by a newer epoch")
            return False
        held.changed, held.flushed_at = False, time.monotonic()
        return True

    def _written(self, held: Held, wait: bool = False) -> bool:
        """Whether the shard's last write is done and was taken (False: in flight, or fenced
        and the shard dropped). Any other failure of it stops the worker."""
        if held.write is None:
            return True
        if not wait and not held.write.done():
            return False
        try:
            held.write.result()
        except Fenced:
            self._drop(held, "fenced by a newer epoch")
            return False
        finally:
            if held.write.done():
                held.write = None
        return True

    def _drop(self, held: Held, why: str) -> None:
        with self._lock:
            self.held.pop(held.lease.shard_id, None)
        log.warning("shard lost", extra={"shard": held.lease.shard_id, "reason": why})

    # ------------------------------------------------------------------ leases

    def balance(self) -> None:
        """Renew the leases held, then take this worker's share of the readable shards."""
        if time.monotonic() - self._listed_at >= LIST_SHARDS_EVERY_S or not self.shards:
            self._list_shards()
        leases = self.leases.all()
        for held in self.holding():
            try:
                self.leases.renew(held.lease, held.state.head.sequence)
            except LeaseLost:
                self._drop(held, "lease taken by another worker")
        finished = {s for s, lease in leases.items() if lease.finished}
        readable = [s.shard_id for s in streams.readable(self.shards.values(), finished)]
        for lease in self.leases.to_take(leases, readable, {h.lease.shard_id
                                                            for h in self.holding()}):
            taken = self.leases.take(lease)
            if taken is not None:
                self._hold(taken)
        for shard_id in sorted(finished - self._current):
            self._redefine_finished(leases[shard_id])

    def _redefine_finished(self, lease: Lease) -> None:
        """A finished shard whose state names views defined otherwise (a view changed since
        it was written): take its lease, rebuild the changed views from its records, write it
        finished again. Its cells still count until a batch covers them, and the serving
        layer waits for every shard's state to name today's views."""
        found = read_head(self.store, self.stream, lease.shard_id)
        if found is None or found[0].heartbeat.get("views") == self.project.digest:
            self._current.add(lease.shard_id)
            return
        if not self.leases.expired(lease) and lease.owner != self.worker_id:
            return  # another worker is on it
        taken = self.leases.take(lease)
        if taken is None:
            return
        shard = self.shards.get(lease.shard_id)
        try:
            state = claim(self.store, self.stream, lease.shard_id, shard_index(lease.shard_id),
                          taken.epoch, self.worker_id, self.project, self.settings, [])
            state.part.follow(self.floor)
            if shard is not None and state.stale and state.head.sequence:
                self._rebuild(shard, state)  # else past retention: the changed views' cells go
            state.flush(state.head.sequence, finished=True)
            self.leases.renew(taken, state.head.sequence, finished=True)
            self.leases.release(taken)
        except (Fenced, LeaseLost) as exc:
            log.warning("finished shard left to another worker",
                        extra={"shard": lease.shard_id, "reason": str(exc)})
            return
        self._current.add(lease.shard_id)
        log.info("finished shard's state rewritten with today's views",
                 extra={"shard": lease.shard_id})

    def _list_shards(self) -> None:
        listed = streams.list_shards(self.kinesis, self.stream)
        self.shards = {shard.shard_id: shard for shard in listed}
        self.leases.add(list(self.shards))
        for held in self.holding():  # closed since it was taken: `step` tells its reader
            shard = self.shards.get(held.lease.shard_id)
            if shard is not None and shard.closed and not held.reader.shard.closed:
                held.closed = shard
        self._listed_at = time.monotonic()

    def _hold(self, lease: Lease) -> None:
        shard = self.shards[lease.shard_id]
        try:
            state = claim(self.store, self.stream, shard.shard_id, shard.index, lease.epoch,
                          self.worker_id, self.project, self.settings, list(shard.parents))
        except Fenced as exc:
            log.warning("shard not taken", extra={"shard": shard.shard_id, "reason": str(exc)})
            return
        head = state.head
        if head.finished:  # finished by a worker killed before it marked the lease
            self.leases.renew(lease, head.sequence, finished=True)
            return
        state.part.follow(self.floor)
        if state.stale and head.sequence:
            self._rebuild(shard, state)
        position = (streams.Position.after(head.sequence) if head.sequence
                    else streams.Position.trim_horizon())
        reader = streams.ShardReader(self.kinesis, self.stream, shard, position, head.arrival)
        state.deleter = self.cleaner
        with self._lock:
            self.held[shard.shard_id] = Held(lease, reader, state, head.sequence)
        log.info("shard taken", extra={"shard": shard.shard_id, "epoch": lease.epoch,
                                       "sequence": head.sequence})

    def _rebuild(self, shard: streams.Shard, state: ShardState) -> None:
        """Fold the shard's records up to its state's sequence number into the views changed
        since that state was written, afresh (as the Kafka drivers do from a partition)."""
        head = state.head
        reader = streams.ShardReader(self.kinesis, self.stream, shard,
                                     streams.Position.trim_horizon(), head.floor)
        end = streams.sequence_key(str(head.sequence))

        def records() -> Iterator[tuple[bytes, int]]:
            for record in streams.read_until_quiet(reader):
                if streams.sequence_key(record.sequence_number) > end:
                    return
                yield record.data, record.arrival_ms

        state.part.rebuild(state.stale, self.floor, records(), self.validator)
        log.info("views rebuilt from the shard", extra={"shard": shard.shard_id,
                                                        "views": sorted(state.stale)})
        state.stale = set()

    def follow_batch(self) -> None:
        """Drop what every kept batch version covers: the floor is read in a thread once a
        second and applied once it is in."""
        asked = self._floor
        if asked is not None and asked.done():
            self._floor = None
            floor = asked.result()
            if floor is not None and floor > self.floor:
                self.floor = floor
                for held in self.holding():
                    held.state.part.follow(floor)
                    held.changed = True
        if self._floor is None and time.monotonic() - self._catalog_at >= CATALOG_EVERY_S:
            self._catalog_at = time.monotonic()
            self._floor = self.writer.submit(read_floor, self.kept)

    def flush_all(self, shards: list[Held] | None = None) -> None:
        """Start writing these shards' states (default: all) from threads: what changed is
        taken now, the objects are written while reading goes on. A shard whose previous
        write is still in flight waits for the next call."""
        for held in self.holding() if shards is None else shards:
            if self._written(held):
                held.state.part.flush_metrics()
                held.state.drain(held.sequence)
                held.write = self.writer.submit(held.state.write)
                held.changed, held.flushed_at = False, time.monotonic()

    def write_all(self) -> None:
        """Write every shard's state now, and wait for it."""
        for held in self.holding():
            self._flush(held)

    def close(self) -> None:
        """Write every shard's state and release its lease, so another worker takes it at once."""
        self.fetcher.shutdown(wait=True)
        for held in self.holding():
            if self._flush(held):
                with contextlib.suppress(LeaseLost):
                    self.leases.release(held.lease)
        self.writer.shutdown(wait=True)
        self.cleaner.shutdown(wait=True)
        with self._lock:
            self.held.clear()


def final_arrival(store: ObjectStore, stream: str, shard_id: str) -> int:
    """The arrival a finished shard ended at (0 if it has no state)."""
    found = read_head(store, stream, shard_id)
    return found[0].arrival if found else 0


def main(argv: list[str] | None = None) -> None:
    run_worker("lambdalake.speed.kinesis", __doc__,
               "stable per worker: a restart takes its leases back at once", KinesisSpeed, argv)


if __name__ == "__main__":
    main()
