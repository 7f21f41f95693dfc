"""Column-wise decoding (lambdalake.event_columns) and the batch fold (ViewState.apply_batch,
PartitionState.take_all): exactly what validating and applying record by record gives, on
batches of valid, invalid and unusual records alike."""

from __future__ import annotations

import json

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from lambdalake import example
from lambdalake.event_columns import BatchDecoder
from lambdalake.events import EventSchema, Validator
from lambdalake.project import Project
from lambdalake.settings import Settings
from lambdalake.speed.kafka_common import PartitionState
from lambdalake.viewstate import ViewState

# The example project with a float amount: the column checks cover string, int, float and
# bool; a type with a decimal field always takes the per-record validation (tested below).
FLOAT_PURCHASE = EventSchema("purchase", {"user_id": "string", "sku": "string",
                                          "amount": "float"})
project = Project.of([example.PAGEVIEW, FLOAT_PURCHASE], example.project.views.values())
MAX_FUTURE_MS = 300_000
T0 = 1_700_000_000_000
SLICE_MS = 60_000


def pageview(i: int, user: int, duration: int | None = 10, **extra: object) -> dict:
    event = {"event_id": f"e{i}", "type": "pageview", "ts": T0 + 1_000 * i,
             "url": f"/u/{i % 3}", "user_id": f"user-{user}", "referrer": None,
             "duration_ms": duration}
    return {**event, **extra}


def purchase(i: int, user: int, amount: float = 1.5, **extra: object) -> dict:
    event = {"event_id": f"e{i}", "type": "purchase", "ts": T0 + 1_000 * i,
             "sku": f"sku-{i % 2}", "user_id": f"user-{user}", "amount": amount}
    return {**event, **extra}


def encoded(event: dict) -> bytes:
    return json.dumps(event).encode()


# Records each of which the batch decoder must refuse (the Validator refuses most of them;
# the others it accepts with values the decoder cannot be sure of).
UNUSUAL = [
    encoded(pageview(1, 1, sku=None)),  # a field of another type, even null, is extra
    encoded(purchase(1, 1, url="/x")),
    encoded(purchase(1, 1, referrer=None)),  # null, in a batch of another type's records
    encoded(pageview(1, 1, duration=1.0)),  # a float for an int
    b'{"event_id":"a","type":"pageview","ts":1,"url":"u","user_id":"x","duration_ms":1e3}',
    encoded(pageview(1, 1, duration=2**63)),  # beyond int64
    encoded(pageview(1, 1, duration=True)),
    b'{"event_id":"a","type":"purchase","ts":1,"sku":"s","user_id":"x","amount":NaN}',
    b'{"event_id":"a","type":"purchase","ts":1,"sku":"s","user_id":"x","amount":1e400}',
    encoded(pageview(1, 1, url="a\x00b")),  # escaped as \u0000
    encoded(pageview(1, 1, url="a\bb")),
    b'{"event_id":"a","type":"pageview","ts":1,"url":"a\x01","user_id":"x"}',
    b'{"event_id":"a","type":"pageview","ts":1,\n"url":"a","user_id":"x"}',
    b'{"event_id":"a","type":"pageview","ts":1,"url":"a","user_id":"x"} {"event_id":"b"}',
    b'{"event_id":"a","type":"pageview","ts":1,"url":"a","url":"b","user_id":"x"}',
    b'{"event_id":"a","type":"pageview","ts":1,"url":"\xff","user_id":"x"}',
    b'{"event_id":"a","type":"pageview","ts":1,"u\\u0072l":"a","user_id":"x"}',
    encoded(pageview(1, 1, ts="2023-11-14T22:13:20Z")),  # valid, but not epoch ms
    encoded(pageview(1, 1, ts=-1)),
    encoded(pageview(1, 1, ts=T0 + 10**9)),  # too far past its arrival
    encoded(pageview(1, 1, event_id="")),
    encoded(pageview(1, 1, event_id="x" * 257)),
    encoded(pageview(1, 1, user_id=None)),  # a required field
    encoded({k: v for k, v in pageview(1, 1).items() if k != "url"}),
    encoded(pageview(1, 1, type="click")),
    encoded(pageview(1, 1, color="red")),
    b"[1]",
    b"not json",
    b"",
]

valid_events = st.builds(
    lambda kind, i, user, n: (pageview(i, user, duration=n) if kind else purchase(i, user, n / 7)),
    st.booleans(), st.integers(0, 30), st.integers(0, 5), st.integers(0, 10_000),
)
records = st.one_of(  # batches of valid records only (decoded column-wise), and mixed ones
    st.lists(valid_events.map(encoded), min_size=1, max_size=40),
    st.lists(st.one_of(valid_events.map(encoded), st.sampled_from(UNUSUAL)), min_size=1,
             max_size=40),
)


