"""Answers recomputed independently of the sketches, for the tests to compare with."""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

from datasketches import kll_doubles_sketch

from lambdalake.monoids import DEFAULT_QUANTILES


def exact_quantiles(
    values: Sequence[float], ranks: Sequence[float] = DEFAULT_QUANTILES
) -> dict[str, float] | None:
    """Each rank's inclusive quantile: the smallest value with at least that fraction of the
    values at or below it (what a KLL sketch of at most k values answers exactly)."""
    ordered = sorted(values)
    n = len(ordered)
    return {str(q): float(ordered[max(math.ceil(q * n), 1) - 1]) for q in ranks} if n else None



@dataclass(frozen=True, eq=False)
class QuantilesOf:
    """Equal to a quantiles answer over `values` where each rank asked falls within KLL's
    documented normalized rank error (k 200) of its value's ranks (the fraction of values
    below it, and at or below it): a sketch that compacted answers so, not exactly."""

    values: tuple[float, ...]

    def __eq__(self, answer: object) -> bool:
        if not self.values or not isinstance(answer, dict):
            return answer is None and not self.values
        error = kll_doubles_sketch.get_normalized_rank_error(200, False)
        ordered, n = sorted(self.values), len(self.values)
        return all(
            bisect.bisect_left(ordered, value) / n - error
            <= float(rank)
            <= bisect.bisect_right(ordered, value) / n + error
            for rank, value in answer.items()
        )

    def __hash__(self) -> int:
        return hash(self.values)
