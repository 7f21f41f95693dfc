"""One shard's speed state in the object store: claimed with the lease's epoch, restored from
snapshot + deltas, written with conditional writes (the layout: `lambdalake.shard_state`).

The view logic is the Kafka drivers' `PartitionState` unchanged: a flush writes the records it
would write to the compacted topics as one delta object, then the head naming it, replaced
only if it still has the tag this worker last wrote. A worker that took the shard over has
rewritten the head (its claim), so that replace fails: the late writer is fenced
(`Fenced`) and its delta object is never named by a head (the next snapshot deletes it).
Restoring is what a compacted topic's reader does: the latest value of every key, snapshot
first, then each delta.

A child shard (after a split or a merge) starts with its parents' dedup ids, so a producer's
retry that lands in the child after its first copy landed in a parent is still counted
once, and with the arrival its parents finished at (the arrival floor of `lambdalake.kinesis`).
"""

from __future__ import annotations

import logging
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from lambdalake.project import Project
from lambdalake.settings import Settings
from lambdalake.shard_state import (
    Head,
    Record,
    encode_records,
    head_key,
    latest,
    read_head,
    records_of,
    shard_prefix,
)
from lambdalake.speed.kafka_common import PartitionState, heartbeat_key, ids_key, meta_key
from lambdalake.storage import ObjectStore, PreconditionFailed

log = logging.getLogger("lambdalake.speed.kinesis")
SNAPSHOT_AFTER_DELTAS = 300  # five flushes a second: one a minute; a restore reads at most 300
SNAPSHOT_MIN_BYTES = 1 << 20
SNAPSHOT_GROWTH = 4  # deltas may add up to this many times the snapshot before the next


class Fenced(RuntimeError):
    """Another worker claimed the shard (a newer epoch): this one must stop writing it."""


@dataclass
class Pending:
    """A delta drained from the view state, not yet named by the head."""

    key: str
    realtime: list[Record]
    changelog: list[Record]
    written: bool = False


