"""Answers recomputed independently of the sketches, for the tests to compare with."""

from __future__ import annotations

import math
from collections.abc import Sequence

from lambdalake.monoids import DEFAULT_QUANTILES


def exact_quantiles(
    values: Sequence[float], ranks: Sequence[float] = DEFAULT_QUANTILES
) -> dict[str, float] | None:
    """Each rank's inclusive quantile: the smallest value with at least that fraction of the
    values at or below it (what a KLL sketch of at most k values answers exactly)."""
    ordered = sorted(values)
    n = len(ordered)
    return {str(q): float(ordered[max(math.ceil(q * n), 1) - 1]) for q in ranks} if n else None


def rank_of(values: Sequence[float], value: float) -> float:
    """The fraction of `values` at or below `value`."""
    return sum(v <= value for v in values) / len(values)
