"""moto's Kinesis made to reshard as Kinesis does, and to keep every record it acknowledged.

moto 5 differs from the service in three ways that matter to a reader of lineage:
- a write goes to the first shard whose hash range holds its key, closed or not, so after a
  split or merge every record keeps landing in the closed parent;
- a split moves the parent's records into its children (new sequence numbers and times);
- a merge copies both parents' records into the child.
On Kinesis a closed shard takes no writes and keeps its records until they expire, and its
children start empty.

And two that matter to every writer and reader of a shard:
- concurrent PutRecords to one shard lose records: each takes the shard's last sequence
  number plus one without a lock, so two requests can store two records under one number,
  the second replacing the first, both acknowledged (about 1% of 40,000 records put from 4
  threads at once were lost so), and a GetRecords during a write can fail (the records
  changed while it read them);
- a write finds the shard's last sequence number by listing all of them, and a read scans the
  shard from its first record, so both cost more the more the shard holds.
On Kinesis an acknowledged record is kept, and both cost the same whatever the shard holds:
here writes and reads of a shard take a lock, and both go to the records they concern (a
shard's sequence numbers are consecutive: each is the previous one plus one).

`as_on_kinesis()` patches moto's models (in this process: the ThreadedMotoServer of
tests/conftest.py runs in it; `python -m lambdalake.testing.moto_kinesis` is moto's server
so patched) to behave so. It changes nothing else.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

_PATCHED = False
_SHARDS = threading.Lock()  # every shard's records: held only while a few are touched


def as_on_kinesis() -> None:
    global _PATCHED
    if _PATCHED:
        return
    from moto.kinesis.models import Stream

    routed, split, merge = Stream.get_shard_for_key, Stream.split_shard, Stream.merge_shards

    def open_shard_for_key(self: Any, partition_key: str, explicit_hash_key: str) -> Any:
        found = routed(self, partition_key, explicit_hash_key)  # moto's checks of the key
        key = _hash_key(partition_key, explicit_hash_key)
        return next((shard for shard in self.shards.values()
                     if shard.is_open and shard.starting_hash <= key <= shard.ending_hash), found)

    def split_keeping_records(self: Any, shard_to_split: str, new_starting_hash_key: str) -> None:
        kept = OrderedDict(self.shards[shard_to_split].records)
        before = set(self.shards)
        split(self, shard_to_split, new_starting_hash_key)
        self.shards[shard_to_split].records = kept
        for shard_id in set(self.shards) - before:
            self.shards[shard_id].records = OrderedDict()

    def merge_keeping_records(self: Any, shard_to_merge: str, adjacent: str) -> None:
        before = set(self.shards)
        merge(self, shard_to_merge, adjacent)
        for shard_id in set(self.shards) - before:
            self.shards[shard_id].records = OrderedDict()

    Stream.get_shard_for_key = open_shard_for_key  # type: ignore[method-assign]
    _keep_every_record()
    Stream.split_shard = split_keeping_records  # type: ignore[method-assign]
    Stream.merge_shards = merge_keeping_records  # type: ignore[method-assign,assignment]
    _PATCHED = True


def _keep_every_record() -> None:
    from moto.kinesis.models import Record, Shard

    def put_record(self: Any, partition_key: str, data: str, explicit_hash_key: str) -> str:
        with _SHARDS:
            sequence = next(reversed(self.records), 0) + 1
            self.records[sequence] = Record(partition_key, data, sequence, explicit_hash_key)
        return str(sequence)

    def get_records(self: Any, last_sequence_id: str, limit: int | None) -> tuple[
            list[Any], int, int]:
        after = int(last_sequence_id)
        with _SHARDS:
            records = self.records
            if not records:
                return [], after, 0
            first, last = next(iter(records)), next(reversed(records))
            start = max(first, after + 1)
            end = last if limit is None else min(last, start + limit - 1)
            found = [records[n] for n in range(start, end + 1)]
            newest = records[last].created_at
        if not found:
            return [], after, 0
        return found, end, int((newest - found[-1].created_at) * 1000)

    Shard.put_record = put_record  # type: ignore[method-assign]
    Shard.get_records = get_records  # type: ignore[method-assign]


def _hash_key(partition_key: str, explicit_hash_key: str | None) -> int:
    import hashlib

    if explicit_hash_key:
        return int(explicit_hash_key)
    return int(hashlib.md5(partition_key.encode()).hexdigest(), 16)


if __name__ == "__main__":
    from moto.server import main

    as_on_kinesis()
    main()
