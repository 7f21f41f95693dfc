"""Metrics as commutative monoids: an identity, a lift from one value, an associative merge.

Every engine and every time slice produces partial accumulators that merge into the same
answer. Accumulators are plain Python values (and serialized HLL sketches), so they travel
between processes as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from datasketches import hll_sketch, hll_union, tgt_hll_type

LG_K = 12
_FLAGS_BYTE, _OUT_OF_ORDER = 5, 0x10  # HLL preamble: "the HIP estimate is not valid"


@dataclass(frozen=True)
class Monoid:
    """A metric over one field of an event (no field for count)."""

    field: str | None = None
    kind: ClassVar[str]

    def zero(self) -> Any:
        raise NotImplementedError

    def lift(self, value: Any) -> Any:
        raise NotImplementedError

    def merge(self, left: Any, right: Any) -> Any:
        raise NotImplementedError

    def result(self, acc: Any) -> Any:
        return acc

    def add(self, working: Any, value: Any) -> Any:
        """Fold one raw value into a working accumulator (which may be mutated)."""
        return self.merge(working, self.lift(value))

    def thaw(self, acc: Any) -> Any:
        """A working accumulator from a transportable one."""
        return acc

    def freeze(self, working: Any) -> Any:
        """The transportable form of a working accumulator."""
        return working

    def sql_merge(self, column: str) -> str:
        """SQL aggregate that merges a column of accumulators (DuckDB and Spark SQL alike)."""
        return f"{self.kind}({column})"


@dataclass(frozen=True)
class Count(Monoid):
    kind: ClassVar[str] = "count"

    def zero(self) -> int:
        return 0

    def lift(self, value: Any) -> int:
        return 1

    def merge(self, left: int, right: int) -> int:
        return left + right

    def sql_merge(self, column: str) -> str:
        return f"sum({column})"


@dataclass(frozen=True)
class Sum(Monoid):
    kind: ClassVar[str] = "sum"

    def zero(self) -> int:
        return 0

    def lift(self, value: Any) -> Any:
        return 0 if value is None else value

    def merge(self, left: Any, right: Any) -> Any:
        return left + right


@dataclass(frozen=True)
class _Extremum(Monoid):
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
class ApproxDistinct(Monoid):
    """Distinct count as a DataSketches HLL sketch (lgK 12, HLL_8), serialized compact.

    Exact for small sets; standard error 1.6% beyond. The same bytes are read and written
    by Spark's `hll_sketch_agg`/`hll_union_agg` and the `datasketches` package.
    """

    kind: ClassVar[str] = "approx_distinct"
    lg_k: int = LG_K

    def zero(self) -> bytes:
        return hll_sketch(self.lg_k, tgt_hll_type.HLL_8).serialize_compact()

    def lift(self, value: Any) -> bytes:
        sketch = hll_sketch(self.lg_k, tgt_hll_type.HLL_8)
        if value is not None:
            sketch.update(value)
        return sketch.serialize_compact()

    def merge(self, left: bytes, right: bytes) -> bytes:
        return self.merge_all((left, right))

    def merge_all(self, sketches: Any) -> bytes:
        union = hll_union(self.lg_k)
        for sketch in sketches:
            if sketch is not None:
                union.update(hll_sketch.deserialize(sketch))
        return union.get_result(tgt_hll_type.HLL_8).serialize_compact()

    def result(self, acc: bytes | None) -> int:
        if acc is None:
            return 0
        # A sketch carries a HIP estimate that depends on the order its inputs were merged
        # in (unions of the same sketches in two orders differ by up to ~1%). Flagged out of
        # order, the estimate is a function of the registers alone: the same answer for every
        # merge order, engine, partition and slice. Exact in list/set mode (< 384 values).
        flagged = bytearray(acc)
        flagged[_FLAGS_BYTE] |= _OUT_OF_ORDER
        return round(hll_sketch.deserialize(bytes(flagged)).get_estimate())

    def add(self, working: hll_sketch, value: Any) -> hll_sketch:
        if value is not None:
            working.update(value)
        return working

    def thaw(self, acc: bytes) -> hll_sketch:
        return hll_sketch.deserialize(acc)

    def freeze(self, working: hll_sketch) -> bytes:
        return working.serialize_compact()

    def sql_merge(self, column: str) -> str:
        return f"list({column})"


def merge_all(monoid: Monoid, accumulators: Any) -> Any:
    if isinstance(monoid, ApproxDistinct):
        return monoid.merge_all(accumulators)
    total = monoid.zero()
    for acc in accumulators:
        total = monoid.merge(total, acc)
    return total
