"""Events: the envelope every event shares, per-type schemas, and validation.

Pure: no I/O. `validate` turns one raw JSON object into an `Event` or a list of `Problem`s
naming the field and the rule it broke.

What validation accepts, every layer can store (the bus, the master dataset's Parquet
columns, the speed layer, DuckDB and Spark), by one rule on every path:
- an event is at most `MAX_EVENT_BYTES` of JSON as received, and a JSON object of scalars:
  the envelope plus the declared fields of its type (no other field, no nesting);
- `int`: an integer from -2^63 to 2^63-1 (int64); never a float, however whole, nor a bool;
- `float`: any JSON number whose nearest float64 is finite (it is stored rounded to it, as
  JSON numbers are: 2^53+1 becomes 2^53, 1e-400 becomes 0.0); no NaN or infinity;
- `string`: at most `MAX_STRING_CHARS` characters of valid Unicode (no lone surrogate), no
  C0 control character but tab, line feed and carriage return (NUL ends strings in C
  clients and the PostgreSQL wire protocol); `event_id`: 1 to 256 such characters;
- `bool`: true or false only;
- `decimal(p,s)` (money: exact, never through binary floating point): a JSON string of
  decimal digits with an optional `-` and `.` (`"203.86"`, no exponent, no spaces) or a JSON
  number, read exactly from its text (`19.99` is 19.99, never the float64 nearest to it),
  whose value has at most s digits after the point and p - s before it (1 <= p <= 38,
  0 <= s <= p). It is held as a `Decimal` with exactly s decimals and written to the bus as
  a string with exactly them (`"19.90"`).

Schemas evolve (`EventSchema.aliases` renames a field; `lambdalake.evolution` says which
changes old data can be read with): a renamed field is accepted under its old name too, as
records already on the bus carry it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from functools import partial
from typing import Annotated, Any, Literal, NamedTuple, Union

import orjson
from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
    create_model,
)

MAX_EVENT_BYTES = 256 * 1024
MAX_STRING_CHARS = 64 * 1024
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# No C0 control character but tab, LF, CR: pydantic-core's regex, in the same pass as the rest.
_TEXT_PATTERN = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f]*$"
ENVELOPE = ("event_id", "type", "ts")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
# The instants Python's datetime can name (years 1 to 9999), all well inside int64
MIN_MS = (datetime.min.replace(tzinfo=UTC) - _EPOCH) // _MS
MAX_MS = (datetime.max.replace(tzinfo=UTC) - _EPOCH) // _MS
INSTANT_RANGE = "must be between 0001-01-01T00:00:00Z and 9999-12-31T23:59:59.999Z"

Text = Annotated[StrictStr, Field(max_length=MAX_STRING_CHARS, pattern=_TEXT_PATTERN)]
Int64 = Annotated[StrictInt, Field(ge=INT64_MIN, le=INT64_MAX)]
_PYTHON_TYPES: dict[str, Any] = {
    "string": Text,
    "int": Int64,
    "float": float,
    "bool": StrictBool,
}
ARROW_TYPES = {"string": "string", "int": "int64", "float": "float64", "bool": "bool"}
MAX_DECIMAL_DIGITS = 38  # what Arrow's decimal128, DuckDB's DECIMAL and Spark's DecimalType hold
# `decimal(p,s)` as declared; `decimal128(p,s)` as its Arrow type name
_DECIMAL_TYPE = re.compile(r"^decimal(?:128)?\((\d{1,2}),\s*(\d{1,2})\)$")
_DECIMAL_TEXT = re.compile(r"^-?[0-9]+(\.[0-9]+)?$")


@dataclass(frozen=True, slots=True)
class DecimalType:
    """`decimal(p,s)`: at most p digits, s of them after the point."""

    precision: int
    scale: int

    @classmethod
    def named(cls, name: str) -> DecimalType | None:
        """The decimal type a field type or Arrow type name names; None for another type."""
        match = _DECIMAL_TYPE.match(name)
        if match is None:
            return None
        precision, scale = int(match[1]), int(match[2])
        if not 1 <= precision <= MAX_DECIMAL_DIGITS or scale > precision:
            raise ValueError(f"{name}: decimal(p,s) needs 1 <= p <= {MAX_DECIMAL_DIGITS} and "
                             "0 <= s <= p")
        return cls(precision, scale)

    @property
    def arrow_name(self) -> str:
        """The Arrow type's name, as `lambdalake.tables.arrow_type` reads it."""
        return f"decimal128({self.precision},{self.scale})"

    @property
    def quantum(self) -> Decimal:
        return Decimal(1).scaleb(-self.scale)

    def exact(self, value: Any) -> Decimal:
        """The value as a Decimal with exactly `scale` decimals, or ValueError naming the rule.

        A JSON number arrives as `JsonNumber` (its text kept) on every path that decodes JSON
        in Python; pydantic-core's own JSON decoding gives a bare float, whose text is gone:
        refused here, so `Validator.validate_json` decodes that event again, exactly."""
        if isinstance(value, str) and _DECIMAL_TEXT.match(value):
            text = value
        elif isinstance(value, JsonNumber):
            text = value.text
        elif isinstance(value, int) and not isinstance(value, bool):
            text = str(value)
        elif isinstance(value, float):
            raise ValueError(_NEEDS_TEXT)
        else:
            raise ValueError(f"must be a decimal string such as \"203.86\" or a JSON number, "
                             f"with {self.rule}")
        try:
            number = Decimal(text)
            quantized = number.quantize(self.quantum)
        except InvalidOperation:
            raise ValueError(f"must have {self.rule}") from None
        if quantized != number or len(quantized.as_tuple().digits) > self.precision:
            raise ValueError(f"must have {self.rule}")
        return quantized.copy_abs() if quantized.is_zero() else quantized

    @property
    def rule(self) -> str:
        return (f"at most {self.scale} digits after the point and "
                f"{self.precision - self.scale} before it (decimal({self.precision},{self.scale}))")


