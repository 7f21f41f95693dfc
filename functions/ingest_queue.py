"""Webhooks through a queue: SQS batches in, validated events on the bus.

Each message's body is what `POST /events` takes (one event object, or `{"events": [...]}`),
read by the same parser and validator as HTTP ingestion. A message is the unit: when every
event in it is valid, they are published, durable, and the message is done; otherwise
nothing of it is published and it is reported failed, with its message id, the event's index,
the field and the rule in the log. The answer is a partial batch response
(`batchItemFailures`, Powertools' `BatchProcessor`), so only the failed messages come back:
a bad one never makes the good ones redeliver. After the queue's `maxReceiveCount` receives, SQS
moves a message that keeps failing to the dead-letter queue of its redrive policy, whole: a
message refused by validation fails the same way each time and ends there, never lost; one
refused because the bus was down succeeds on a later receive.
"""

from __future__ import annotations

import logging
from typing import Any

from aws_lambda_powertools.utilities.batch import EventType
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from prometheus_client import Counter

from lambdalake.eventlog import now_ms
from lambdalake.events import Event, Problem
from lambdalake.functions.batches import partial_batch_response, processor_of
from lambdalake.functions.ingest import Refused, bus, bus_sized, parse_events, validator

MESSAGES = Counter("lambdalake_ingest_queue_messages_total", "Queue messages, by outcome",
                   ["outcome"])

log = logging.getLogger("lambdalake.functions.ingest_queue")
processor = processor_of(EventType.SQS)


class MessageRefused(ValueError):
    """A message whose body, or an event in it, breaks a rule: reported failed."""


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    return partial_batch_response(event, processor, ingest_message, context,
                                  "ingest_queue takes an SQS event")


def ingest_message(record: SQSRecord) -> int:
    """Publish a message's events, all of them or none; the number published."""
    try:
        events = valid_events(record.body or "")
    except MessageRefused as refused:
        MESSAGES.labels("refused").inc()
        log.warning("queue message refused", extra={"message_id": record.message_id,
                                                    "error": str(refused)})
        raise MessageRefused(f"message {record.message_id}: {refused}") from None
    bus().publish(events)
    MESSAGES.labels("published").inc()
    return len(events)


def valid_events(body: str) -> list[Event]:
    try:
        received = parse_events(body.encode(errors="surrogatepass"))
    except Refused as refused:
        raise MessageRefused(_said(refused.problem)) from None
    now, check = now_ms(), validator()
    events: list[Event] = []
    for index, (raw, size) in enumerate(received):
        result = bus_sized(check.validate(raw, now, index, size), index)
        if not isinstance(result, Event):
            raise MessageRefused("; ".join(_said(problem) for problem in result))
        events.append(result)
    return events


def _said(problem: Problem) -> str:
    where = "" if problem.index is None else f"event {problem.index}, "
    return f"{where}{problem.field}: {problem.error}"
