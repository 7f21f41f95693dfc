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
import re
from typing import Any, NamedTuple

import jiter

from lambdalake.auth import AuthError
from lambdalake.bus import open_bus
from lambdalake.eventlog import now_ms
from lambdalake.events import MAX_EVENT_BYTES, Event, JsonNumber, Problem, Record, Validator
from lambdalake.functions.environment import PerColdStart
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


ROUTES = ("POST /events", "GET /healthz")


class WrongShape(ValueError):
    """Not an API Gateway HTTP API (payload format 2.0) event."""


def route_of(event: Any) -> str | None:
    """The route a request takes. API Gateway names it in `routeKey` (`POST /events`), also on
    a named stage (rawPath `/prod/events`) and behind a custom domain's API mapping; on the
    `$default` route it is the method and the path, whose end is the route's path (a stage or
    a mapping's base path may stand in front of it)."""
    try:
        method = event["requestContext"]["http"]["method"]
        path = event.get("rawPath") or event["requestContext"]["http"]["path"]
    except (KeyError, TypeError):
        raise WrongShape("not an API Gateway HTTP API event (payload format 2.0): "
                         "requestContext.http.method and rawPath are required") from None
    if event.get("routeKey") in ROUTES:
        return str(event["routeKey"])
    for route in ROUTES:
        route_method, _, route_path = route.partition(" ")
        if method == route_method and str(path).endswith(route_path):
            return route
    return None


def handler(event: dict[str, Any], context: object) -> dict[str, Any]:
    try:
        route = route_of(event)
    except WrongShape as wrong:
        return response(400, {"accepted": 0, "rejected": [Problem("$", str(wrong)).as_dict()]})
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
        data = body_bytes(event)
        records = all_valid(data, now_ms())
        if records is not None:
            return publish(records, [], publish_budget(context))
        raws = parse_events(data)
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
        data = body.encode(errors="surrogatepass")  # a lone surrogate: refused as not UTF-8
    if len(data) > MAX_BODY_BYTES:
        raise Refused(413, "$", f"body larger than {MAX_BODY_BYTES} bytes")
    return data


class Received(NamedTuple):
    """One event as it arrived: its decoded value and its bytes in the request body."""

    raw: Any
    size: int


def all_valid(data: bytes, now: int) -> list[Record] | None:
    """The records of a batch body (`{"events": [...]}`, no other key) whose every event is
    valid, decoded and checked in two calls into Rust (jiter, pydantic-core) rather than
    event by event in Python; None when the body needs the careful path (`parse_events`,
    `ingest`), which names each problem: any invalid event, a duplicate key, anything not
    plain JSON, an event whose record outgrows the bus, or a body larger than one event may
    be (whose events' own sizes only the careful reader measures)."""
    if len(data) > MAX_EVENT_BYTES:
        return None
    try:
        # only keys cached: values (event ids above all) repeat too little to pay their lookup
        body = jiter.from_json(data, allow_inf_nan=False, catch_duplicate_keys=True,
                               cache_mode="keys")
    except ValueError:
        return None
    if not isinstance(body, dict) or body.keys() != {"events"}:
        return None
    raws = body["events"]
    if not isinstance(raws, list) or not 0 < len(raws) <= MAX_EVENTS:
        return None
    records = validator().records_all(raws, now)
    if records is None or any(len(record.value) > MAX_EVENT_BYTES for record in records):
        return None
    return records


def parse_events(data: bytes) -> list[Received]:
    """The events of a body: one event object, or the list under `events`."""
    reader = _BodyReader(utf8_text(data))
    try:
        body, events = reader.read()
    except DuplicateKey as duplicate:
        raise Refused(400, duplicate.key, str(duplicate)) from None
    except (ValueError, RecursionError) as exc:
        raise Refused(400, "$", f"malformed JSON: {exc}") from None
    if not (isinstance(body.raw, dict) and "events" in body.raw and "type" not in body.raw):
        return [body]
    if events is None or not events:
        raise Refused(400, "events", "must be a non-empty list of event objects")
    if len(events) > MAX_EVENTS:
        raise Refused(413, "events", f"{len(events)} events; at most {MAX_EVENTS} per request")
    return events


def utf8_text(data: bytes) -> str:
    """The body's text: JSON is UTF-8 (RFC 8259), a leading byte order mark is ignored."""
    encoding = json.detect_encoding(data)
    if encoding not in ("utf-8", "utf-8-sig"):
        rule = f"body must be UTF-8 encoded JSON (RFC 8259), not {encoding.upper()}"
        raise Refused(400, "$", rule)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        rule = f"body must be UTF-8 encoded JSON (RFC 8259): invalid UTF-8 at byte {exc.start}"
        raise Refused(400, "$", rule) from None


class DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(f"duplicate key {key!r}: a key may appear once in a JSON object")
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) < len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKey(key)
            seen.add(key)
    return found


# numbers keep their text, which decimal fields read exactly
_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys, parse_float=JsonNumber)
_WHITESPACE = re.compile(r"[ \t\n\r]*")


class _BodyReader:
    """Decodes a body's JSON as `json.loads` does (duplicate keys refused), keeping the
    bytes each element of the top-level `events` list takes in it."""

    def __init__(self, text: str):
        self.text, self.pos = text, 0

    def read(self) -> tuple[Received, list[Received] | None]:
        """The whole body, and the elements of its `events` list (None: not a list)."""
        start, events = self._skip(), None
        if self.text.startswith("{", start):
            raw, events = self._members()
        else:
            raw = self._value()
        if self._skip() < len(self.text):
            raise json.JSONDecodeError("Extra data", self.text, self.pos)
        return Received(raw, self._bytes(start)), events

    def _members(self) -> tuple[dict[str, Any], list[Received] | None]:
        self.pos += 1
        pairs: list[tuple[str, Any]] = []
        events = None
        while self._skip() < len(self.text) and self.text[self.pos] != "}":
            if pairs:
                self._expect(",", "',' delimiter")
                self._skip()
            self._expect('"', "property name enclosed in double quotes")
            # the C one, else Python's: in json.decoder, if not in typeshed's
            key, self.pos = json.decoder.scanstring(  # type: ignore[attr-defined]
                self.text, self.pos)
            self._skip()
            self._expect(":", "':' delimiter")
            if key == "events" and self.text.startswith("[", self._skip()):
                events = self._elements()
                pairs.append((key, [event.raw for event in events]))
            else:
                pairs.append((key, self._value()))
        self._expect("}", "',' delimiter" if pairs else "property name enclosed in double quotes")
        return _unique_keys(pairs), events

    def _elements(self) -> list[Received]:
        self.pos += 1
        elements: list[Received] = []
        while self._skip() < len(self.text) and self.text[self.pos] != "]":
            if elements:
                self._expect(",", "',' delimiter")
            start = self._skip()
            elements.append(Received(self._value(), self._bytes(start)))
        self._expect("]", "',' delimiter")
        return elements

    def _value(self) -> Any:
        value, self.pos = _DECODER.raw_decode(self.text, self._skip())
        return value

    def _skip(self) -> int:
        self.pos = _WHITESPACE.match(self.text, self.pos).end()  # type: ignore[union-attr]
        return self.pos

    def _expect(self, char: str, what: str) -> None:
        if not self.text.startswith(char, self.pos):
            raise json.JSONDecodeError(f"Expecting {what}", self.text, self.pos)
        self.pos += 1

    def _bytes(self, start: int) -> int:
        return len(self.text[start : self.pos].encode())


def sized_record(result: Event | list[Problem], index: int | None = None) -> Record | list[Problem]:
    """A valid event's record, unless it outgrows the limit on the bus: a record can outgrow
    what was sent (1E5 is written 100000.0), and every reader of the bus holds records to the
    same limit."""
    if not isinstance(result, Event):
        return result
    record = Record.of(result)
    if len(record.value) > MAX_EVENT_BYTES:
        return [Problem("$", f"event larger than {MAX_EVENT_BYTES} bytes on the bus", index)]
    return record


def bus_sized(result: Event | list[Problem], index: int | None = None) -> Event | list[Problem]:
    """A valid event, unless its record outgrows the limit on the bus (`sized_record`)."""
    sized = sized_record(result, index)
    return result if isinstance(sized, Record) else sized


def ingest(received: list[Received], timeout_s: float | None = None) -> dict[str, Any]:
    now, check = now_ms(), validator()
    valid: list[Record] = []
    rejected: list[dict[str, Any]] = []
    for index, (raw, size) in enumerate(received):
        result = sized_record(check.validate(raw, now, index, size), index)
        if isinstance(result, Record):
            valid.append(result)
        else:
            rejected += [problem.as_dict() for problem in result]
    return publish(valid, rejected, timeout_s)


def publish(valid: list[Record], rejected: list[dict[str, Any]],
            timeout_s: float | None) -> dict[str, Any]:
    """202 once every valid event is durable on the bus; 400 when none is valid."""
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