_NEEDS_TEXT = ("must be a decimal string such as \"203.86\" or a JSON number: a float no "
               "longer says its decimals")


class JsonNumber(float):
    """A JSON number with a fraction or exponent, as decoded in Python: a float (what `float`
    fields take) that keeps its text (what `decimal` fields read, exactly)."""

    __slots__ = ("text",)
    text: str

    def __new__(cls, text: str) -> JsonNumber:
        number = super().__new__(cls, text)
        number.text = text
        return number


def json_loads(value: bytes | str) -> Any:
    """JSON decoded with numbers kept exactly for decimal fields (`JsonNumber`)."""
    return json.loads(value, parse_float=JsonNumber)


def arrow_type_name(field_type: str) -> str:
    """The Arrow type name of a declared field type (without its `?`)."""
    decimal = DecimalType.named(field_type)
    return decimal.arrow_name if decimal else ARROW_TYPES[field_type]


def _python_type(field_type: str) -> Any:
    decimal = DecimalType.named(field_type)
    if decimal is None:
        return _PYTHON_TYPES[field_type]
    return Annotated[Decimal, BeforeValidator(decimal.exact)]


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
        """The event's record on the bus. A field without a value is left out, as a client
        may have sent it (validation reads it back as None): a record outgrows what was
        received only where a number is written differently (`1E15`: 1000000000000000.0).
        A decimal is written as a string with exactly its scale. Compact JSON, non-ASCII
        kept: written by orjson (5x faster), or by `json` when a float is in it, whose text
        (Python's `repr`, `1e+16`) orjson would write otherwise (`1e16`)."""
        fields = {name: value for name, value in self.fields.items() if value is not None}
        body = {"event_id": self.event_id, "type": self.type, "ts": self.ts, **fields}
        if _ORJSON_WRITES_AS_JSON.issuperset(map(type, fields.values())):
            return orjson.dumps(body, default=_decimal_text)
        return _RECORD_ENCODER.encode(body).encode()


class Record(NamedTuple):
    """An event already encoded as its record on the bus (`Event.to_json`), so that a caller
    who measured the record publishes it without encoding it again."""

    event_id: str
    value: bytes

    @classmethod
    def of(cls, event: Event) -> Record:
        return cls(event.event_id, event.to_json())

    def to_json(self) -> bytes:
        return self.value


def _decimal_text(value: Any) -> str:
    if isinstance(value, Decimal):
        return format(value, "f")  # never an exponent: `str` writes 1E-7
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


