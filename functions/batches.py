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


def partial_batch_response(event: Any, processor: BatchProcessor,
                           record_handler: Callable[[Any], Any], context: Any,
                           expected: str) -> dict[str, Any]:
    """`record_handler` on every record; the failed ones in `batchItemFailures`. For an event
    without records, ValueError saying what was `expected`."""
    if not isinstance(event, dict) or not isinstance(event.get("Records"), list):
        raise ValueError(f"{expected} (Records[])")
    return dict(process_partial_response(event=event, record_handler=record_handler,
                                         processor=processor, context=context))