def test_a_record_without_a_value_sends_its_batch_to_the_per_record_path() -> None:
    values: list[bytes | None] = [encoded(pageview(i, 1)) for i in range(5)]
    values.insert(2, None)
    assert decoder().decode_batch(values, arrivals(values)) is None
    assert decoder().decode_batch([v for v in values if v], arrivals(values)[:5]) is not None


def decoder() -> BatchDecoder:
    return BatchDecoder(project.schemas, MAX_FUTURE_MS)


def arrivals(values: list[bytes]) -> np.ndarray:
    return np.arange(len(values), dtype=np.int64) * 700 + T0


def test_a_batch_of_valid_records_is_decoded_column_wise() -> None:
    values = [encoded(pageview(i, i % 4)) for i in range(20)] + [encoded(purchase(20, 1))]
    table = decoder().decode_batch(values, arrivals(values))
    assert table is not None and table.num_rows == 21
    assert table["duration_ms"].to_pylist()[:2] == [10, 10]


@given(st.sampled_from(UNUSUAL), st.integers(0, 5))
def test_one_unusual_record_sends_its_batch_to_the_per_record_path(bad: bytes, at: int) -> None:
    values = [encoded(pageview(i, 1)) for i in range(5)]
    values.insert(at, bad)
    assert decoder().decode_batch(values, arrivals(values)) is None


def state_of(view_state: ViewState) -> dict:
    """Every cell's answers, and its accumulators where they do not depend on chance (KLL
    compacts at random; below k values its answers are exact)."""
    state = {}
    for update in view_state.everything():
        metrics = list(project.views[update.view].metrics.values())
        state[(update.view, update.slice, update.bucket, update.key)] = [
            (m.result(v), None if m.kind == "quantiles" else v)
            for m, v in zip(metrics, update.values, strict=True)
        ]
    return state


@settings(max_examples=150, deadline=None)
@given(st.lists(records, min_size=1, max_size=4), st.integers(0, 3))
def test_a_partition_folds_batches_as_it_folds_records(
    batches: list[list[bytes]], cut: int
) -> None:
    """Batch by batch (column-wise where it can) or record by record: the same state, the same
    dead letters, the same ids to persist."""
    fold_both_ways(project, batches, decoder(), cut)


def fold_both_ways(
    folded: Project, batches: list[list[bytes]], batch_decoder: BatchDecoder, cut: int = 0
) -> PartitionState:
    """Fold the batches into two partitions, one batch by batch, one record by record; check
    they agree; the one folded batch by batch."""
    config = Settings(slice_ms=SLICE_MS)
    validator = Validator(folded.schemas, MAX_FUTURE_MS)
    by_batch, by_record = (PartitionState(0, folded, config) for _ in range(2))
    for state in (by_batch, by_record):
        state.view.drop_below(T0 + cut * SLICE_MS)
    offset = 0
    for values in batches:
        stamps = [T0 + 700 * (offset + i) for i in range(len(values))]
        poison = by_batch.take_all(values, stamps, batch_decoder, validator)
        expected = [(i, r) for i, (v, ts) in enumerate(zip(values, stamps, strict=True))
                    if (r := by_record.take(v, ts, validator)) is not None]
        assert poison == expected
        offset += len(values)
    assert state_of(by_batch.view) == state_of(by_record.view)
    assert by_batch.view.held_ids() == by_record.view.held_ids()
    assert by_batch.arrival == by_record.arrival
    assert by_batch._outcomes == by_record._outcomes
    assert by_batch.changelog_records() == by_record.changelog_records()
    return by_batch


def test_a_batch_of_both_types_across_the_cut_counts_as_records_do() -> None:
    """No retry, the types interleaved, the cut in the middle of the batch: each record is
    counted or not by its own arrival (the flags were once given in type order)."""
    events = [purchase(i, i) if i % 2 else pageview(i, i) for i in range(200)]
    fold_both_ways(project, [[encoded(e) for e in events]], decoder(), cut=1)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(valid_events, min_size=1, max_size=60), min_size=1, max_size=4),
       st.integers(0, 2), st.sampled_from([1_000, 20_000, 86_400_000]),
       st.sampled_from([8, 50, 10_000]))