@dataclass
class ShardState:
    store: ObjectStore
    stream: str
    part: PartitionState
    head: Head
    tag: str
    realtime: dict[bytes, bytes] = field(default_factory=dict)  # the compacted records
    changelog: dict[bytes, bytes] = field(default_factory=dict)
    pending: list[Pending] = field(default_factory=list)
    stale: set[str] = field(default_factory=set)  # views to rebuild from the shard's records
    delta_bytes: int = 0  # written since the last snapshot
    snapshot_bytes: int = 0
    due: dict[str, Any] = field(default_factory=dict)  # the next head's fields (`drain`)
    deleter: Executor | None = None  # where snapshots are written and unnamed objects
    # deleted (None: inline)
    _snapshotting: Future[tuple[dict[str, str], int, list[str]]] | None = None
    _count: int = 0

    @property
    def shard_id(self) -> str:
        return self.head.shard_id

    def flush(self, sequence: str | None, finished: bool = False) -> None:
        """`drain`, then `write`."""
        self.drain(sequence, finished)
        self.write()

    def drain(self, sequence: str | None, finished: bool = False) -> None:
        """Take what the view state changed as a pending delta (none when only the heartbeat
        and the meta record would be written: the head carries both), and what the next head
        says: the last sequence number folded, the arrival, the heartbeat. In the thread that
        folds; `write` may then run in another, never two at once."""
        number = self.part.partition
        realtime = self.part.realtime_records()
        changelog = self.part.changelog_records()
        quiet = {heartbeat_key(number), meta_key(number)}
        if not all(key in quiet for key, _ in realtime + changelog):
            self.pending.append(Pending(f"{self._next_name('d')}.json", realtime, changelog))
        heartbeat = {"caught_up_at": self.part.caught_up_at, "views": self.part.project.digest,
                     "finished": finished}
        self.due = {"sequence": sequence, "arrival": self.part.arrival, "finished": finished,
                    "heartbeat": heartbeat}

    def write(self) -> None:
        """Write the pending deltas, then the head naming them (and a snapshot written since
        the last call, in place of the deltas it covers). Raises `Fenced` when another
        worker claimed the shard; any other error leaves them to the next call."""
        for delta in self.pending:
            if not delta.written:
                body = orjson.dumps({"realtime": encode_records(delta.realtime),
                                     "changelog": encode_records(delta.changelog)})
                self.store.put(delta.key, body)
                delta.written, self.delta_bytes = True, self.delta_bytes + len(body)
        head = replace(self.head, **self.due,
                       deltas=self.head.deltas + [d.key for d in self.pending])
        written = self._snapshotting
        replaced: list[str] = []
        if written is not None and written.done():
            self._snapshotting = None
            keys, size, covered = written.result()
            replaced = [*covered, *head.snapshot.values()]
            head = replace(head, snapshot=keys, deltas=[d for d in head.deltas if d not in covered])
            self.snapshot_bytes = size
        self._replace_head(head)
        for delta in self.pending:
            _apply(self.realtime, delta.realtime)
            _apply(self.changelog, delta.changelog)
        self.pending = []
        if replaced:
            self._discard(replaced)
        if self._snapshotting is None and (len(head.deltas) >= SNAPSHOT_AFTER_DELTAS or (
                self.delta_bytes > SNAPSHOT_GROWTH * max(self.snapshot_bytes, SNAPSHOT_MIN_BYTES))):
            if self.deleter is None:
                self.snapshot()
            else:  # written from another thread: the shard's next writes go on meanwhile
                self.delta_bytes = 0
                self._snapshotting = self.deleter.submit(
                    self._write_snapshot, dict(self.realtime), dict(self.changelog),
                    list(head.deltas), self._next_name("s"))

    def snapshot(self) -> None:
        """Write every key's latest value as the snapshot now, name it in the head instead of
        the deltas, then delete what it replaces."""
        keys, size, covered = self._write_snapshot(self.realtime, self.changelog,
                                                   list(self.head.deltas), self._next_name("s"))
        replaced = [*covered, *self.head.snapshot.values()]
        self._replace_head(replace(self.head, snapshot=keys, deltas=[]))
        self.delta_bytes, self.snapshot_bytes = 0, size
        self._discard(replaced)

    def _write_snapshot(
        self, realtime: dict[bytes, bytes], changelog: dict[bytes, bytes], covered: list[str],
        base: str,
    ) -> tuple[dict[str, str], int, list[str]]:
        """The snapshot objects of these values, the latest after the deltas `covered`: their
        keys, their size, and `covered`."""
        keys = {"realtime": f"{base}-realtime.json", "changelog": f"{base}-changelog.json"}
        size = 0
        for part, values in (("realtime", realtime), ("changelog", changelog)):
            body = orjson.dumps(encode_records(values.items()))
            self.store.put(keys[part], body)
            size += len(body)
        return keys, size, covered

    def _discard(self, replaced: list[str]) -> None:
        """Delete what a snapshot replaced, and a fenced worker's late objects."""
        if self.deleter is None:
            self._delete(replaced + self._orphans())
        else:  # hundreds of deltas at a time: they must not hold up the shard's next write
            self.deleter.submit(lambda: self._delete(replaced + self._orphans()))

    def _delete(self, keys: list[str]) -> None:
        for key in keys:
            self.store.delete(key)

    def _orphans(self) -> list[str]:
        """Objects of older epochs no head names: a fenced worker's late deltas."""
        prefix = shard_prefix(self.stream, self.shard_id)
        named = {*self.head.deltas, *self.head.snapshot.values()}
        return [key for key in self.store.list(prefix)
                if key[len(prefix):].startswith(("d-", "s-")) and key not in named
                and int(key[len(prefix):].split("-")[1]) < self.head.epoch]

    def _next_name(self, kind: str) -> str:
        """A new object's key (without suffix): unique, as it carries this writer's epoch."""
        self._count += 1
        return (f"{shard_prefix(self.stream, self.shard_id)}{kind}-{self.head.epoch:010d}-"
                f"{self._count:08d}")

    def _replace_head(self, head: Head) -> None:
        try:
            self.tag = self.store.replace(head_key(self.stream, self.shard_id), head.to_json(),
                                          self.tag)
        except PreconditionFailed:
            raise Fenced(f"shard {self.shard_id}: claimed by a newer epoch than "
                         f"{self.head.epoch}") from None
        self.head = head