# The types of values orjson writes as `json` does (a Decimal: as `_decimal_text`)
_ORJSON_WRITES_AS_JSON = frozenset({str, int, bool, Decimal})
# built once: `json.dumps` with these arguments builds an encoder per call
_RECORD_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False,
                                   default=_decimal_text)


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


def event_time_ms(value: Any) -> int:
    """The event time of an envelope's `ts`: epoch milliseconds, not before 1970."""
    ms = epoch_ms(value)
    if ms < 0:
        raise ValueError("must not be before 1970-01-01")
    return ms


class _Envelope(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    event_id: StrictStr = Field(min_length=1, max_length=256, pattern=_TEXT_PATTERN)
    type: StrictStr
    ts: Annotated[int, BeforeValidator(event_time_ms)]


class _BatchEnvelope(_Envelope):
    """The envelope as a batch is checked (`Validator.records_all`): a `ts` of epoch
    milliseconds in range is taken by pydantic-core alone, without a call into Python per
    event; any other `ts` as `_Envelope` takes it. Its errors name no rule: a batch with any
    invalid event is checked again event by event."""

    ts: Annotated[Annotated[StrictInt, Field(ge=0, le=MAX_MS)]
                  | Annotated[int, BeforeValidator(event_time_ms)],
                  Field(union_mode="left_to_right")]


@dataclass(frozen=True)
class EventSchema:
    """Declared fields of one event type: name -> type; a trailing `?` marks it optional.
    Types: string, int, float, bool, decimal(p,s).

    `aliases`: old name -> field, for a renamed field. Events are accepted under the old
    name too, and master objects written before the rename are read under the new one."""

    name: str
    fields: Mapping[str, str]
    aliases: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, declared in self.fields.items():
            if name in ENVELOPE:
                raise ValueError(f"{self.name}.{name}: reserved for the envelope")
            try:
                arrow_type_name(declared.rstrip("?"))
            except KeyError:
                raise ValueError(f"{self.name}.{name}: unknown type {declared!r}; use string, "
                                 "int, float, bool or decimal(p,s)") from None
            except ValueError as exc:
                raise ValueError(f"{self.name}.{name}: {exc}") from None
        for old, new in self.aliases.items():
            if new not in self.fields or old in self.fields or old in ENVELOPE:
                raise ValueError(f"{self.name}: alias {old!r} -> {new!r} must rename a "
                                 "declared field from a name no longer declared")

    def field_type(self, name: str) -> str:
        return self.fields[name].rstrip("?")

    def optional(self, name: str) -> bool:
        return self.fields[name].endswith("?")

    def old_names(self, name: str) -> list[str]:
        """The names a field had before, newest last as declared."""
        return [old for old, new in self.aliases.items() if new == name]

    def model(self, envelope: type[BaseModel] = _Envelope) -> type[BaseModel]:
        specs: dict[str, Any] = {"type": (Literal[self.name], ...)}
        for name in self.fields:
            python_type = _python_type(self.field_type(name))
            names = self.old_names(name)
            alias = AliasChoices(name, *names) if names else None
            default = None if self.optional(name) else ...
            optional = python_type | None if self.optional(name) else python_type
            specs[name] = (optional, Field(default, validation_alias=alias))
        return create_model(f"{self.name}_event", __base__=envelope, **specs)


class Validator:
    """Validates raw events against the declared schemas."""

    def __init__(self, schemas: Mapping[str, EventSchema], max_future_ms: int):
        self._models = {name: schema.model() for name, schema in schemas.items()}
        batch_models = {name: schema.model(_BatchEnvelope) for name, schema in schemas.items()}
        self._encoders = {model: self._encoder(model, schemas[name])
                          for name, model in batch_models.items()}
        self._max_future_ms = max_future_ms
        # pydantic-core's validator itself: TypeAdapter's wrapper costs 5% of a speed-layer fold
        self._from_json = TypeAdapter(_one_of(self._models.values())).validator
        self._many = TypeAdapter(list[_one_of(batch_models.values())]).validator  # type: ignore[misc]

    def records_all(self, raws: list[Any], now_ms: int) -> list[Record] | None:
        """The record of every event of `raws` (decoded JSON values whose floats are plain
        floats), checked in one call into pydantic-core; None when any one is not valid, or
        holds a decimal as a JSON number (its text is gone): `validate` each then, to say
        which and why."""
        try:
            parsed = self._many.validate_python(raws)
        except ValidationError:
            return None
        latest = now_ms + self._max_future_ms
        if any(model.ts > latest for model in parsed):
            return None
        encoders = self._encoders
        return [Record(model.event_id, encoders[type(model)](model)) for model in parsed]

    def _encoder(self, model: type[BaseModel], schema: EventSchema) -> Callable[[Any], bytes]:
        """How a valid model becomes its record. pydantic-core writes the record of strings,
        ints and bools in Rust as `Event.to_json` does (4x faster than through an `Event`);
        it writes floats (`1e16`) and decimals (`1E-7`) otherwise."""
        if {schema.field_type(name) for name in schema.fields} <= {"string", "int", "bool"}:
            return partial(model.__pydantic_serializer__.to_json, exclude_none=True)
        return lambda parsed: self._event_of(parsed).to_json()

    def validate_json(
        self, value: bytes, now_ms: int, index: int | None = None
    ) -> Event | list[Problem]:
        """One event from its JSON bytes, decoded and checked in one pass in pydantic-core
        (3x faster than decoding, then validating); what it refuses is decoded again only
        to say why."""
        if len(value) > MAX_EVENT_BYTES:
            return [_too_large(index)]
        try:
            parsed = self._from_json.validate_json(value)
        except ValidationError:
            try:
                raw = json_loads(value)
            except (ValueError, RecursionError) as exc:
                return [Problem("$", f"not JSON: {exc}", index)]
            return self.validate(raw, now_ms, index, size=len(value))
        return self._event(parsed, now_ms, index)

    def validate(
        self, raw: Any, now_ms: int, index: int | None = None, size: int | None = None
    ) -> Event | list[Problem]:
        """`size`: the bytes of the event as received, when known (else measured as the
        record it becomes on the bus)."""
        if size is not None and size > MAX_EVENT_BYTES:
            return [_too_large(index)]
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
        event = self._event(parsed, now_ms, index)
        if size is None and isinstance(event, Event) and len(event.to_json()) > MAX_EVENT_BYTES:
            return [_too_large(index)]
        return event

    def _event(self, parsed: Any, now_ms: int, index: int | None) -> Event | list[Problem]:
        """The event of a valid model, once its time passes."""
        if parsed.ts > now_ms + self._max_future_ms:
            rule = f"more than {self._max_future_ms // 1000} s in the future"
            return [Problem("ts", rule, index)]
        return self._event_of(parsed)

    @staticmethod
    def _event_of(parsed: Any) -> Event:
        values = dict(parsed.__dict__)
        del values["event_id"], values["type"], values["ts"]
        return Event(parsed.event_id, parsed.type, parsed.ts, values)


def _one_of(models: Iterable[type[BaseModel]]) -> Any:
    """The type of an event of any of `models`, told apart by its `type`."""
    kinds = tuple(models)
    return Annotated[Union[kinds], Field(discriminator="type")] if len(kinds) > 1 else kinds[0]  # noqa: UP007


def _too_large(index: int | None) -> Problem:
    return Problem("$", f"event larger than {MAX_EVENT_BYTES} bytes", index)


_RULES = {
    "extra_forbidden": "not a declared field of this event type",
    "string_unicode": "must be valid UTF-8 text (no lone surrogates)",
    "string_pattern_mismatch": "must not contain NUL or another control character "
    "(U+0000 to U+001F) but tab, line feed and carriage return",
    "less_than_equal": f"must be a 64-bit integer, from {INT64_MIN} to {INT64_MAX}",
    "greater_than_equal": f"must be a 64-bit integer, from {INT64_MIN} to {INT64_MAX}",
}


def _problem(error: Mapping[str, Any], index: int | None) -> Problem:
    field = ".".join(str(part) for part in error["loc"]) or "$"
    message = _RULES.get(error["type"], str(error["msg"]))
    if error["type"] == "float_type" and type(error.get("input")) is int:  # not a bool
        message = "must be a number within the range of a 64-bit float"
    return Problem(field, message.removeprefix("Value error, "), index)


def decode(value: bytes) -> Event:
    """Decode a record written by `Event.to_json` (already validated): the fields it holds,
    without those it left out for having no value."""
    body = json.loads(value)
    event_id, kind, ts = body.pop("event_id"), body.pop("type"), body.pop("ts")
    return Event(event_id, kind, ts, body)
