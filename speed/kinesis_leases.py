"""Shard leases in a DynamoDB table, as the KCL keeps them: one item per shard with its owner,
its epoch (the lease counter, raised by every change of owner: the fencing token), a
heartbeat the owner raises at every renewal, the checkpoint (the last sequence number whose
state is durable) and whether the shard is finished.

Every change is a conditional write on what the worker last read, so of two workers racing
for a lease one wins. A lease is expired when its heartbeat has not moved for `lease_s` of
this worker's own clock since it first saw that heartbeat (no clocks are compared between
machines). Workers split the readable shards evenly: a worker short of its share takes
expired or free leases, and when none is left steals one from the most loaded worker, one at a
time. A worker whose renewal fails has lost the lease: it stops reading the shard, and the
new owner's claim on the shard's state refuses its late writes (`speed.kinesis_state`).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError

CONDITION_FAILED = "ConditionalCheckFailedException"


@dataclass(frozen=True)
class Lease:
    shard_id: str
    owner: str | None
    epoch: int
    heartbeat: int
    checkpoint: str | None
    finished: bool

    @classmethod
    def from_item(cls, item: dict[str, Any]) -> Lease:
        return cls(
            shard_id=item["shard_id"]["S"],
            owner=item.get("owner", {}).get("S"),
            epoch=int(item["epoch"]["N"]),
            heartbeat=int(item["heartbeat"]["N"]),
            checkpoint=item.get("checkpoint", {}).get("S"),
            finished=item.get("finished", {}).get("BOOL", False),
        )


class LeaseLost(RuntimeError):
    """The lease changed owner (or epoch) since this worker took it."""


class LeaseTable:
    def __init__(self, dynamodb: Any, table: str, worker_id: str, lease_s: float):
        self.dynamodb, self.table, self.worker_id, self.lease_s = (
            dynamodb, table, worker_id, lease_s)
        self._seen: dict[str, tuple[int, int, float]] = {}  # shard -> epoch, heartbeat, since
        self._known: set[str] = set()

    def ensure(self) -> None:
        """Create the table if it is missing, and wait until it is active."""
        try:
            self.dynamodb.create_table(
                TableName=self.table, BillingMode="PAY_PER_REQUEST",
                KeySchema=[{"AttributeName": "shard_id", "KeyType": "HASH"}],
                AttributeDefinitions=[{"AttributeName": "shard_id", "AttributeType": "S"}])
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "ResourceInUseException":
                raise
        self.dynamodb.get_waiter("table_exists").wait(TableName=self.table)

    def add(self, shard_ids: list[str]) -> None:
        """A free lease for each shard that has none."""
        for shard_id in shard_ids:
            if shard_id in self._known:
                continue
            try:
                self.dynamodb.put_item(
                    TableName=self.table,
                    Item={"shard_id": {"S": shard_id}, "epoch": {"N": "0"},
                          "heartbeat": {"N": "0"}, "finished": {"BOOL": False}},
                    ConditionExpression="attribute_not_exists(shard_id)")
            except ClientError as exc:
                if exc.response["Error"]["Code"] != CONDITION_FAILED:
                    raise
            self._known.add(shard_id)

    def all(self) -> dict[str, Lease]:
        leases, start = {}, None
        while True:
            extra: dict[str, Any] = {"ExclusiveStartKey": start} if start else {}
            page = self.dynamodb.scan(TableName=self.table, ConsistentRead=True, **extra)
            for item in page["Items"]:
                lease = Lease.from_item(item)
                leases[lease.shard_id] = lease
                self._note(lease)
            start = page.get("LastEvaluatedKey")
            if not start:
                return leases

    def _note(self, lease: Lease) -> None:
        seen = self._seen.get(lease.shard_id)
        if seen is None or seen[:2] != (lease.epoch, lease.heartbeat):
            self._seen[lease.shard_id] = (lease.epoch, lease.heartbeat, time.monotonic())

    def expired(self, lease: Lease) -> bool:
        """No owner, or an owner that has not renewed for `lease_s` as this worker counts."""
        if lease.owner is None:
            return True
        since = self._seen[lease.shard_id][2]
        return time.monotonic() - since >= self.lease_s

    def to_take(self, leases: dict[str, Lease], readable: list[str], held: set[str]) -> list[Lease]:
        """The leases this worker should take now: free or expired ones up to its share of
        the readable shards, else one stolen from the most loaded worker. A lease the table
        gives to this worker id that it does not hold (a restarted worker) counts as free."""
        live = [leases[s] for s in readable if s in leases and not leases[s].finished]

        def free(lease: Lease) -> bool:
            mine = lease.owner == self.worker_id and lease.shard_id not in held
            return mine or (lease.shard_id not in held and self.expired(lease))

        owners = Counter(lease.owner for lease in live if not free(lease))
        owners[self.worker_id] = len(held)
        share = math.ceil(len(live) / len(owners))
        wanted = share - len(held)
        if wanted <= 0:
            return []
        takeable = [lease for lease in live if free(lease)]
        if takeable:
            return takeable[:wanted]
        busiest, most = max(((o, n) for o, n in owners.items() if o != self.worker_id),
                            key=lambda pair: pair[1], default=(None, 0))
        if busiest is None or most <= share or most - len(held) < 2:
            return []
        return [next(lease for lease in live if lease.owner == busiest)][:1]

    def take(self, lease: Lease) -> Lease | None:
        """This worker's lease with the next epoch, or None when another worker moved first."""
        try:
            reply = self.dynamodb.update_item(
                TableName=self.table, Key={"shard_id": {"S": lease.shard_id}},
                UpdateExpression="SET #o = :me, epoch = :next, heartbeat = heartbeat + :one",
                ConditionExpression="epoch = :epoch AND heartbeat = :beat",
                ExpressionAttributeNames={"#o": "owner"},
                ExpressionAttributeValues={
                    ":me": {"S": self.worker_id}, ":next": {"N": str(lease.epoch + 1)},
                    ":one": {"N": "1"}, ":epoch": {"N": str(lease.epoch)},
                    ":beat": {"N": str(lease.heartbeat)}},
                ReturnValues="ALL_NEW")
        except ClientError as exc:
            if exc.response["Error"]["Code"] == CONDITION_FAILED:
                return None
            raise
        return Lease.from_item(reply["Attributes"])

    def renew(self, lease: Lease, checkpoint: str | None, finished: bool = False) -> None:
        """Raise the heartbeat and record the checkpoint; `LeaseLost` when the lease is no
        longer this worker's at this epoch."""
        values: dict[str, Any] = {":me": {"S": self.worker_id}, ":epoch": {"N": str(lease.epoch)},
                                  ":one": {"N": "1"}, ":done": {"BOOL": finished}}
        update = "SET heartbeat = heartbeat + :one, finished = :done"
        if checkpoint is not None:
            update += ", checkpoint = :at"
            values[":at"] = {"S": checkpoint}
        self._conditional(lease, update, values)

    def release(self, lease: Lease) -> None:
        """Give the lease up (a clean stop): another worker may take it at once."""
        self._conditional(lease, "REMOVE #o", {":me": {"S": self.worker_id},
                                               ":epoch": {"N": str(lease.epoch)}})

    def _conditional(self, lease: Lease, update: str, values: dict[str, Any]) -> None:
        try:
            self.dynamodb.update_item(
                TableName=self.table, Key={"shard_id": {"S": lease.shard_id}},
                UpdateExpression=update, ConditionExpression="#o = :me AND epoch = :epoch",
                ExpressionAttributeNames={"#o": "owner"}, ExpressionAttributeValues=values)
        except ClientError as exc:
            if exc.response["Error"]["Code"] == CONDITION_FAILED:
                raise LeaseLost(f"lease of {lease.shard_id} (epoch {lease.epoch}) lost") from None
            raise
