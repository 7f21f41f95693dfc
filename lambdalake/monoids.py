"""Metric kinds: each one class stating its whole semantics, which every engine looks up.

A kind is a commutative monoid: an identity (`zero`), a lift from one value, an associative
merge (and `merge_all` for many at once). Beside it a kind states the Arrow type of its
accumulator column, its Python fold for the speed layer (`thaw`, `add`, `freeze`), its wire
encoding (`encode`, `decode`: JSON values) and its answer (`result`). Engines translate
kinds to their own expressions in one table each, keyed by `kind` (the DuckDB and Spark batch
engines, `lambdalake.query`'s merge SQL, serving's /sql columns); nothing else tells kinds
apart. Accumulators are plain Python values or serialized DataSketches sketches, so they
travel between processes and engines as they are.
"""

from __future__ import annotations

import base64
import decimal
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, ClassVar

import numpy as np
from datasketches import (
    compact_theta_sketch,
    hll_sketch,
    kll_doubles_sketch,
    theta_union,
    update_theta_sketch,
)

from lambdalake import sketches
from lambdalake.events import MAX_DECIMAL_DIGITS, DecimalType

LG_K = sketches.LG_K
DEFAULT_QUANTILES = (0.5, 0.9, 0.99)
# Decimal sums as DuckDB and Spark keep them (38 digits): exact, or an error, never rounded
# (the default context rounds past 28 digits).
_ARROW_SUMMED_DIGITS = MAX_DECIMAL_DIGITS - 10
_EXACT = decimal.Context(
    prec=MAX_DECIMAL_DIGITS, traps=[decimal.Inexact, decimal.Overflow, decimal.InvalidOperation]
)


@dataclass(frozen=True)
class Monoid:
    """A metric over one field of an event (no field for count)."""

    field: str | None = None
    kind: ClassVar[str]
    numeric: ClassVar[bool] = False  # needs an int, float or decimal field
    ordered: ClassVar[bool] = True  # its answers sort (a query may order by it)
    hashes: ClassVar[bool] = False  # hashes values (a sketch of distinct values): no decimals
    # Whether one accumulator answers as its own merge (`merge_all([a])`), so answers skip it
    lone_is_merged: ClassVar[bool] = False

    def zero(self) -> Any:
        raise NotImplementedError

    def lift(self, value: Any) -> Any:
        raise NotImplementedError

    def merge(self, left: Any, right: Any) -> Any:
        raise NotImplementedError

    def merge_all(self, accumulators: Iterable[Any]) -> Any:
        total = self.zero()
        for acc in accumulators:
            total = self.merge(total, acc)
        return total

    def result(self, acc: Any, quantiles: Sequence[float] = DEFAULT_QUANTILES) -> Any:
        """The answer a query gives (`quantiles`: the ranks a quantiles metric answers)."""
        return acc

    def arrow_type(self, field_type: str | None) -> str:
        """The accumulator column's Arrow type name, given the field's (None for count):
        an alias pyarrow knows, or `decimal128(p,s)` (`lambdalake.tables.arrow_type`)."""
        if field_type is None:
            raise ValueError(f"a {self.kind} metric reads a field")
        return field_type

    def add(self, working: Any, value: Any) -> Any:
        """Fold one raw value into a working accumulator (which may be mutated)."""
        return self.merge(working, self.lift(value))

    def add_many(self, working: Any, values: Sequence[Any]) -> Any:
        """Fold raw values into a working accumulator, in order: the same as `add` one by one."""
        for value in values:
            working = self.add(working, value)
        return working

    def column_aggregate(self, arrow_type: str) -> str | None:
        """An Arrow hash aggregate whose result for a group, folded in with `add`, leaves the
        accumulator `add_many` leaves over the group's values of this Arrow type; None:
        `add_many` folds the values themselves."""
        return None

    def thaw(self, acc: Any) -> Any:
        """A working accumulator from a transportable one."""
        return acc

    def freeze(self, working: Any) -> Any:
        """The transportable form of a working accumulator."""
        return working

    def encode(self, acc: Any) -> Any:
        """The accumulator as a JSON value."""
        return acc

    def decode(self, value: Any) -> Any:
        return value


@dataclass(frozen=True)
class Count(Monoid):
    kind: ClassVar[str] = "count"

    def zero(self) -> int:
        return 0

    def lift(self, value: Any) -> int:
        return 1

    def merge(self, left: int, right: int) -> int:
        return left + right

    def add(self, working: int, value: Any) -> int:
        return working + 1

    def add_many(self, working: int, values: Sequence[Any]) -> int:
        return working + len(values)

    def arrow_type(self, field_type: str | None) -> str:
        return "int64"


