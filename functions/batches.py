"""Batch sources (SQS, DynamoDB Streams) answered with a partial batch response."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aws_lambda_powertools.utilities.batch import (
    BatchProcessor,
    EventType,
    process_partial_response,
)


def processor_of(source: EventType) -> BatchProcessor:
    # every record failing is answered as such (not raised): the same answer, one shape
    return BatchProcessor(event_type=source, raise_on_entire_batch_failure=False)


SOURCES = {EventType.SQS: "aws:sqs", EventType.DynamoDBStreams: "aws:dynamodb"}


def partial_batch_response(event: Any, processor: BatchProcessor,
                           record_handler: Callable[[Any], Any], context: Any,
                           expected: str) -> dict[str, Any]:
    """`record_handler` on every record; the failed ones in `batchItemFailures`. For an event
    of another shape, ValueError saying what was `expected` and naming the first record of
    another source."""
    source = SOURCES[processor.event_type]
    if not isinstance(event, dict) or not isinstance(event.get("Records"), list):
        raise ValueError(f"{expected} (Records[] from {source})")
    for index, record in enumerate(event["Records"]):
        found = record.get("eventSource") if isinstance(record, dict) else type(record).__name__
        if found != source:
            raise ValueError(f"{expected}: Records[{index}] comes from {found!r}, not {source}")
    return dict(process_partial_response(event=event, record_handler=record_handler,
                                         processor=processor, context=context))
