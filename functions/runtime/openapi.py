"""The gateway's OpenAPI document: `POST /events` with a request schema per event type of the
project (its fields, types and which are optional, from `EventSchema.model`), an example of
each, and the answer. Served at /openapi.json, with Swagger UI at /docs from the assets
shipped in `swagger-ui-bundle`: nothing from a CDN."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lambdalake.auth import KEY_HEADER
from lambdalake.events import DecimalType, EventSchema
from lambdalake.functions.ingest import MAX_EVENTS

_EXAMPLE_VALUES: dict[str, Any] = {"string": "abc", "int": 42, "float": 1.5, "bool": True}
_INSTANT = {"anyOf": [{"type": "integer", "description": "epoch milliseconds"},
                      {"type": "string", "format": "date-time", "description": "ISO 8601"}],
            "description": "Event time: epoch ms or ISO 8601"}
_REFUSED = {
    400: "Nothing valid: every event, or the body, refused (see `rejected`)",
    401: "No valid API key", 403: "The key lacks the `ingest` scope",
    413: f"Body too large, or more than {MAX_EVENTS} events",
    429: "Throttled; retry later", 503: "The bus is unavailable; retry later",
}


def ingest_openapi(schemas: Mapping[str, EventSchema], version: str) -> dict[str, Any]:
    """The document for `schemas` (event type -> schema)."""
    events = {f"{name}_event": _event_schema(schema) for name, schema in schemas.items()}
    one_event = {"oneOf": [{"$ref": f"#/components/schemas/{n}"} for n in events],
                 "discriminator": {"propertyName": "type"}}
    batch = {"type": "object", "required": ["events"], "additionalProperties": False,
             "properties": {"events": {"type": "array", "items": one_event, "minItems": 1,
                                       "maxItems": MAX_EVENTS}}}
    examples = {name: {"summary": f"one {name} event", "value": _example(schema)}
                for name, schema in schemas.items()}
    examples["batch"] = {"summary": "a batch of events",
                         "value": {"events": [_example(s) for s in schemas.values()]}}
    answer = {"content": {"application/json": {"schema": {"$ref":
                                                          "#/components/schemas/Answer"}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "lambdalake ingestion gateway", "version": version,
                 "description": "Events in: each valid one durable before the answer."},
        "paths": {"/events": {"post": {
            "summary": "Send one event, or a batch of them",
            "description": "One event object, or `{\"events\": [...]}` (up to "
                           f"{MAX_EVENTS}). Answers 202 once every valid event is durable; "
                           "the invalid ones are listed in `rejected`, by index, field and "
                           "rule.",
            "operationId": "post_events",
            "security": [{"ApiKey": []}, {"Bearer": []}, {}],
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"oneOf": [one_event, {"$ref": "#/components/schemas/EventBatch"}]},
                "examples": examples}}},
            "responses": {"202": {"description": "Accepted: the valid events are durable",
                                  **answer},
                          **{str(status): {"description": text, **answer}
                             for status, text in _REFUSED.items()}},
        }}},
        "components": {
            "schemas": {**events, "EventBatch": batch, "Answer": _ANSWER},
            "securitySchemes": {
                "ApiKey": {"type": "apiKey", "in": "header", "name": KEY_HEADER},
                "Bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _event_schema(schema: EventSchema) -> dict[str, Any]:
    json_schema = schema.model().model_json_schema()
    json_schema["properties"]["ts"] = _INSTANT
    json_schema["example"] = _example(schema)
    return json_schema


def _example(schema: EventSchema) -> dict[str, Any]:
    event: dict[str, Any] = {"event_id": f"{schema.name}-0001", "type": schema.name,
                             "ts": "2026-11-23T10:00:00Z"}
    for name in schema.fields:
        decimal = DecimalType.named(schema.field_type(name))
        event[name] = (_decimal_example(decimal) if decimal
                       else _EXAMPLE_VALUES[schema.field_type(name)])
    return event


def _decimal_example(decimal: DecimalType) -> str:
    whole = "1" if decimal.precision > decimal.scale else "0"
    return f"{whole}.{'2' * decimal.scale}" if decimal.scale else whole


_ANSWER = {
    "type": "object", "required": ["accepted", "rejected"],
    "properties": {
        "accepted": {"type": "integer", "minimum": 0, "description": "Events made durable"},
        "rejected": {"type": "array", "items": {
            "type": "object", "required": ["index", "field", "error"],
            "properties": {"index": {"type": ["integer", "null"],
                                     "description": "The event's place in the batch"},
                           "field": {"type": "string"}, "error": {"type": "string"}}}},
    },
    "example": {"accepted": 1, "rejected": [{"index": 1, "field": "ts",
                                             "error": "must be epoch ms or ISO 8601"}]},
}