def test_apply_batch_leaves_the_state_apply_leaves(
    batches: list[list[dict]], cut: int, window_ms: int, max_ids: int
) -> None:
    """Also while the dedup window or the id cap forgets ids in the middle of a batch."""
    validator = Validator(project.schemas, MAX_FUTURE_MS)
    by_batch, by_event = (ViewState(project, SLICE_MS, window_ms, max_ids) for _ in range(2))
    for state in (by_batch, by_event):
        state.drop_below(T0 + cut * SLICE_MS)
    offset = 0
    for events in batches:
        values = [encoded(e) for e in events]
        at = arrivals(values) + 700 * offset
        table = decoder().decode_batch(values, at)
        assert table is not None
        counted = by_batch.apply_batch(table).tolist()
        assert counted == [
            by_event.apply(validator.validate_json(v, a), a)  # type: ignore[arg-type]
            for v, a in zip(values, at.tolist(), strict=True)
        ]
        offset += len(values)
    assert state_of(by_batch) == state_of(by_event)
    assert by_batch.held_ids() == by_event.held_ids()
    assert (by_batch.forgotten_early, by_batch.dedup_horizon) == (
        by_event.forgotten_early, by_event.dedup_horizon)
    assert {d.view: d.key for d in by_batch.drain()} == {d.view: d.key for d in by_event.drain()}


def decimal_purchase(i: int, user: int, amount: object) -> bytes:
    event = {"event_id": f"e{i}", "type": "purchase", "ts": T0 + 1_000 * i,
             "sku": f"sku-{i % 2}", "user_id": f"user-{user}"}
    return encoded(event | {"amount": amount}) if amount is not None else encoded(event)


def decimal_decoder() -> BatchDecoder:
    return BatchDecoder(example.project.schemas, MAX_FUTURE_MS)


def test_decimals_are_decoded_column_wise_exactly() -> None:
    """The example's purchase has a decimal(18,2) amount: as the bus writes it, it is read
    column-wise into Arrow's decimal128, exactly (trailing zeros past the scale are no digit
    lost, as for the Validator)."""
    values = [decimal_purchase(i, 1, a) for i, a in enumerate(["2.50", "-0.00", "19.900", "7"])]
    table = decimal_decoder().decode_batch(values, arrivals(values))
    assert table is not None
    assert [str(a) for a in table["amount"].to_pylist()] == ["2.50", "0.00", "19.90", "7.00"]


# Decimal amounts the Validator refuses, reads from a JSON number's text, or reads past what
# the column rule is sure of: each sends its batch down the per-record path.
UNUSUAL_DECIMALS = ["2.505", "1e3", " 1.0", "+1.0", "1.", ".5", "2.50\n", "1234567890123456789",
                    "12345678901234567.00", "", "-", "1_0", "\u0661", 2.5, 3, True]


@given(st.sampled_from(UNUSUAL_DECIMALS), st.integers(0, 3))
def test_an_unusual_decimal_sends_its_batch_to_the_per_record_path(amount: object,
                                                                    at: int) -> None:
    values = [decimal_purchase(i, 1, "1.25") for i in range(3)]
    values.insert(at, decimal_purchase(9, 1, amount))
    assert decimal_decoder().decode_batch(values, arrivals(values)) is None


exact_amounts = st.one_of(
    st.decimals(min_value=-(10**16), max_value=10**16, places=2, allow_nan=False,
                allow_infinity=False).map(lambda d: format(d, "f")),
    st.sampled_from(["0.1", "-0.00", "5", "99999999999999999.99"]),
)
pageviews = valid_events.filter(lambda e: e["type"] == "pageview").map(encoded)


def decimal_batches(amounts: st.SearchStrategy[object]) -> st.SearchStrategy[list[bytes]]:
    purchases = st.builds(decimal_purchase, st.integers(0, 30), st.integers(0, 5), amounts)
    return st.lists(st.one_of(purchases, pageviews), min_size=1, max_size=40)


# batches the decoder takes column-wise, and batches it must send down
decimal_records = st.one_of(
    decimal_batches(exact_amounts),
    decimal_batches(st.one_of(exact_amounts, st.sampled_from(UNUSUAL_DECIMALS))),
)


@settings(max_examples=100, deadline=None)
@given(st.lists(decimal_records, min_size=1, max_size=3))
def test_a_partition_folds_decimal_batches_as_it_folds_records(batches: list[list[bytes]]
                                                                ) -> None:
    """Decimal sums folded column-wise (an Arrow sum of the scaled integers per cell) equal
    the per-record fold's exact Decimal sums, with the same dead letters and ids."""
    by_batch = fold_both_ways(example.project, batches, decimal_decoder())
    sums = [u.values for u in by_batch.view.everything() if u.view == "revenue_by_sku_day"]
    # a sum keeps the scale, as the per-record one does (Decimal's == would not tell)
    assert all(revenue.as_tuple().exponent == -2 for revenue, _ in sums)