def _apply(values: dict[bytes, bytes], records: list[Record]) -> None:
    for key, value in records:
        if value is None:
            values.pop(key, None)
        else:
            values[key] = value


def claim(
    store: ObjectStore, stream: str, shard_id: str, number: int, epoch: int, owner: str,
    project: Project, settings: Settings, parents: list[str],
) -> ShardState:
    """Take the shard's state at lease epoch `epoch`: rewrite its head with the epoch (which
    fences every older writer), then restore it. Raises `Fenced` when a newer epoch holds it."""
    while True:
        found = read_head(store, stream, shard_id)
        if found is None:
            state = _first_claim(store, stream, shard_id, number, epoch, owner, project,
                                 settings, parents)
            if state is not None:
                return state
            continue  # another worker created the head first: read it
        head, tag = found
        if head.epoch > epoch:
            raise Fenced(f"shard {shard_id}: held at epoch {head.epoch} > {epoch}")
        claimed = replace(head, epoch=epoch, owner=owner)
        try:
            tag = store.replace(head_key(stream, shard_id), claimed.to_json(), tag)
        except PreconditionFailed:
            continue
        return _restored(store, stream, claimed, tag, number, project, settings)


def _restored(store: ObjectStore, stream: str, head: Head, tag: str, number: int,
              project: Project, settings: Settings) -> ShardState:
    realtime = latest(records_of(store, head, "realtime"))
    changelog = latest(records_of(store, head, "changelog"))
    part = PartitionState(number, project, settings)
    stale = part.restore(realtime, changelog)
    part.arrival = head.arrival  # the head's: records that were all poison move it too
    state = ShardState(store, stream, part, head, tag, realtime, changelog, stale=stale)
    log.info("shard state restored", extra={"shard": head.shard_id, "epoch": head.epoch,
                                            "sequence": head.sequence})
    return state


def _first_claim(
    store: ObjectStore, stream: str, shard_id: str, number: int, epoch: int, owner: str,
    project: Project, settings: Settings, parents: list[str],
) -> ShardState | None:
    """A shard never read: its head, with its parents' dedup ids and final arrival as its
    first delta. None when another worker wrote the head first."""
    ids: list[bytes] = []
    floor = 0
    for parent in parents:
        found = read_head(store, stream, parent)
        if found is None:
            continue  # a parent past the stream's retention, never read here
        head = found[0]
        floor = max(floor, head.arrival)
        ids += [value for key, value in latest(records_of(store, head, "changelog")).items()
                if orjson.loads(key)[1] == "ids"]
    meta = {"arrival": floor, "cut": 0, "offset": None, "views": project.fingerprints}
    inherited = [(ids_key(number, seq), value) for seq, value in enumerate(ids)]
    inherited.append((meta_key(number), orjson.dumps(meta)))
    head = Head(shard_id, epoch, owner, arrival=floor, floor=floor)
    first = f"{shard_prefix(stream, shard_id)}d-{epoch:010d}-first.json"
    store.put(first, orjson.dumps({"realtime": [], "changelog": encode_records(inherited)}))
    head.deltas = [first]
    try:
        tag = store.create(head_key(stream, shard_id), head.to_json())
    except PreconditionFailed:
        return None
    return _restored(store, stream, head, tag, number, project, settings)