@dataclass(frozen=True)
class _Numeric(Monoid):
    """A metric over a numeric field. A decimal accumulator travels (checkpoints, the realtime
    topic) as its exact text, never through a binary float."""

    numeric: ClassVar[bool] = True

    def encode(self, acc: Any) -> Any:
        return str(acc) if isinstance(acc, Decimal) else acc

    def decode(self, value: Any) -> Any:
        return Decimal(value) if isinstance(value, str) else value


@dataclass(frozen=True)
class Sum(_Numeric):
    """An exact sum: of ints as int64, floats as float64, decimal(p,s) as decimal(38,s)."""

    kind: ClassVar[str] = "sum"

    def zero(self) -> int:
        return 0

    def lift(self, value: Any) -> Any:
        return 0 if value is None else value

    def merge(self, left: Any, right: Any) -> Any:
        if type(left) is Decimal or type(right) is Decimal:
            return _EXACT.add(left, right)
        return left + right

    def add(self, working: Any, value: Any) -> Any:
        return working if value is None else self.merge(working, value)

    def column_aggregate(self, arrow_type: str) -> str | None:
        """Decimals sum exactly in any order: Arrow's sum (as decimal(38,s)) cannot overflow
        for values of up to `_ARROW_SUMMED_DIGITS` digits in any batch of fewer than 10^10.
        Floats are not summed in Arrow: its order of additions is not `add`'s."""
        decimal = DecimalType.named(arrow_type.replace(" ", ""))
        return "sum" if decimal and decimal.precision <= _ARROW_SUMMED_DIGITS else None

    def arrow_type(self, field_type: str | None) -> str:
        field_type = super().arrow_type(field_type)
        decimal = DecimalType.named(field_type)
        return DecimalType(MAX_DECIMAL_DIGITS, decimal.scale).arrow_name if decimal else field_type


@dataclass(frozen=True)
class _Extremum(_Numeric):
    pick: ClassVar[Any]

    def zero(self) -> None:
        return None

    def lift(self, value: Any) -> Any:
        return value

    def merge(self, left: Any, right: Any) -> Any:
        if left is None:
            return right
        return left if right is None else type(self).pick(left, right)


@dataclass(frozen=True)
class Min(_Extremum):
    kind: ClassVar[str] = "min"
    pick: ClassVar[Any] = min


@dataclass(frozen=True)
class Max(_Extremum):
    kind: ClassVar[str] = "max"
    pick: ClassVar[Any] = max


@dataclass(frozen=True)
class _Sketch(Monoid):
    """A DataSketches sketch, serialized: binary in Arrow, base64 on the wire."""

    def lift(self, value: Any) -> bytes:
        return self.freeze(self.add(self.thaw(self.zero()), value))

    def merge(self, left: bytes, right: bytes) -> bytes:
        return self.merge_all((left, right))

    def arrow_type(self, field_type: str | None) -> str:
        return "binary"

    def encode(self, acc: bytes) -> str:
        return base64.b64encode(acc).decode()

    def decode(self, value: str) -> bytes:
        return base64.b64decode(value)


@dataclass(frozen=True)
class ApproxDistinct(_Sketch):
    """Distinct count as a DataSketches HLL sketch (lgK 12, HLL_8), serialized compact.

    Exact for small sets; standard error 1.6% beyond. The same bytes are read and written
    by Spark's `hll_sketch_agg`/`hll_union_agg` and the `datasketches` package.
    """

    kind: ClassVar[str] = "approx_distinct"
    hashes: ClassVar[bool] = True
    lone_is_merged: ClassVar[bool] = True  # a union keeps its coupons, which `estimate` reads
    lg_k: int = LG_K

    def zero(self) -> bytes:
        return sketches.empty(self.lg_k)

    def merge_all(self, accumulators: Iterable[bytes | None]) -> bytes:
        return sketches.merge(accumulators, self.lg_k)

    def result(self, acc: bytes | None, quantiles: Sequence[float] = ()) -> int:
        return round(sketches.estimate(acc))

    def add(self, working: hll_sketch, value: Any) -> hll_sketch:
        if value is not None:
            working.update(value)
        return working

    def add_many(self, working: hll_sketch, values: Sequence[Any]) -> hll_sketch:
        _update_distinct(working.update, values)
        return working

    def thaw(self, acc: bytes) -> hll_sketch:
        return hll_sketch.deserialize(acc)

    def freeze(self, working: hll_sketch) -> bytes:
        return working.serialize_compact()


