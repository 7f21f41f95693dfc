"""Metrics as commutative monoids: an identity, a lift from one value, an associative merge.

Every engine and every time slice produces partial accumulators that merge into the same
answer. Accumulators are plain Python values (and serialized HLL sketches), so they travel
between processes as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from datasketches import hll_sketch

from lambdalake import sketches

LG_K = sketches.LG_K


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

    def add(self, working: int, value: Any) -> int:
        return working + 1

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

    def add(self, working: Any, value: Any) -> Any:
        return working if value is None else working + value


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
        return sketches.empty(self.lg_k)

    def lift(self, value: Any) -> bytes:
        return self.freeze(self.add(self.thaw(self.zero()), value))

    def merge(self, left: bytes, right: bytes) -> bytes:
        return self.merge_all((left, right))

    def merge_all(self, accumulators: Any) -> bytes:
        return sketches.merge(accumulators, self.lg_k)

    def result(self, acc: bytes | None) -> int:
        return round(sketches.estimate(acc))

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
