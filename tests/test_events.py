"""Event validation against the example project's schemas, and the wire format round trip."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import jiter
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lambdalake import master
from lambdalake.events import (
    ENVELOPE,
    INT64_MAX,
    INT64_MIN,
    MAX_EVENT_BYTES,
    MAX_STRING_CHARS,
    Event,
    EventSchema,
    Problem,
    Record,
    Validator,
    decode,
    epoch_ms,
    iso,
    json_loads,
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
        "amount": "19.99",
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
    amount = Decimal("19.99")
    assert event == Event(
        "buy-1", "purchase", NOW - 1000, {"user_id": "u-1", "sku": "sku-42", "amount": amount}
    )
    whole = validator.validate(purchase(amount=5), NOW)  # a JSON integer is a valid decimal
    assert isinstance(whole, Event)
    assert str(whole.fields["amount"]) == "5.00"
    # a Python float has lost the text a JSON number had: refused, never guessed
    [problem] = validator.validate(purchase(amount=19.99), NOW)
    assert problem.field == "amount" and "decimal string" in problem.error


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
    ("decimal field given a list", purchase(amount=[1]), "amount", "decimal string"),
    ("decimal field past its scale", purchase(amount="19.999"), "amount", "at most 2 digits"),
    ("decimal field past its precision", purchase(amount="1" * 17), "amount", "16 before it"),
    ("decimal field given NaN", purchase(amount="NaN"), "amount", "decimal string"),
    ("decimal field given an exponent", purchase(amount="1e2"), "amount", "decimal string"),
    ("decimal field given a bool", purchase(amount=True), "amount", "decimal string"),
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
    ("over 256 KiB", pageview(url="\U0001f600" * MAX_STRING_CHARS), "$", "larger than 262144"),
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
    decoded = checker.validate(json_loads(data), NOW, size=len(data))
    assert checker.validate_json(data, NOW) == decoded


MIXED = {**project.schemas, "flag": EventSchema("flag", {"on": "bool", "score": "float?"})}
near_valid_flag = st.fixed_dictionaries(
    {"event_id": st.text(max_size=4),
     "type": st.just("flag"), "ts": st.integers(0, NOW + 2 * MAX_FUTURE_MS)},
    optional={"on": st.booleans() | json_values, "score": st.none() | st.floats() | json_values},
)


@pytest.fixture(scope="module")
def mixed() -> Validator:
    return Validator(MIXED, MAX_FUTURE_MS)


@settings(max_examples=100, deadline=None)
@given(raws=st.lists(near_valid | near_valid_flag, min_size=1, max_size=3))
def test_a_batch_is_judged_as_its_events_are_one_by_one(mixed, raws):
    """`records_all` takes a batch only when every one of its events is valid one by one (as
    JSON decoded in Python), into the very records `Event.to_json` writes; else None. It
    takes every such batch but one with a decimal as a JSON number (whose text it lost)."""
    texts = [json.dumps(raw).encode() for raw in raws]
    each = [mixed.validate(json_loads(text), NOW, size=len(text)) for text in texts]
    records = mixed.records_all(jiter.from_json(b"[" + b",".join(texts) + b"]"), NOW)
    if not all(isinstance(event, Event) for event in each):
        assert records is None
    elif any(isinstance(raw.get("amount"), float) for raw in raws):
        assert records in (None, [Record.of(event) for event in each])  # type: ignore[arg-type]
    else:
        assert records == [Record.of(event) for event in each]  # type: ignore[arg-type]


def test_every_problem_is_reported_at_once(validator):
    problems = validator.validate(pageview(url=3, user_id=DROP, colour="red"), NOW)
    assert {p.field for p in problems} == {"url", "user_id", "colour"}


def compact(raw: dict) -> bytes:
    return json.dumps(raw, separators=(",", ":"), ensure_ascii=False).encode()


def padded_to(size: int, **fields) -> bytes:
    """A compact pageview of exactly `size` bytes, its url filled with 4-byte characters."""
    room = size - len(compact(pageview(url="", **fields)))
    return compact(pageview(url="\U0001f600" * (room // 4) + "x" * (room % 4), **fields))


def test_the_size_limit_is_exactly_256_kib_of_json_as_received(validator):
    largest, over = padded_to(MAX_EVENT_BYTES), padded_to(MAX_EVENT_BYTES + 1)
    assert (len(largest), len(over)) == (MAX_EVENT_BYTES, MAX_EVENT_BYTES + 1)
    assert isinstance(validator.validate_json(largest, NOW), Event)
    assert isinstance(validator.validate(json.loads(largest), NOW, size=len(largest)), Event)
    for judged in (validator.validate_json(over, NOW),
                   validator.validate(json.loads(over), NOW, size=len(over))):
        assert judged == [Problem("$", f"event larger than {MAX_EVENT_BYTES} bytes")]


def test_escapes_count_as_the_bytes_they_take(validator):
    """What arrived is measured, not what it decodes to: 600 KB of \\u escapes decoding
    to 100 KB is refused; the same text sent as UTF-8 fits."""
    text = "\\u00e9" * (MAX_STRING_CHARS - 1)
    escaped = compact(pageview(url="")).replace(b'"url":""', f'"url":"{text}"'.encode())
    assert len(escaped) > 6 * (MAX_STRING_CHARS - 1) > MAX_EVENT_BYTES
    assert validator.validate_json(escaped, NOW) == [_too_large()]
    assert validator.validate(json.loads(escaped), NOW, size=len(escaped)) == [_too_large()]
    plain = compact(json.loads(escaped))
    assert len(plain) < MAX_EVENT_BYTES and isinstance(validator.validate_json(plain, NOW), Event)


def test_without_a_size_the_record_an_event_becomes_is_measured(validator):
    room = MAX_EVENT_BYTES - len(validator.validate(pageview(url="", ts=NOW), NOW).to_json())
    url = "\U0001f600" * (room // 4) + "x" * (room % 4)
    assert isinstance(validator.validate(pageview(url=url, ts=NOW), NOW), Event)
    assert validator.validate(pageview(url=url + "x", ts=NOW), NOW) == [_too_large()]


def _too_large() -> Problem:
    return Problem("$", f"event larger than {MAX_EVENT_BYTES} bytes")


# --- bounds: what validation accepts is exactly what every layer can store -----------------

PROBE = EventSchema("probe", {"n": "int?", "x": "float?", "s": "string?", "b": "bool?"})


@pytest.fixture(scope="module")
def prober() -> Validator:
    return Validator({"probe": PROBE}, MAX_FUTURE_MS)


def probe(**fragments: str) -> bytes:
    """A probe event as JSON text, each field given as its literal JSON fragment."""
    members = [f'"event_id":{fragments.pop("event_id", json.dumps("p-1"))}',
               '"type":"probe"', f'"ts":{NOW}']
    members += [f'"{name}":{fragment}' for name, fragment in fragments.items()]
    return ("{" + ",".join(members) + "}").encode()


def judged(checker: Validator, data: bytes) -> Event | list[Problem]:
    """The verdict on JSON bytes, the same from both entry points (the bus's and HTTP's)."""
    verdict = checker.validate_json(data, NOW)
    assert checker.validate(json.loads(data), NOW, size=len(data)) == verdict
    return verdict


LARGEST_FLOAT = "1.7976931348623157e308"
ACCEPTED = [
    ("int64 max", {"n": str(INT64_MAX)}, "n", INT64_MAX),
    ("int64 min", {"n": str(INT64_MIN)}, "n", INT64_MIN),
    ("largest float", {"x": LARGEST_FLOAT}, "x", 1.7976931348623157e308),
    ("lowest float", {"x": "-" + LARGEST_FLOAT}, "x", -1.7976931348623157e308),
    ("largest float as an integer", {"x": str(int(1.7976931348623157e308))}, "x",
     1.7976931348623157e308),
    ("smallest subnormal", {"x": "5e-324"}, "x", 5e-324),
    ("below the smallest subnormal rounds to 0", {"x": "1e-400"}, "x", 0.0),
    ("2^53+1 rounds to 2^53", {"x": "9007199254740993"}, "x", 2.0**53),
    ("string of the most characters", {"s": json.dumps("x" * MAX_STRING_CHARS)}, "s",
     "x" * MAX_STRING_CHARS),
    ("characters, not bytes", {"s": json.dumps("é" * MAX_STRING_CHARS, ensure_ascii=False)},
     "s", "é" * MAX_STRING_CHARS),
    ("tab, line feed, carriage return", {"s": '"a\\tb\\nc\\rd"'}, "s", "a\tb\nc\rd"),
    ("DEL and C1 controls are not C0", {"s": '"\\u007f\\u0085"'}, "s", "\x7f\x85"),
    ("a surrogate pair", {"s": '"\\ud83d\\ude00"'}, "s", "\U0001f600"),
    ("true", {"b": "true"}, "b", True),
    ("false", {"b": "false"}, "b", False),
    ("event_id of 256 characters", {"event_id": json.dumps("i" * 256)}, "n", None),
]


@pytest.mark.parametrize(("fragments", "field", "value"), [a[1:] for a in ACCEPTED],
                         ids=[a[0] for a in ACCEPTED])
def test_each_field_type_accepts_up_to_its_limit(prober, fragments, field, value):
    event = judged(prober, probe(**fragments))
    assert isinstance(event, Event), event
    assert event.fields[field] == value
    assert type(event.fields[field]) is type(value)


OVER = "1.7976931348623159e308"  # past the largest float: rounds to infinity
REFUSED = [
    ("int64 max + 1", {"n": str(INT64_MAX + 1)}, "n", "64-bit integer"),
    ("int64 min - 1", {"n": str(INT64_MIN - 1)}, "n", "64-bit integer"),
    ("int of 400 digits", {"n": "9" * 400}, "n", "64-bit integer"),
    ("int given a whole float", {"n": "1.0"}, "n", "valid integer"),
    ("int given an exponent", {"n": "1e3"}, "n", "valid integer"),
    ("int given a bool", {"n": "true"}, "n", "valid integer"),
    ("int given a string", {"n": '"1"'}, "n", "valid integer"),
    ("float past the largest", {"x": OVER}, "x", "finite"),
    ("float past the lowest", {"x": "-" + OVER}, "x", "finite"),
    ("float given an integer past the largest", {"x": str(2**1024)}, "x", "64-bit float"),
    ("float given NaN", {"x": "NaN"}, "x", "finite"),
    ("float given Infinity", {"x": "-Infinity"}, "x", "finite"),
    ("float given a string", {"x": '"1.5"'}, "x", "valid number"),
    ("float given a bool", {"x": "false"}, "x", "valid number"),
    ("string one character too long", {"s": json.dumps("x" * (MAX_STRING_CHARS + 1))}, "s",
     "at most 65536 characters"),
    ("NUL", {"s": '"a\\u0000"'}, "s", "control character"),
    ("U+0001", {"s": '"\\u0001"'}, "s", "control character"),
    ("U+001F", {"s": '"\\u001f"'}, "s", "control character"),
    ("vertical tab", {"s": '"\\u000b"'}, "s", "control character"),
    ("form feed", {"s": '"\\f"'}, "s", "control character"),
    ("lone high surrogate", {"s": '"a\\ud800"'}, "s", "UTF-8"),
    ("lone low surrogate", {"s": '"\\udc00b"'}, "s", "UTF-8"),
    ("string given a number", {"s": "3"}, "s", "valid string"),
    ("nested object", {"s": '{"a":"b"}'}, "s", "valid string"),
    ("nested list", {"s": '["a"]'}, "s", "valid string"),
    ("bool given 1", {"b": "1"}, "b", "valid boolean"),
    ("bool given a string", {"b": '"true"'}, "b", "valid boolean"),
    ("event_id of 257 characters", {"event_id": json.dumps("i" * 257)}, "event_id",
     "at most 256 characters"),
    ("event_id with NUL", {"event_id": '"a\\u0000"'}, "event_id", "control character"),
    ("a field not declared", {"extra": "1"}, "extra", "not a declared field"),
]


@pytest.mark.parametrize(("fragments", "field", "rule"), [r[1:] for r in REFUSED],
                         ids=[r[0] for r in REFUSED])
def test_each_field_type_refuses_past_its_limit(prober, fragments, field, rule):
    problems = judged(prober, probe(**fragments))
    assert isinstance(problems, list), problems
    assert [p.field for p in problems] == [field], problems
    assert rule.lower() in problems[0].error.lower(), problems


near_bounds = st.fixed_dictionaries({}, optional={
    "n": st.none() | st.integers(INT64_MIN - 2, INT64_MIN + 2)
    | st.integers(INT64_MAX - 2, INT64_MAX + 2) | st.integers() | st.floats(),
    "x": st.none() | st.floats() | st.integers(-(2**1030), 2**1030),
    "s": st.none() | st.text(max_size=6)
    | st.integers(MAX_STRING_CHARS - 1, MAX_STRING_CHARS + 1).map(lambda size: "x" * size),
    "b": st.none() | st.booleans() | st.integers(0, 1),
})


@settings(max_examples=300, deadline=None)
@given(near_bounds)
def test_whatever_validation_accepts_the_master_dataset_stores(fields):
    checker = Validator({"probe": PROBE}, MAX_FUTURE_MS)
    event = checker.validate({"event_id": "p", "type": "probe", "ts": NOW, **fields}, NOW)
    if isinstance(event, Event):
        table, unstorable = master.to_table(PROBE, [master.Archived(event, 0, 0, NOW)])
        assert unstorable == [] and table.num_rows == 1
        assert table.to_pylist()[0] | {} == {
            "event_id": "p", "ts": NOW, "arrival": NOW, "partition": 0, "offset": 0,
            **{name: event.fields[name] for name in PROBE.fields}}


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
    assert back == Event(event.event_id, event.type, event.ts,
                         {name: v for name, v in event.fields.items() if v is not None})
    assert back.to_json() == data


allowed_text = st.characters(exclude_categories=("Cs",),
                             exclude_characters=set(map(chr, range(32))) - set("\t\n\r"))


@settings(max_examples=200, deadline=None)
@given(
    st.text(allowed_text, min_size=1, max_size=40),
    st.integers(0, NOW),
    st.text(allowed_text, max_size=40),
    st.text(allowed_text, max_size=20),
    st.none() | st.text(allowed_text, max_size=20),
    st.none() | st.integers(INT64_MIN, INT64_MAX),
)
def test_validated_events_round_trip_through_the_wire(event_id, ts, url, user, ref, duration):
    checker = Validator(project.schemas, MAX_FUTURE_MS)
    raw = {"event_id": event_id, "type": "pageview", "ts": iso(ts), "url": url,
           "user_id": user, "referrer": ref, "duration_ms": duration}
    event = checker.validate(raw, NOW)
    assert isinstance(event, Event), event
    assert event.ts == ts
    assert checker.validate_json(event.to_json(), NOW) == event
    assert checker.validate(json.loads(event.to_json()), NOW) == event


# --- decimal(p,s): exact, never through a binary float --------------------------------------

MONEY = EventSchema("money", {"amount": "decimal(18,2)", "rate": "decimal(38,7)?"})


@pytest.fixture(scope="module")
def money() -> Validator:
    return Validator({"money": MONEY}, MAX_FUTURE_MS)


def money_json(amount: str, rate: str | None = None) -> bytes:
    extra = f',"rate":{rate}' if rate is not None else ""
    return f'{{"event_id":"m","type":"money","ts":1,"amount":{amount}{extra}}}'.encode()


@pytest.mark.parametrize(("fragment", "held"), [
    ('"203.86"', "203.86"), ("203.86", "203.86"), ('"19.9"', "19.90"), ("5", "5.00"),
    ("1e2", "100.00"), ("-0.00", "0.00"), ('"-12.5"', "-12.50"),
    ('"9999999999999999.99"', "9999999999999999.99"),
])
def test_a_decimal_is_held_exactly_at_its_scale(money, fragment, held):
    for check in (money.validate_json(money_json(fragment), NOW),
                  money.validate(json_loads(money_json(fragment)), NOW)):
        assert isinstance(check, Event)
        assert check.fields["amount"] == Decimal(held)
        assert format(check.fields["amount"], "f") == held
        assert json.loads(check.to_json())["amount"] == held  # on the bus: a string, exactly
        assert money.validate_json(check.to_json(), NOW) == check


@pytest.mark.parametrize("fragment", [
    "19.999999999999999999",  # a float64 would read it as 20.0 and accept it
    "0.1000000000000000055511151231257827", '"19.999"', '"10000000000000000.00"',
    '" 19.9"', '"+1"', '".5"', '"1e2"', '"NaN"', '"Infinity"', "true", '"0x10"',
])
def test_a_decimal_it_cannot_hold_exactly_is_refused(money, fragment):
    for check in (money.validate_json(money_json(fragment), NOW),
                  money.validate(json_loads(money_json(fragment)), NOW)):
        assert isinstance(check, list) and [p.field for p in check] == ["amount"], check


def test_a_small_decimal_is_written_without_an_exponent(money):
    event = money.validate_json(money_json('"1"', rate='"0.0000001"'), NOW)
    assert json.loads(event.to_json())["rate"] == "0.0000001"


@pytest.mark.parametrize("declared", ["decimal(0,0)", "decimal(39,2)", "decimal(5,6)", "dec(5,2)"])
def test_an_impossible_decimal_type_is_refused_naming_the_field(declared):
    with pytest.raises(ValueError, match=r"^money\.amount: "):
        EventSchema("money", {"amount": declared})


def test_a_renamed_field_is_accepted_under_its_old_name_too():
    schema = EventSchema("purchase", {"buyer": "string"}, aliases={"user_id": "buyer"})
    check = Validator({"purchase": schema}, MAX_FUTURE_MS)
    old = b'{"event_id":"a","type":"purchase","ts":1,"user_id":"u1"}'
    for event in (check.validate_json(old, NOW), check.validate(json.loads(old), NOW)):
        assert isinstance(event, Event) and dict(event.fields) == {"buyer": "u1"}
    with pytest.raises(ValueError, match="alias"):
        EventSchema("purchase", {"buyer": "string"}, aliases={"user_id": "nobody"})
