"""Bulk-built HLL, Theta and KLL sketches: exactness, accuracy, monoid laws, agreement with
datasketches."""

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from batch_lakes import assert_same_quantiles
from datasketches import (
    hll_sketch,
    hll_union,
    kll_doubles_sketch,
    tgt_hll_type,
    theta_union,
    update_theta_sketch,
)
from exact import QuantilesOf, exact_quantiles

from lambdalake.monoids import Quantiles
from lambdalake.sketch_arrays import (
    build_kll_array,
    build_sketch_array,
    build_sketches,
    build_theta_array,
)
from lambdalake.sketches import empty, estimate, merge

RNG = np.random.default_rng(12)


def one_by_one(values) -> bytes:
    sketch = hll_sketch(12, tgt_hll_type.HLL_8)
    for value in values:
        if value is not None:
            sketch.update(value)
    return sketch.serialize_compact()


def sample(kind: str, n: int) -> list:
    if kind == "int":
        return RNG.integers(-(2**62), 2**62, n).tolist()
    if kind == "float":
        return (RNG.standard_normal(n) * 1e6).tolist()
    if kind == "str":  # lengths 1..80: every MurmurHash3 block and tail length
        return [f"{i}-" + "x" * int(RNG.integers(0, 76)) for i in range(n)]
    return [f"é漢🙂{i}" * int(RNG.integers(1, 6)) for i in range(n)]


@pytest.mark.parametrize("n", [0, 1, 7, 8, 24, 25, 100, 383, 384])
def test_exact_for_small_sets(n):
    values = [f"user-{i}" for i in range(n)] * 3
    (sketch,) = build_sketches(np.zeros(len(values), np.int64), values, num_groups=1)
    assert round(estimate(sketch)) == n


@pytest.mark.parametrize("kind", ["int", "str"])
def test_within_5_percent_on_100k(kind):
    values = sample(kind, 100_000)
    (sketch,) = build_sketches(np.zeros(len(values), np.int64), values)
    assert abs(estimate(sketch) - 100_000) < 5_000


def test_merge_is_a_commutative_monoid():
    sizes = [0, 3, 50, 300, 2_000, 50_000]
    values = np.concatenate([RNG.integers(0, 60_000, n) for n in sizes])
    groups = np.repeat(np.arange(len(sizes)), sizes)
    sketches = build_sketches(groups, values)
    same = estimate
    for a in sketches:
        assert same(merge([a, empty()])) == same(merge([empty(), a])) == same(a)
        for b in sketches:
            assert same(merge([a, b])) == same(merge([b, a]))
            for c in sketches[::2]:
                assert same(merge([merge([a, b]), c])) == same(merge([a, merge([b, c])]))
    assert same(merge(sketches)) == same(build_sketches(np.zeros(len(values)), values)[0])


