"""A DynamoDB Streams event-source mapping on an AWS-compatible endpoint (moto here).

The template's table is created as declared, with its stream, if it does not exist. Per shard,
from the last sequence number processed (kept in a file under the runtime's folder) or the
`StartingPosition`: up to `BatchSize` records, delivered as the DynamoDB Streams event.
Success moves the position past the batch; with `ReportBatchItemFailures`, a partial answer
moves it to just before the first failed record, from which the next delivery starts. A batch
that fails is halved first with `BisectBatchOnFunctionError` (the next delivery is its first
half, and so on down to the failing record); a batch that cannot be halved and keeps failing
is retried `MaximumRetryAttempts` times (-1: until it succeeds), then sent, with its error, to
the on-failure destination (a JSON file under the runtime's folder) and the shard moves on.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Any

from lambdalake.eventlog import now_ms
from lambdalake.events import iso
from lambdalake.functions.runtime.context import REGION
from lambdalake.functions.runtime.function import FunctionError, LocalFunction, Throttled
from lambdalake.functions.runtime.polling import Polling
from lambdalake.functions.runtime.template import Table, TableStreamSource
from lambdalake.loops import Loops
from lambdalake.storage import FileStore, NotFound

log = logging.getLogger("lambdalake.functions.table_streams")


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


def lambda_record(record: dict[str, Any], stream_arn: str) -> dict[str, Any]:
    """A record of GetRecords as the Lambda event carries it (times in epoch seconds)."""
    change = dict(record["dynamodb"])
    created = change.get("ApproximateCreationDateTime")
    if isinstance(created, datetime):
        change["ApproximateCreationDateTime"] = int(created.timestamp())
    return {**record, "awsRegion": record.get("awsRegion", REGION), "dynamodb": change,
            "eventSourceARN": stream_arn}


class TableStreamMapping(Polling):
    idle_seconds = 0.2

    def __init__(self, function: LocalFunction, source: TableStreamSource, table: Table,
                 dynamodb: Any, streams: Any, folder: Path, loops: Loops | None = None,
                 backoff_seconds: float = 0.5):
        self.function, self.source, self.table = function, source, table
        self.dynamodb, self.streams = dynamodb, streams
        self.state = FileStore(folder / "table_streams" / function.name)
        self.failures = FileStore(folder / "on_failure" / function.name)
        self.backoff_seconds = backoff_seconds
        self.stream_arn = ""
        self._failures: dict[str, int] = {}  # shard -> failed deliveries of its batch
        self._limits: dict[str, int] = {}  # shard -> records of its next batch, once bisected
        super().__init__(f"table-stream-{function.name}", loops, backoff_seconds)

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
        after = self._position(shard)
        where: dict[str, str] = ({"ShardIteratorType": "AFTER_SEQUENCE_NUMBER",
                                  "SequenceNumber": after} if after else
                                 {"ShardIteratorType": self.source.starting_position})
        iterator = self.streams.get_shard_iterator(StreamArn=self.stream_arn, ShardId=shard,
                                                   **where)["ShardIterator"]
        limit = self._limits.get(shard, self.source.batch_size)
        records = self.streams.get_records(ShardIterator=iterator, Limit=limit)["Records"]
        if records:
            self._deliver(shard, [lambda_record(r, self.stream_arn) for r in records])
        return len(records)

    def _deliver(self, shard: str, records: list[dict[str, Any]]) -> None:
        done, error = self._invoke(records)
        if done:
            self._commit(shard, done[-1])
        if error is None:
            self._failures.pop(shard, None)
            self._limits.pop(shard, None)
            return
        rest = records[len(done):]
        if self.source.bisect_on_error and len(rest) > 1:
            self._limits[shard] = len(rest) // 2  # the next delivery: its first half
            return
        failures = self._failures[shard] = self._failures.get(shard, 0) + 1
        if 0 <= self.source.max_retries < failures:
            self._send_on_failure(shard, rest, error)
            self._commit(shard, rest[-1])
            self._failures.pop(shard)
            self._limits.pop(shard, None)
        else:
            self.loop.wait(min(self.backoff_seconds * 2 ** (failures - 1), 30.0))

    def _invoke(self, records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str | None]:
        """Deliver; the leading records done, and the error if any failed."""
        try:
            result = self.function.invoke({"Records": records})
        except (FunctionError, Throttled) as error:
            return [], str(error)
        failed = {f["itemIdentifier"] for f in (result or {}).get("batchItemFailures", [])}
        if not (self.source.partial_failures and failed):
            return records, None
        first = next(i for i, r in enumerate(records)
                     if r["dynamodb"]["SequenceNumber"] in failed)
        return records[:first], f"record {records[first]['dynamodb']['SequenceNumber']} failed"

    def _commit(self, shard: str, record: dict[str, Any]) -> None:
        after = record["dynamodb"]["SequenceNumber"]
        self.state.put(f"{shard}.json", json.dumps({"after": after}).encode())

    def _send_on_failure(self, shard: str, records: list[dict[str, Any]], error: str) -> None:
        first, last = (r["dynamodb"]["SequenceNumber"] for r in (records[0], records[-1]))
        self.failures.put(f"{shard}/{first}-{last}.json", json.dumps({
            "condition": "RetryAttemptsExhausted", "function": self.function.name,
            "error": error, "timestamp": iso(now_ms()),
            "DDBStreamBatchInfo": {"shardId": shard, "startSequenceNumber": first,
                                   "endSequenceNumber": last, "batchSize": len(records),
                                   "streamArn": self.stream_arn},
        }).encode())
        self.function.metrics.sent_on_failure(len(records))
        log.error("stream batch sent to the on-failure destination", extra={
            "function": self.function.name, "shard": shard, "error": error})
