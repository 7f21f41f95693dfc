"""Monoid laws for every metric, and the HLL sketch's accuracy claims."""

from __future__ import annotations

import math
from functools import reduce

import pytest
from exact import QuantilesOf, exact_quantiles
from hypothesis import given, settings
from hypothesis import strategies as st

from lambdalake.monoids import (
    ApproxDistinct,
    Count,
    DistinctSet,
    Max,
    Min,
    Quantiles,
    Sum,
    merge_all,
)

LAWS = settings(max_examples=200, deadline=None)

ints = st.integers(-(10**15), 10**15)
floats = st.floats(-1e12, 1e12, allow_nan=False, allow_infinity=False)
counts = st.integers(0, 10**12)
extrema = st.none() | ints | floats


def close(left: float, right: float, *scale: float) -> bool:
    """Equal up to float rounding of sums whose terms are as large as `scale`."""
    tolerance = 1e-9 * sum(abs(s) for s in scale)
    return math.isclose(left, right, rel_tol=1e-9, abs_tol=tolerance)


# --- Count -------------------------------------------------------------------------------


@LAWS
@given(counts, counts, counts)
def test_count_laws(a, b, c):
    m = Count()
    assert m.merge(m.merge(a, b), c) == m.merge(a, m.merge(b, c))
    assert m.merge(a, b) == m.merge(b, a)
    assert m.merge(m.zero(), a) == a == m.merge(a, m.zero())


@LAWS
@given(st.lists(st.none() | ints | st.text(max_size=3)))
def test_count_counts_every_value_including_nulls(values):
    m = Count()
    working = m.thaw(m.zero())
    for value in values:
        working = m.add(working, value)
    assert m.result(m.freeze(working)) == len(values)
    assert merge_all(m, [m.lift(v) for v in values]) == len(values)


# --- Sum ---------------------------------------------------------------------------------


@LAWS
@given(ints, ints, ints)
def test_sum_laws_ints_exact(a, b, c):
    m = Sum("amount")
    assert m.merge(m.merge(a, b), c) == m.merge(a, m.merge(b, c)) == a + b + c
    assert m.merge(a, b) == m.merge(b, a)
    assert m.merge(m.zero(), a) == a == m.merge(a, m.zero())


@LAWS
@given(floats, floats, floats)
def test_sum_laws_floats(a, b, c):
    m = Sum("amount")
    assert close(m.merge(m.merge(a, b), c), m.merge(a, m.merge(b, c)), a, b, c)
    assert m.merge(a, b) == m.merge(b, a)
    assert m.merge(m.zero(), a) == a == m.merge(a, m.zero())


def test_sum_lifts_null_to_zero():
    m = Sum("amount")
    assert m.lift(None) == 0
    assert merge_all(m, [m.lift(v) for v in (2.5, None, 4)]) == 6.5


# --- Min / Max ---------------------------------------------------------------------------


@LAWS
@pytest.mark.parametrize("monoid", [Min("x"), Max("x")], ids=["min", "max"])
@given(extrema, extrema, extrema)
def test_extremum_laws(monoid, a, b, c):
    m = monoid
    assert m.merge(m.merge(a, b), c) == m.merge(a, m.merge(b, c))
    assert m.merge(a, b) == m.merge(b, a)
    assert m.merge(m.zero(), a) == a
    assert m.merge(a, m.zero()) == a


@LAWS
@given(st.lists(st.none() | ints))
def test_extremum_is_the_extreme_of_the_non_null_values(values):
    present = [v for v in values if v is not None]
    lifted_min = merge_all(Min("x"), [Min("x").lift(v) for v in values])
    lifted_max = merge_all(Max("x"), [Max("x").lift(v) for v in values])
    assert lifted_min == min(present, default=None)
    assert lifted_max == max(present, default=None)


# --- add / thaw / freeze agree with lift / merge, merge_all with folding merge ------------

SCALARS = [
    (Count(), st.none() | ints),
    (Sum("x"), ints),
    (Min("x"), st.none() | ints),
    (Max("x"), st.none() | ints),
]


@LAWS
@pytest.mark.parametrize(("monoid", "values"), SCALARS, ids=["count", "sum", "min", "max"])
@given(data=st.data())
def test_add_agrees_with_lift_and_merge(monoid, values, data):
    m = monoid
    items = data.draw(st.lists(values, max_size=40))
    start = data.draw(st.sampled_from([m.zero(), m.lift(data.draw(values))]))
    working = m.thaw(start)
    for value in items:
        working = m.add(working, value)
    folded = reduce(lambda acc, value: m.merge(acc, m.lift(value)), items, start)
    assert m.freeze(working) == folded


@LAWS
@given(st.lists(floats, max_size=40))
def test_add_agrees_with_lift_and_merge_float_sums(items):
    m = Sum("x")
    working = m.thaw(m.zero())
    for value in items:
        working = m.add(working, value)
    assert close(m.freeze(working), math.fsum(items), *items)


@LAWS
@pytest.mark.parametrize(("monoid", "values"), SCALARS, ids=["count", "sum", "min", "max"])
@given(data=st.data())
def test_merge_all_equals_folding_merge(monoid, values, data):
    m = monoid
    accs = [m.lift(v) for v in data.draw(st.lists(values, max_size=40))]
    assert merge_all(m, accs) == reduce(m.merge, accs, m.zero())


# --- ApproxDistinct ----------------------------------------------------------------------

HLL = ApproxDistinct("user_id")


def sketch_of(values) -> bytes:
    working = HLL.thaw(HLL.zero())
    for value in values:
        working = HLL.add(working, value)
    return HLL.freeze(working)


