"""Change data capture: an application's DynamoDB table changes in (DynamoDB Streams), events out.

The example: the orders table. An order item whose `status` becomes `paid` (an INSERT already
paid, or a MODIFY from another status) is one `purchase` event (`user_id`, `sku`, `amount`,
`ts` the change's time). Its `event_id` is derived from the item's key and that transition
(`orders/order_id=o-1/paid`), so a replayed stream record, or a later modification of the order
(shipped, paid again after a refund), never counts it twice under the (type, `event_id`) dedup
rule. Images are read with Powertools' `DynamoDBRecord` (`NewImage`, `OldImage`, typed values).

A change that cannot become a valid event (an image missing a field, an amount the schema
refuses) is written to `cdc/_rejects/<sequence number>.json` in the lake store with the
reason, and the shard moves on. Only a bus or store failure fails a record: it is reported in
the partial batch response (`batchItemFailures`, by sequence number), so the stream retries
from it and never skips a change.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from aws_lambda_powertools.utilities.batch import EventType
from aws_lambda_powertools.utilities.data_classes.dynamo_db_stream_event import (
    DynamoDBRecord,
)
from prometheus_client import Counter

from lambdalake.eventlog import now_ms
from lambdalake.events import Event, Problem
from lambdalake.functions.batches import partial_batch_response, processor_of
from lambdalake.functions.environment import PerColdStart
from lambdalake.functions.ingest import bus, bus_sized, validator
from lambdalake.storage import ObjectStore, open_store

REJECTS = "cdc/_rejects"
PAID = "paid"
PURCHASE_FIELDS = ("user_id", "sku", "amount")

CHANGES = Counter("lambdalake_cdc_changes_total", "Stream changes, by outcome", ["outcome"])

log = logging.getLogger("lambdalake.functions.cdc")
processor = processor_of(EventType.DynamoDBStreams)
lake = PerColdStart(lambda settings: open_store(settings.store_url, settings.s3_endpoint_url))


class ChangeRefused(ValueError):
    def __init__(self, problems: list[Problem]):
        super().__init__("; ".join(f"{p.field}: {p.error}" for p in problems))


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    return partial_batch_response(event, processor, capture, context,
                                  "cdc takes a DynamoDB Streams event")


def capture(record: DynamoDBRecord) -> str:
    """Publish the change's event, if it is one; the outcome."""
    try:
        event = purchase_of(record)
    except ChangeRefused as refused:
        reject(lake(), record, str(refused))
        return "rejected"
    if event is None:
        CHANGES.labels("ignored").inc()
        return "ignored"
    bus().publish([event])  # a failure fails this record: the stream retries from it
    CHANGES.labels("published").inc()
    return "published"


def purchase_of(record: DynamoDBRecord) -> Event | None:
    """The purchase an order's change makes (None: not a transition to paid)."""
    change = record.dynamodb
    if change is None:
        raise ChangeRefused([Problem("dynamodb", "stream record without its change")])
    new, old = change.new_image or {}, change.old_image or {}
    if new.get("status") != PAID or old.get("status") == PAID:
        return None
    missing = [name for name in PURCHASE_FIELDS if name not in new]
    if missing:
        raise ChangeRefused([Problem(f"NewImage.{name}", "field required") for name in missing])
    at = change.approximate_creation_date_time  # epoch seconds: the same on every delivery
    raw = {
        "event_id": transition_id(change.keys or {}, PAID),
        "type": "purchase",
        "ts": at * 1000 if at else now_ms(),
        **{name: _plain(new[name]) for name in PURCHASE_FIELDS},
    }
    result = bus_sized(validator().validate(raw, now_ms()))
    if not isinstance(result, Event):
        raise ChangeRefused(result)
    return result


def transition_id(keys: Mapping[str, Any], state: str) -> str:
    """The item's key and the state it entered: the same for every delivery of that change."""
    key = "/".join(f"{name}={_plain(keys[name])}" for name in sorted(keys))
    return f"orders/{key}/{state}"


def _plain(value: Any) -> Any:
    """A DynamoDB number (a Decimal) as its exact text, which decimal fields read."""
    return str(value) if isinstance(value, Decimal) else value


def reject(store: ObjectStore, record: DynamoDBRecord, reason: str) -> None:
    sequence = record.dynamodb.sequence_number if record.dynamodb else record.event_id
    body = {"sequence_number": sequence, "event_id": record.event_id,
            "event_name": str(record.event_name), "source": record.event_source_arn,
            "reason": reason, "record": record.raw_event}
    store.put(f"{REJECTS}/{sequence}.json", json.dumps(body, default=str).encode())
    CHANGES.labels("rejected").inc()
    log.warning("stream change rejected", extra={"sequence_number": sequence, "reason": reason})
