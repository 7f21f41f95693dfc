"""SQL functions over the DataSketches sketches /sql shows: DuckDB has no DataSketches
extension here, so they are Python functions registered on the sandbox's connection."""

from __future__ import annotations

import duckdb
from datasketches import compact_theta_sketch, kll_doubles_sketch, theta_intersection

from lambdalake.monoids import DistinctSet, Quantiles

_THETA, _KLL = DistinctSet(), Quantiles()


def register_sketch_functions(connection: duckdb.DuckDBPyConnection) -> None:
    """SQL functions over the sketches /sql shows (DuckDB has no DataSketches extension)."""
    connection.create_function("theta_union", _THETA.merge_all, ["BLOB[]"], "BLOB")
    connection.create_function("theta_intersection", _theta_intersection, ["BLOB[]"], "BLOB")
    connection.create_function(
        "theta_estimate", lambda sketch: _THETA.result(sketch), ["BLOB"], "BIGINT")
    connection.create_function("kll_merge", _KLL.merge_all, ["BLOB[]"], "BLOB")
    connection.create_function("kll_quantile", _kll_quantile, ["BLOB", "DOUBLE"], "DOUBLE")


def _theta_intersection(sketches: list[bytes | None]) -> bytes:
    """The sketch of the values in every one of `sketches` (a null sketch: no values)."""
    intersection = theta_intersection()
    for sketch in sketches:
        intersection.update(compact_theta_sketch.deserialize(sketch or _THETA.zero()))
    return intersection.get_result().serialize() if sketches else _THETA.zero()


def _kll_quantile(sketch: bytes, rank: float) -> float | None:
    if not 0 <= rank <= 1:
        raise ValueError(f"kll_quantile: rank must be between 0 and 1, got {rank}")
    kll = kll_doubles_sketch.deserialize(sketch)
    return None if kll.is_empty() else kll.get_quantile(rank, inclusive=True)