def users(start: int, size: int, flavour: str) -> list:
    """`size` distinct values; ints and strings are different values to the sketch."""
    if flavour == "int":
        return list(range(start, start + size))
    return [f"user-{i}" for i in range(start, start + size)]


# Sketches from empty (identity) through list and set mode to full HLL mode (> 384 values).
value_sets = st.builds(
    users, st.integers(0, 5_000), st.integers(0, 3_000), st.sampled_from(["int", "str"])
)
sketches = value_sets.map(sketch_of)


@LAWS
@given(sketches, sketches, sketches)
def test_approx_distinct_laws(a, b, c):
    m = HLL
    left, right = m.merge(m.merge(a, b), c), m.merge(a, m.merge(b, c))
    assert m.result(left) == m.result(right)
    assert m.result(m.merge(a, b)) == m.result(m.merge(b, a))
    assert m.result(m.merge(m.zero(), a)) == m.result(a) == m.result(m.merge(a, m.zero()))
    # Merged in any order, the sketch holds the same information: merging it with itself or
    # with the other grouping changes nothing.
    assert m.result(m.merge(left, right)) == m.result(left)
    assert m.result(m.merge_all([a, b, c])) == m.result(left)


@LAWS
@given(
    st.sets(st.integers(0, 10**9) | st.text(min_size=1, max_size=12), max_size=299),
    st.data(),
)
def test_approx_distinct_is_exact_for_small_sets(distinct, data):
    values = sorted(distinct, key=repr)
    # Split into overlapping parts, as slices and partitions would see them.
    parts = data.draw(st.lists(st.lists(st.sampled_from(values)), max_size=6)) if values else []
    parts.append(values)
    merged = merge_all(HLL, [sketch_of(part) for part in parts])
    assert HLL.result(merged) == len(distinct)
    assert HLL.result(sketch_of(values)) == len(distinct)


def test_approx_distinct_within_5_percent_on_100k():
    parts = [sketch_of(f"visitor-{i}" for i in range(p, 100_000, 7)) for p in range(7)]
    estimate = HLL.result(merge_all(HLL, parts))
    assert abs(estimate - 100_000) <= 5_000, estimate
    assert HLL.result(sketch_of(f"visitor-{i}" for i in range(100_000))) == estimate


@LAWS
@given(value_sets, st.integers(1, 8))
def test_approx_distinct_add_agrees_with_lift_and_merge(values, parts):
    lifted = HLL.merge_all(HLL.lift(v) for v in values)
    chunks = [sketch_of(values[i::parts]) for i in range(parts)]
    assert HLL.result(sketch_of(values)) == HLL.result(lifted)
    assert HLL.result(HLL.merge_all(chunks)) == HLL.result(lifted)
    assert HLL.result(reduce(HLL.merge, chunks, HLL.zero())) == HLL.result(lifted)


def test_approx_distinct_ignores_nulls_and_repeats():
    assert HLL.result(HLL.lift(None)) == 0
    assert HLL.result(HLL.zero()) == 0
    assert HLL.result(None) == 0
    assert HLL.result(sketch_of(["a", None, "a", "b", "b"])) == 2
    assert merge_all(HLL, [HLL.lift("a"), None, HLL.lift("a")]) == HLL.lift("a")


# --- DistinctSet and Quantiles ------------------------------------------------------------

THETA = DistinctSet("user_id")
KLL = Quantiles("duration_ms")


def folded(m, values) -> bytes:
    working = m.thaw(m.zero())
    for value in values:
        working = m.add(working, value)
    return m.freeze(working)


# Exact sets and estimation mode (> 4096 values), overlapping.
theta_sets = st.builds(
    users, st.integers(0, 6_000), st.integers(0, 6_000), st.sampled_from(["int", "str"])
).map(lambda values: folded(THETA, values))


@settings(max_examples=30, deadline=None)
@given(theta_sets, theta_sets, theta_sets)
def test_distinct_set_laws_hold_to_the_bit(a, b, c):
    m = THETA
    assert m.merge(m.merge(a, b), c) == m.merge(a, m.merge(b, c)) == m.merge_all([c, a, b])
    assert m.merge(a, b) == m.merge(b, a)
    assert m.merge(m.zero(), a) == a == m.merge(a, m.zero()) == m.merge(a, a)


@LAWS
@given(st.lists(st.none() | st.integers(0, 1000), max_size=60), st.integers(0, 60))
def test_distinct_set_is_exact_for_small_sets_and_folds_as_it_lifts(values, cut):
    m = THETA
    assert m.result(folded(m, values)) == len({v for v in values if v is not None})
    parts = [folded(m, values[:cut]), folded(m, values[cut:])]
    assert m.merge_all(parts) == m.merge_all(m.lift(v) for v in values) == folded(m, values)


@LAWS
@given(st.lists(st.none() | floats, max_size=200), st.integers(0, 200))
def test_quantiles_merge_exactly_up_to_k_values(values, cut):
    m = KLL
    present = [v for v in values if v is not None]
    whole = m.merge_all([folded(m, values[:cut]), m.zero(), folded(m, values[cut:])])
    assert m.result(whole) == m.result(folded(m, values)) == exact_quantiles(present)
    assert m.result(m.merge_all(m.lift(v) for v in values)) == exact_quantiles(present)


def test_quantiles_stay_within_the_rank_error_past_k():
    values = [(i * 7919) % 100_003 for i in range(50_000)]
    parts = [folded(KLL, values[i::7]) for i in range(7)]
    answer = KLL.result(KLL.merge_all(parts), (0.01, 0.5, 0.9, 0.99))
    assert answer == QuantilesOf(tuple(values))
    assert KLL.result(KLL.zero()) is None and KLL.result(None) is None
