"""Event validation against the example project's schemas, and the wire format round trip."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lambdalake.events import (
    ENVELOPE,
    MAX_EVENT_BYTES,
    Event,
    Problem,
    Validator,
    decode,
    epoch_ms,
    iso,
)
from lambdalake.example import project

NOW = 1_714_564_800_000  # 2024-05-01T12:00:00Z
MAX_FUTURE_MS = 300_000
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def validator() -> Validator:
    return Validator(project.schemas, MAX_FUTURE_MS)


def pageview(**overrides):
    body = {
        "event_id": "pv-1",
        "type": "pageview",
        "ts": "2024-05-01T11:59:00Z",
        "url": "/pricing",
        "user_id": "u-1",
        "referrer": "https://example.org/",
        "duration_ms": 1200,
    }
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not DROP}


def purchase(**overrides):
    body = {
        "event_id": "buy-1",
        "type": "purchase",
        "ts": NOW - 1000,
        "user_id": "u-1",
        "sku": "sku-42",
        "amount": 19.99,
    }
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not DROP}


DROP = object()


# --- valid events ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        ("2024-05-01T11:59:00Z", NOW - 60_000),
        ("2024-05-01T11:59:00.250Z", NOW - 59_750),
        ("2024-05-01T13:59:00+02:00", NOW - 60_000),
        ("2024-05-01T06:29:00.001-05:30", NOW - 59_999),
        ("2024-05-01T11:59:00", NOW - 60_000),  # naive means UTC
        ("2024-05-01T11:59:00.999999Z", NOW - 59_001),  # below a millisecond: floor
        (NOW - 60_000, NOW - 60_000),  # epoch milliseconds
        (0, 0),
        (NOW + MAX_FUTURE_MS, NOW + MAX_FUTURE_MS),  # exactly at the limit is allowed
    ],
)
def test_valid_pageview_timestamps(validator, ts, expected):
    event = validator.validate(pageview(ts=ts), NOW)
    assert event == Event(
        "pv-1",
        "pageview",
        expected,
        {"url": "/pricing", "user_id": "u-1", "referrer": "https://example.org/",
         "duration_ms": 1200},
    )


def test_valid_pageview_optional_fields_absent_or_null(validator):
    event = validator.validate(pageview(referrer=DROP, duration_ms=None), NOW)
    assert isinstance(event, Event)
    assert event.ts == NOW - 60_000
    assert dict(event.fields) == {
        "url": "/pricing", "user_id": "u-1", "referrer": None, "duration_ms": None
    }


def test_valid_purchase(validator):
    event = validator.validate(purchase(), NOW)
    assert event == Event(
        "buy-1", "purchase", NOW - 1000, {"user_id": "u-1", "sku": "sku-42", "amount": 19.99}
    )
    whole = validator.validate(purchase(amount=5), NOW)  # a JSON integer is a valid float
    assert isinstance(whole, Event)
    assert whole.fields["amount"] == 5.0


@settings(max_examples=200, deadline=None)
@example(2_183_563_600_561, 0, "Z")  # 2039-03-16T17:26:40.561Z: float seconds * 1000 is 1 ms off
@example(10_574_017_066_751, 0, "Z")  # iso() via float seconds gave ...46.750999Z
@example(33_554_429, 0, "naive")  # 1970-01-01T09:19:14.429 parsed as ...428
@given(
    st.integers(0, 253_402_300_799_999),  # 1970 .. 9999
    st.integers(-14 * 60, 14 * 60),
    st.sampled_from(["Z", "offset", "naive"]),
)
def test_iso_timestamps_parse_to_the_exact_millisecond(ms, offset_minutes, style):
    """Any ISO 8601 instant with millisecond precision gives exactly its epoch ms."""
    instant = EPOCH + timedelta(milliseconds=ms)
    if style == "Z":
        text = instant.isoformat().replace("+00:00", "Z")
    elif style == "naive":
        text = instant.replace(tzinfo=None).isoformat()
    else:
        zone = timezone(timedelta(minutes=offset_minutes))
        try:
            text = instant.astimezone(zone).isoformat()
        except OverflowError:  # shifted out of datetime's years 1..9999
            return
    assert epoch_ms(text) == ms
    assert epoch_ms(iso(ms)) == ms


@pytest.mark.parametrize("start", [NOW, 2_183_563_600_000, 4_102_444_800_000])
def test_every_millisecond_of_a_few_seconds_parses_exactly(start):
    for ms in range(start, start + 5_000):
        assert epoch_ms((EPOCH + timedelta(milliseconds=ms)).isoformat()) == ms


# --- each bad input gives a Problem naming the field and the rule -------------------------

BAD = [
    ("missing field", pageview(url=DROP), "url", "required"),
    ("wrong type", pageview(url=3), "url", "valid string"),
    ("int field given a float", pageview(duration_ms=1.5), "duration_ms", "integer"),
    ("int field given a bool", pageview(duration_ms=True), "duration_ms", "integer"),
    ("float field given a string", purchase(amount="19.99"), "amount", "number"),
    ("float field given NaN", purchase(amount=float("nan")), "amount", "finite"),
    ("float field given infinity", purchase(amount=float("inf")), "amount", "finite"),
    ("unknown type", pageview(type="click"), "type", "unknown event type 'click'"),
    ("type not a string", pageview(type=["pageview"]), "type", "unknown event type"),
    ("type missing", pageview(type=DROP), "type", "required"),
    ("extra field", pageview(colour="red"), "colour", "not a declared field"),
    ("ts far future", pageview(ts=NOW + MAX_FUTURE_MS + 1), "ts", "in the future"),
    ("ts far future iso", pageview(ts="2100-01-01T00:00:00Z"), "ts", "in the future"),
    ("ts negative", pageview(ts=-1), "ts", "before 1970"),
    ("ts before 1970 iso", pageview(ts="1969-12-31T23:59:59.9995Z"), "ts", "before 1970"),
    ("ts garbage", pageview(ts="yesterday"), "ts", "not an ISO 8601 timestamp"),
    ("ts fractional ms", pageview(ts=1.5), "ts", "epoch milliseconds"),
    ("ts bool", pageview(ts=True), "ts", "epoch milliseconds"),
    ("ts null", pageview(ts=None), "ts", "epoch milliseconds"),
    ("ts missing", pageview(ts=DROP), "ts", "required"),
    ("event_id empty", pageview(event_id=""), "event_id", "at least 1 character"),
    ("event_id not a string", pageview(event_id=7), "event_id", "valid string"),
    ("event_id missing", pageview(event_id=DROP), "event_id", "required"),
    ("lone surrogate", pageview(url="/a\ud800"), "url", "UTF-8"),
    ("non-object list", [pageview()], "$", "JSON object"),
    ("non-object string", "pageview", "$", "JSON object"),
    ("non-object null", None, "$", "JSON object"),
    ("over 256 KiB", pageview(url="/" + "x" * MAX_EVENT_BYTES), "$", "larger than 262144"),
]


@pytest.mark.parametrize(("raw", "field", "rule"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_events_name_the_field_and_rule(validator, raw, field, rule):
    problems = validator.validate(raw, NOW, index=3)
    assert isinstance(problems, list), problems
    assert problems, "a refused event has at least one problem"
    assert all(isinstance(p, Problem) and p.index == 3 for p in problems)
    assert field in [p.field for p in problems]
    errors = " | ".join(p.error for p in problems if p.field == field)
    assert rule.lower() in errors.lower(), errors
    assert problems[0].as_dict().keys() == {"index", "field", "error"}


@pytest.mark.parametrize(("raw", "field", "rule"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_json_bytes_name_the_field_and_rule_too(validator, raw, field, rule):
    problems = validator.validate_json(json.dumps(raw).encode(), NOW, index=3)
    assert isinstance(problems, list), problems
    assert problems == validator.validate(raw, NOW, index=3)


@pytest.mark.parametrize("value", [b"", b"{", b"not json", b'{"a": 1} trailing', b"\xff"])
def test_bytes_that_are_not_json_are_named_so(validator, value):
    [problem] = validator.validate_json(value, NOW)
    assert (problem.field, problem.error[:9]) == ("$", "not JSON:")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=6,
)
near_valid = st.fixed_dictionaries(
    {},
    optional={
        "event_id": st.text(max_size=4) | json_values,
        "type": st.sampled_from(["pageview", "purchase", "click"]) | json_values,
        "ts": st.integers(-5, NOW + 2 * MAX_FUTURE_MS) | st.just("2024-01-01T00:00:00Z")
        | json_values,
        "url": st.text(max_size=6) | json_values,
        "user_id": st.text(max_size=6),
        "referrer": st.none() | st.text(max_size=6),
        "duration_ms": st.none() | st.integers() | st.floats(),
        "sku": st.text(max_size=3),
        "amount": st.floats() | st.integers() | json_values,
        "colour": json_values,
    },
)


@settings(max_examples=500, deadline=None)
@given(near_valid)
def test_json_bytes_are_judged_as_the_decoded_object_is(raw):
    """The one-pass check of JSON bytes accepts exactly what decoding, then validating,
    accepts, into the same event, and refuses the rest with the same problems."""
    data = json.dumps(raw).encode()
    checker = Validator(project.schemas, MAX_FUTURE_MS)
    decoded = checker.validate(json.loads(data), NOW, size=len(data))
    assert checker.validate_json(data, NOW) == decoded


def test_every_problem_is_reported_at_once(validator):
    problems = validator.validate(pageview(url=3, user_id=DROP, colour="red"), NOW)
    assert {p.field for p in problems} == {"url", "user_id", "colour"}


def test_the_size_limit_is_exactly_256_kib_of_json(validator):
    empty = validator.validate(pageview(url="", ts=NOW), NOW)
    room = MAX_EVENT_BYTES - len(empty.to_json())
    largest = validator.validate(pageview(url="x" * room, ts=NOW), NOW)
    assert isinstance(largest, Event), largest
    assert len(largest.to_json()) == MAX_EVENT_BYTES
    [problem] = validator.validate(pageview(url="x" * (room + 1), ts=NOW), NOW)
    assert problem.field == "$"


# --- Event.to_json / decode round trip ---------------------------------------------------

field_names = st.text(min_size=1, max_size=12).filter(lambda name: name not in ENVELOPE)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
events = st.builds(
    Event,
    event_id=st.text(min_size=1, max_size=64),
    type=st.sampled_from(["pageview", "purchase", "something_else"]),
    ts=st.integers(0, 2**53),
    fields=st.dictionaries(field_names, scalars, max_size=6),
)


@settings(max_examples=200, deadline=None)
@given(events)
def test_to_json_decode_round_trip(event):
    data = event.to_json()
    assert json.loads(data)["event_id"] == event.event_id
    back = decode(data)
    assert back == event
    assert back.to_json() == data


@settings(max_examples=200, deadline=None)
@given(
    st.text(min_size=1, max_size=40),
    st.integers(0, NOW),
    st.text(max_size=40),
    st.text(max_size=20),
    st.none() | st.text(max_size=20),
    st.none() | st.integers(0, 2**31),
)
def test_validated_events_round_trip_through_the_wire(event_id, ts, url, user, ref, duration):
    checker = Validator(project.schemas, MAX_FUTURE_MS)
    raw = {"event_id": event_id, "type": "pageview", "ts": iso(ts), "url": url,
           "user_id": user, "referrer": ref, "duration_ms": duration}
    event = checker.validate(raw, NOW)
    assert isinstance(event, Event), event
    assert event.ts == ts
    assert decode(event.to_json()) == event
    assert checker.validate(json.loads(event.to_json()), NOW) == event
