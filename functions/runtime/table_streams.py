"""A DynamoDB Streams event-source mapping on an AWS-compatible endpoint (moto here).

The template's table is created as declared, with its stream, if it does not exist. Per shard,
from the last sequence number processed (kept in a file under the runtime's folder) or the
`StartingPosition`: up to `BatchSize` records, sent once full or once the batching window
(`MaximumBatchingWindowInSeconds`, 0 by default) has passed since records began waiting, as
the DynamoDB Streams event. Retries, bisection, partial batch responses
(`ReportBatchItemFailures`: the answer's `batchItemFailures` name records by sequence number;
the batch is checkpointed before the lowest and retried from it), record age and the
on-failure destination are the shared `mapping.Delivery`'s, as for Kafka and Kinesis.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from lambdalake.functions.runtime.context import REGION
from lambdalake.functions.runtime.function import LocalFunction
from lambdalake.functions.runtime.mapping import BatchPolling, first_failed
from lambdalake.functions.runtime.template import Table, TableStreamSource
from lambdalake.loops import Loops
from lambdalake.storage import FileStore, NotFound

Change = dict[str, Any]  # a record of the Lambda event


def ensure_table(dynamodb: Any, table: Table) -> str:
    """The table's stream ARN, the table created as the template declares it if missing."""
    try:
        described = dynamodb.describe_table(TableName=table.name)["Table"]
    except dynamodb.exceptions.ResourceNotFoundException:
        stream = {"StreamEnabled": True, **table.stream}
        described = dynamodb.create_table(
            TableName=table.name, KeySchema=table.key_schema,
            AttributeDefinitions=table.attributes, BillingMode="PAY_PER_REQUEST",
            StreamSpecification=stream)["TableDescription"]
    return str(described["LatestStreamArn"])


def lambda_record(record: dict[str, Any], stream_arn: str) -> Change:
    """A record of GetRecords as the Lambda event carries it (times in epoch seconds)."""
    change = dict(record["dynamodb"])
    created = change.get("ApproximateCreationDateTime")
    if isinstance(created, datetime):
        change["ApproximateCreationDateTime"] = int(created.timestamp())
    return {**record, "awsRegion": record.get("awsRegion", REGION), "dynamodb": change,
            "eventSourceARN": stream_arn}


def sequence_number(change: Change) -> str:
    return str(change["dynamodb"]["SequenceNumber"])


class _ShardFeed:
    """One shard of the table's stream as the delivery sees it."""

    def __init__(self, mapping: TableStreamMapping, shard: str):
        self.mapping, self.shard = mapping, shard

    def event(self, records: list[Change]) -> dict[str, Any]:
        return {"Records": records}

    def commit(self, records: list[Change]) -> None:
        self.mapping.commit(self.shard, sequence_number(records[-1]))

    def failed_from(self, records: list[Change], answer: Any) -> int:
        return first_failed([sequence_number(r) for r in records], answer)

    def failure(self, records: list[Change]) -> tuple[str, dict[str, Any]]:
        first, last = sequence_number(records[0]), sequence_number(records[-1])
        return f"{self.shard}/{first}-{last}.json", {"DDBStreamBatchInfo": {
            "shardId": self.shard, "startSequenceNumber": first, "endSequenceNumber": last,
            "batchSize": len(records), "streamArn": self.mapping.stream_arn}}

    def age_seconds(self, records: list[Change]) -> float:
        created = records[0]["dynamodb"].get("ApproximateCreationDateTime")
        return 0.0 if created is None else time.time() - created


class TableStreamMapping(BatchPolling[Change]):
    kind = "table-stream"

    def __init__(self, function: LocalFunction, source: TableStreamSource, table: Table,
                 dynamodb: Any, streams: Any, folder: Path, loops: Loops | None = None,
                 backoff_seconds: float = 0.5, poll_seconds: float = 0.2):
        super().__init__(function, source, folder, backoff_seconds, poll_seconds, loops)
        self.source, self.table = source, table
        self.dynamodb, self.streams = dynamodb, streams
        self.state = FileStore(folder / "table_streams" / function.name)
        self.stream_arn = ""
        self._waiting_since: dict[str, float] = {}  # shard -> since when records wait

    def poll_once(self) -> int:
        """One pass over the stream's shards; the records delivered."""
        return sum(self._poll(shard) for shard in self.shards())

    def shards(self) -> list[str]:
        if not self.stream_arn:
            self.stream_arn = ensure_table(self.dynamodb, self.table)
        described = self.streams.describe_stream(StreamArn=self.stream_arn)["StreamDescription"]
        return [shard["ShardId"] for shard in described["Shards"]]

    def _position(self, shard: str) -> str | None:
        try:
            return str(json.loads(self.state.get(f"{shard}.json"))["after"])
        except NotFound:
            return None

    def _poll(self, shard: str) -> int:
        """Read the shard from its position; deliver once the batch is full or the batching
        window has passed since records began waiting (read again from there until then)."""
        after = self._position(shard)
        where: dict[str, str] = ({"ShardIteratorType": "AFTER_SEQUENCE_NUMBER",
                                  "SequenceNumber": after} if after else
                                 {"ShardIteratorType": self.source.starting_position})
        iterator = self.streams.get_shard_iterator(StreamArn=self.stream_arn, ShardId=shard,
                                                   **where)["ShardIterator"]
        limit = self.source.batch_size
        records = self.streams.get_records(ShardIterator=iterator, Limit=limit)["Records"]
        if not records:
            return 0
        since = self._waiting_since.setdefault(shard, time.monotonic())
        window = self.source.batching_window_seconds
        if len(records) < limit and time.monotonic() - since < window:
            return 0
        del self._waiting_since[shard]
        self.delivery.deliver(_ShardFeed(self, shard),
                              [lambda_record(r, self.stream_arn) for r in records])
        return len(records)

    def commit(self, shard: str, after: str) -> None:
        self.state.put(f"{shard}.json", json.dumps({"after": after}).encode())
