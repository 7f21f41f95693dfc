"""moto's Kinesis made to reshard as Kinesis does, for tests that split and merge shards.

moto 5 differs from the service in three ways that matter to a reader of lineage:
- a write goes to the first shard whose hash range holds its key, closed or not, so after a
  split or merge every record keeps landing in the closed parent;
- a split moves the parent's records into its children (new sequence numbers and times);
- a merge copies both parents' records into the child.
On Kinesis a closed shard takes no writes and keeps its records until they expire, and its
children start empty. `as_on_kinesis()` patches moto's models (in this process: the
ThreadedMotoServer of tests/conftest.py runs in it) to behave so. It changes nothing else.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

_PATCHED = False


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
    Stream.split_shard = split_keeping_records  # type: ignore[method-assign]
    Stream.merge_shards = merge_keeping_records  # type: ignore[method-assign]
    _PATCHED = True


def _hash_key(partition_key: str, explicit_hash_key: str | None) -> int:
    import hashlib

    if explicit_hash_key:
        return int(explicit_hash_key)
    return int(hashlib.md5(partition_key.encode()).hexdigest(), 16)