@pytest.mark.parametrize("kind", ["int", "float", "str", "unicode"])
def test_agrees_with_one_by_one_updates(kind):
    sizes = [0, 1, 7, 8, 9, 100, 384, 385, 1_000, 20_000]
    per_group = [sample(kind, n) for n in sizes]
    per_group = [v + v[: len(v) // 3] for v in per_group]  # duplicates
    values = [v for vs in per_group for v in vs]
    groups = np.repeat(np.arange(len(sizes)), [len(v) for v in per_group])
    built = build_sketches(groups, values, num_groups=len(sizes) + 1)
    assert built[-1] == empty()
    for mine, vs in zip(built, per_group, strict=False):
        reference = one_by_one(vs)
        assert estimate(mine) == pytest.approx(estimate(reference), rel=1e-12)
        union = hll_union(12)  # same coupons: adding one to the other changes nothing
        union.update(hll_sketch.deserialize(mine))
        union.update(hll_sketch.deserialize(reference))
        both = union.get_result(tgt_hll_type.HLL_8).serialize_compact()
        assert estimate(both) == pytest.approx(estimate(reference), rel=1e-12)


def test_skips_nulls_and_empty_strings_and_takes_arrow_input():
    values = ["a", None, "", "b", "a", None, "c"]
    groups = np.array([0, 0, 0, 1, 1, 1, 1])
    expected = [one_by_one(["a", ""]), one_by_one(["b", "a", "c"])]
    for arr in (
        values,
        pa.array(values),
        pa.chunked_array([values[:3], values[3:]]),
        pc.dictionary_encode(pa.array(values)),
        pa.array(values, pa.string_view()),
    ):
        got = build_sketch_array(groups, arr)
        assert isinstance(got, pa.LargeBinaryArray)
        assert [estimate(s) for s in got.to_pylist()] == [estimate(s) for s in expected]
    for nothing in (pa.array([None, None], pa.string()), pa.array(["", None])):
        assert build_sketches(np.zeros(2, np.int64), nothing) == [empty()]
    ints = pa.array([1, None, 2, 2], pa.int32())  # int32 hashes as int64, as in Spark
    (sketch,) = build_sketches(np.zeros(4, np.int64), ints)
    assert estimate(sketch) == estimate(one_by_one([1, 2]))


# --- Theta and KLL, built in bulk ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["int", "float", "str", "unicode"])
@pytest.mark.parametrize("n", [0, 1, 2, 4096, 4097, 20_000])
def test_theta_in_bulk_is_the_union_of_a_one_by_one_sketch(kind, n):
    values = sample(kind, n) * 2 + [None] + ([""] if kind in ("str", "unicode") else [])
    (built,) = build_theta_array(np.zeros(len(values), np.int64), values, num_groups=1).to_pylist()
    sketch = update_theta_sketch(12)
    for value in values:
        if value is not None:
            sketch.update(value)
    union = theta_union(12)
    union.update(sketch)
    assert built == union.get_result().serialize()


@pytest.mark.parametrize("n", [0, 1, 2, 200, 201, 5_000, 300_000])
def test_kll_in_bulk_answers_within_the_rank_error(n):
    values = RNG.standard_normal(n) * 1e3
    groups = np.arange(n) % 3  # three groups, interleaved
    built = build_kll_array(groups, values, num_groups=4).to_pylist()
    assert kll_doubles_sketch.deserialize(built[3]).is_empty()
    for group in range(3):
        mine = values[groups == group]
        sketch = kll_doubles_sketch.deserialize(built[group])
        assert sketch.n == len(mine)
        if len(mine) == 0:
            continue
        assert (sketch.get_min_value(), sketch.get_max_value()) == (mine.min(), mine.max())
        ranks = (0.0, 0.01, 0.5, 0.9, 0.99, 1.0)
        answer = {str(q): sketch.get_quantile(q, inclusive=True) for q in ranks}
        if len(mine) <= 200:
            assert answer == exact_quantiles(mine.tolist(), ranks)
        assert answer == QuantilesOf(tuple(mine.tolist()))
        sketch.update(0.0)  # a sketch that still takes values and compacts as usual
        assert sketch.n == len(mine) + 1


def kll_of(values: np.ndarray) -> bytes:
    sketch = kll_doubles_sketch(200)
    for value in values:  # one by one: the order decides what a compaction keeps
        sketch.update(float(value))
    return sketch.serialize()


def test_engines_kll_sketches_of_the_same_values_compare_within_the_rank_error():
    values = RNG.standard_normal(5_000)
    left, right = kll_of(values), kll_of(RNG.permutation(values))
    metric = Quantiles()
    assert metric.result(left) != metric.result(right)  # past k, the order shows in answers
    assert_same_quantiles(metric, left, right, "same values")


def test_engines_kll_sketches_of_other_values_differ():
    values = np.arange(5_000.0)
    squeezed = values * values / values.max()  # same count, minimum and maximum; ranks moved
    with pytest.raises(AssertionError, match="beyond its error"):
        assert_same_quantiles(Quantiles(), kll_of(values), kll_of(squeezed), "other values")