@dataclass(frozen=True)
class Quantiles(_Sketch):
    """Quantiles of a numeric field as a DataSketches KLL doubles sketch (k 200: normalized
    rank error 1.65%), the format of Spark's `kll_sketch_agg_double`. Exact up to k values.

    Its answer is a mapping rank -> value for the ranks asked, e.g. {"0.5": 120.0, ...}, None
    when the field had no value.
    """

    kind: ClassVar[str] = "quantiles"
    numeric: ClassVar[bool] = True
    ordered: ClassVar[bool] = False
    k: int = sketches.KLL_K

    def zero(self) -> bytes:
        return kll_doubles_sketch(self.k).serialize()

    def merge_all(self, accumulators: Iterable[bytes | None]) -> bytes:
        total = kll_doubles_sketch(self.k)
        for acc in accumulators:
            if acc is not None:
                total.merge(kll_doubles_sketch.deserialize(bytes(acc)))
        return total.serialize()

    def result(
        self, acc: bytes | None, quantiles: Sequence[float] = DEFAULT_QUANTILES
    ) -> dict[str, float] | None:
        sketch = kll_doubles_sketch.deserialize(acc) if acc is not None else None
        if sketch is None or sketch.is_empty():
            return None
        return {str(rank): sketch.get_quantile(rank, inclusive=True) for rank in quantiles}

    def add(self, working: kll_doubles_sketch, value: Any) -> kll_doubles_sketch:
        if value is not None:
            working.update(float(value))
        return working

    def add_many(self, working: kll_doubles_sketch, values: Sequence[Any]) -> kll_doubles_sketch:
        floats = np.array([v for v in values if v is not None], np.float64)
        if len(floats):
            working.update(floats)
        return working

    def thaw(self, acc: bytes) -> kll_doubles_sketch:
        return kll_doubles_sketch.deserialize(acc)

    def freeze(self, working: kll_doubles_sketch) -> bytes:
        return working.serialize()


@dataclass
class _ThetaWorking:
    """A Theta sketch being folded: the sketch it started from and an update sketch of the
    values since (a compact sketch takes no updates)."""

    base: bytes
    fresh: update_theta_sketch


@dataclass(frozen=True)
class DistinctSet(_Sketch):
    """The distinct values of a field as a DataSketches Theta sketch (lgK 12: exact up to 4096
    values, 1.6% error beyond), the format of Spark's `theta_sketch_agg`. Sets union (the
    merge) and intersect (in /sql); the answer is the distinct count.

    Every accumulator is kept as a Theta union leaves it, which depends only on the values:
    the same bytes from every engine, partition and merge order.
    """

    kind: ClassVar[str] = "distinct_set"
    hashes: ClassVar[bool] = True
    lg_k: int = sketches.THETA_LG_K

    def zero(self) -> bytes:
        return update_theta_sketch(self.lg_k).compact().serialize()

    def merge_all(self, accumulators: Iterable[bytes | compact_theta_sketch | None]) -> bytes:
        union = theta_union(self.lg_k)
        for acc in accumulators:
            if acc is not None:
                union.update(_theta(acc))
        return union.get_result().serialize()

    def result(self, acc: bytes | None, quantiles: Sequence[float] = ()) -> int:
        return 0 if acc is None else round(compact_theta_sketch.deserialize(acc).get_estimate())

    def add(self, working: _ThetaWorking, value: Any) -> _ThetaWorking:
        if value is not None:
            working.fresh.update(value)
        return working

    def add_many(self, working: _ThetaWorking, values: Sequence[Any]) -> _ThetaWorking:
        _update_distinct(working.fresh.update, values)
        return working

    def thaw(self, acc: bytes) -> _ThetaWorking:
        return _ThetaWorking(acc, update_theta_sketch(self.lg_k))

    def freeze(self, working: _ThetaWorking) -> bytes:
        return self.merge_all((working.base, working.fresh.compact()))


def _update_distinct(update: Callable[[Any], None], values: Sequence[Any]) -> None:
    """A set sketch sees each distinct value once: a repeat changes nothing (and `add`, a
    call per value more, skips a null)."""
    for value in dict.fromkeys(values):
        if value is not None:
            update(value)


def _theta(acc: bytes | compact_theta_sketch) -> compact_theta_sketch:
    return acc if isinstance(acc, compact_theta_sketch) else compact_theta_sketch.deserialize(
        bytes(acc)
    )


def merge_all(monoid: Monoid, accumulators: Iterable[Any]) -> Any:
    return monoid.merge_all(accumulators)
