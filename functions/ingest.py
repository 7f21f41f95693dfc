"""Ingestion: API Gateway HTTP API (payload format 2.0) events in, validated events on the bus.

`POST /events` takes one event object or `{"events": [...]}` (up to 500). Every valid event is
published, durable, before the answer: 202 with the number accepted and, per rejected event,
its index, the field and the rule it broke; 400 when nothing is valid; 413 when the body or
the batch is too large; 503, with nothing claimed accepted, when the bus is unavailable.
"""

from __future__ import annotations

import base64
import json
import logging
from typing import Any

from functions.environment import PerColdStart
from lambdalake.auth import AuthError
from lambdalake.bus import open_bus
from lambdalake.eventlog import now_ms
from lambdalake.events import Event, Problem, Validator
from lambdalake.project import load_project
from lambdalake.settings import Settings

MAX_BODY_BYTES = 5 * 1024 * 1024
MAX_EVENTS = 500
ANSWER_MARGIN_S = 1.0  # of the invocation's time, kept to answer 503 before it times out

log = logging.getLogger("lambdalake.functions.ingest")


def _validator(settings: Settings) -> Validator:
    schemas = load_project(settings.project).schemas
    return Validator(schemas, settings.max_future_seconds * 1000)


validator = PerColdStart(_validator)
keyring = PerColdStart(lambda settings: settings.keyring)
bus = PerColdStart(open_bus)


class Refused(Exception):
    """The request as a whole is refused: nothing in it is looked at further."""

    def __init__(self, status: int, field: str, error: str):
        super().__init__(error)
        self.status, self.problem = status, Problem(field, error)


def handler(event: dict[str, Any], context: object) -> dict[str, Any]:
    route = f"{event['requestContext']['http']['method']} {event['rawPath']}"
    if route == "GET /healthz":
        return response(200, {"status": "ok"})
    if route != "POST /events":
        return response(404, {"message": "Not Found"})
    try:
        keyring().authorize(event.get("headers") or {}, "ingest")
    except AuthError as refused:
        problem = Problem(refused.header, refused.rule).as_dict()
        return response(refused.status, {"accepted": 0, "rejected": [problem]}, refused.headers)
    try:
        raws = parse_events(body_bytes(event))
    except Refused as refused:
        return response(refused.status, {"accepted": 0, "rejected": [refused.problem.as_dict()]})
    return ingest(raws, publish_budget(context))


def publish_budget(context: Any) -> float | None:
    """How long the bus may take: the invocation's remaining time, less the margin."""
    if context is None:
        return None
    return max(0.0, context.get_remaining_time_in_millis() / 1000 - ANSWER_MARGIN_S)


def body_bytes(event: dict[str, Any]) -> bytes:
    body = event.get("body") or ""
    if event.get("isBase64Encoded"):
        try:
            data = base64.b64decode(body, validate=True)
        except ValueError:
            raise Refused(400, "$", "body is not valid base64") from None
    else:
        data = body.encode()
    if len(data) > MAX_BODY_BYTES:
        raise Refused(413, "$", f"body larger than {MAX_BODY_BYTES} bytes")
    return data


def parse_events(data: bytes) -> list[Any]:
    """The raw events of a body: one event object, or the list under `events`."""
    try:
        body = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise Refused(400, "$", f"malformed JSON: {exc}") from None
    if not (isinstance(body, dict) and "events" in body and "type" not in body):
        return [body]
    events = body["events"]
    if not isinstance(events, list) or not events:
        raise Refused(400, "events", "must be a non-empty list of event objects")
    if len(events) > MAX_EVENTS:
        raise Refused(413, "events", f"{len(events)} events; at most {MAX_EVENTS} per request")
    return events


def ingest(raws: list[Any], timeout_s: float | None = None) -> dict[str, Any]:
    now, check = now_ms(), validator()
    valid: list[Event] = []
    rejected: list[dict[str, Any]] = []
    for index, raw in enumerate(raws):
        result = check.validate(raw, now, index)
        if isinstance(result, Event):
            valid.append(result)
        else:
            rejected += [problem.as_dict() for problem in result]
    if not valid:
        return response(400, {"accepted": 0, "rejected": rejected})
    try:
        bus().publish(valid, timeout_s)
    except Exception as exc:  # any bus failure: refuse the whole request, never half-claim it
        log.exception("publish failed; nothing accepted", extra={"events": len(valid)})
        error = f"event bus unavailable, nothing accepted; retry the request ({exc})"
        return response(503, {"accepted": 0, "rejected": rejected, "error": error},
                        {"retry-after": "1"})
    return response(202, {"accepted": len(valid), "rejected": rejected})


def response(
    status: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> dict[str, Any]:
    return {
        "statusCode": status,
        "headers": {"content-type": "application/json", **(headers or {})},
        "body": json.dumps(body),
    }
