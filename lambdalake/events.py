"""Events: the envelope every event shares, per-type schemas, and validation.

Pure: no I/O. `validate` turns one raw JSON object into an `Event` or a list of `Problem`s
naming the field and the rule it broke.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
    create_model,
    field_validator,
)

FieldType = Literal["string", "int", "float", "bool"]
MAX_EVENT_BYTES = 256 * 1024
ENVELOPE = ("event_id", "type", "ts")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
# The instants Python's datetime can name (years 1 to 9999), all well inside int64
MIN_MS = (datetime.min.replace(tzinfo=UTC) - _EPOCH) // _MS
MAX_MS = (datetime.max.replace(tzinfo=UTC) - _EPOCH) // _MS
INSTANT_RANGE = "must be between 0001-01-01T00:00:00Z and 9999-12-31T23:59:59.999Z"

_PYTHON_TYPES: dict[str, Any] = {
    "string": StrictStr,
    "int": StrictInt,
    "float": float,
    "bool": StrictBool,
}
ARROW_TYPES = {"string": "string", "int": "int64", "float": "float64", "bool": "bool"}


@dataclass(frozen=True, slots=True)
class Problem:
    field: str
    error: str
    index: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "field": self.field, "error": self.error}


@dataclass(frozen=True, slots=True)
class Event:
    event_id: str
    type: str
    ts: int  # event time, epoch milliseconds UTC
    fields: Mapping[str, Any]

    def to_json(self) -> bytes:
        body = {"event_id": self.event_id, "type": self.type, "ts": self.ts, **self.fields}
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def epoch_ms(value: Any) -> int:
    """Epoch milliseconds from epoch ms (int) or an ISO 8601 string; naive means UTC."""
    if isinstance(value, bool):
        raise ValueError("must be epoch milliseconds or an ISO 8601 string")
    if isinstance(value, int):
        return _in_range(value)
    if isinstance(value, float) and value.is_integer():
        return _in_range(int(value))
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError as exc:
            if "out of range" in str(exc):  # year 0, month 13: the form is right
                raise ValueError(INSTANT_RANGE) from None
            raise ValueError(f"not an ISO 8601 timestamp: {value[:40]!r}") from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        # exact: float seconds * 1000 can be 1 ms off; an offset can take it out of range
        return _in_range((parsed - _EPOCH) // _MS)
    raise ValueError("must be epoch milliseconds or an ISO 8601 string")


def _in_range(ms: int) -> int:
    if not MIN_MS <= ms <= MAX_MS:
        raise ValueError(INSTANT_RANGE)
    return ms


def iso(ms: int) -> str:
    return (_EPOCH + _in_range(ms) * _MS).isoformat().replace("+00:00", "Z")


class _Envelope(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    event_id: StrictStr = Field(min_length=1, max_length=256)
    type: StrictStr
    ts: int

    @field_validator("ts", mode="before")
    @classmethod
    def _ts(cls, value: Any) -> int:
        ms = epoch_ms(value)
        if ms < 0:
            raise ValueError("must not be before 1970-01-01")
        return ms


@dataclass(frozen=True)
class EventSchema:
    """Declared fields of one event type: name -> type; a trailing `?` marks it optional."""

    name: str
    fields: Mapping[str, str]

    def __post_init__(self) -> None:
        for field, declared in self.fields.items():
            if field in ENVELOPE:
                raise ValueError(f"{self.name}.{field}: reserved for the envelope")
            if declared.rstrip("?") not in _PYTHON_TYPES:
                raise ValueError(f"{self.name}.{field}: unknown type {declared!r}")

    def field_type(self, field: str) -> FieldType:
        return self.fields[field].rstrip("?")  # type: ignore[return-value]

    def model(self) -> type[BaseModel]:
        specs: dict[str, Any] = {"type": (Literal[self.name], ...)}
        for field, declared in self.fields.items():
            python_type = _PYTHON_TYPES[declared.rstrip("?")]
            optional = declared.endswith("?")
            specs[field] = (python_type | None, None) if optional else (python_type, ...)
        return create_model(f"{self.name}_event", __base__=_Envelope, **specs)


class Validator:
    """Validates raw events against the declared schemas."""

    def __init__(self, schemas: Mapping[str, EventSchema], max_future_ms: int):
        self._models = {name: schema.model() for name, schema in schemas.items()}
        self._max_future_ms = max_future_ms
        models = tuple(self._models.values())
        tagged = Annotated[Union[models], Field(discriminator="type")]  # noqa: UP007
        # pydantic-core's validator itself: TypeAdapter's wrapper costs 5% of a speed-layer fold
        self._from_json = TypeAdapter(tagged if len(models) > 1 else models[0]).validator

    def validate_json(
        self, value: bytes, now_ms: int, index: int | None = None
    ) -> Event | list[Problem]:
        """One event from its JSON bytes, decoded and checked in one pass in pydantic-core
        (3x faster than decoding, then validating). Its JSON decoder rejects lone surrogates,
        so text needs no second look; what it refuses is decoded again only to say why."""
        try:
            parsed = self._from_json.validate_json(value)
        except ValidationError:
            try:
                raw = json.loads(value)
            except (ValueError, RecursionError) as exc:
                return [Problem("$", f"not JSON: {exc}", index)]
            return self.validate(raw, now_ms, index, size=len(value))
        return self._event(parsed, now_ms, index, len(value))

    def validate(
        self, raw: Any, now_ms: int, index: int | None = None, size: int | None = None
    ) -> Event | list[Problem]:
        """`size`: the bytes of the event as received, when known (else measured as JSON)."""
        if not isinstance(raw, dict):
            return [Problem("$", "an event must be a JSON object", index)]
        kind = raw.get("type")
        model = self._models.get(kind) if isinstance(kind, str) else None
        if model is None:
            known = ", ".join(sorted(self._models))
            rule = f"unknown event type {raw.get('type')!r}; known: {known}"
            return [Problem("type", rule if "type" in raw else "field required", index)]
        try:
            parsed = model.model_validate(raw)
        except ValidationError as exc:
            return [_problem(error, index) for error in exc.errors()]
        broken = _lone_surrogate(parsed.__dict__)
        if broken:
            return [Problem(broken, "must be valid UTF-8 text (no lone surrogates)", index)]
        return self._event(parsed, now_ms, index, size)

    def _event(
        self, parsed: BaseModel, now_ms: int, index: int | None, size: int | None
    ) -> Event | list[Problem]:
        """The event of a valid model, once its time and size pass."""
        if parsed.ts > now_ms + self._max_future_ms:
            rule = f"more than {self._max_future_ms // 1000} s in the future"
            return [Problem("ts", rule, index)]
        values = dict(parsed.__dict__)
        del values["event_id"], values["type"], values["ts"]
        event = Event(parsed.event_id, parsed.type, parsed.ts, values)
        if (size if size is not None else len(event.to_json())) > MAX_EVENT_BYTES:
            return [Problem("$", f"event larger than {MAX_EVENT_BYTES} bytes", index)]
        return event


def _lone_surrogate(values: Mapping[str, Any]) -> str | None:
    """The first field holding text that UTF-8 cannot encode (JSON allows `\\ud800`)."""
    for name, value in values.items():
        if isinstance(value, str) and not value.isascii():
            try:
                value.encode()
            except UnicodeEncodeError:
                return name
    return None


def _problem(error: Mapping[str, Any], index: int | None) -> Problem:
    field = ".".join(str(part) for part in error["loc"]) or "$"
    message = str(error["msg"])
    if error["type"] == "extra_forbidden":
        message = "not a declared field of this event type"
    return Problem(field, message.removeprefix("Value error, "), index)


def decode(value: bytes) -> Event:
    """Decode a record written by `Event.to_json` (already validated)."""
    body = json.loads(value)
    event_id, kind, ts = body.pop("event_id"), body.pop("type"), body.pop("ts")
    return Event(event_id, kind, ts, body)
