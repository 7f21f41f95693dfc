"""Metering as AWS Lambda bills it: the arithmetic, apart from where the numbers come from.

An invocation is billed its duration rounded up to the next millisecond, times the
function's memory: GB-seconds (`memory_mb / 1024 * billed_ms / 1000`). A cold start's init
phase is billed with it (as AWS bills the init of functions on managed runtimes since August
2025). Every invocation that ran is a request, an error too; a throttled one is not.
`Usage.from_prometheus` reads a function's totals back from the metrics of `metrics.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

# AWS's x86 list prices in us-east-1 (the first tier); settings may name others
PRICE_PER_GB_SECOND = 0.0000166667
PRICE_PER_MILLION_REQUESTS = 0.20


def billed_ms(duration_ms: float) -> int:
    """The billed duration of `duration_ms`: rounded up to 1 ms (at least 1 ms)."""
    return max(1, math.ceil(round(duration_ms, 6)))  # 1.0000000001 ms of float noise is 1 ms


def gb_seconds(billed: int, memory_mb: int) -> float:
    return memory_mb / 1024 * billed / 1000


@dataclass(frozen=True)
class Prices:
    per_gb_second: float = PRICE_PER_GB_SECOND
    per_million_requests: float = PRICE_PER_MILLION_REQUESTS


@dataclass(frozen=True)
class Usage:
    """One function's totals, as the bill and CloudWatch count them."""

    function: str
    memory_mb: int = 128
    invocations: int = 0
    errors: int = 0
    throttles: int = 0
    duration_s: float = 0.0
    billed_duration_s: float = 0.0
    gb_seconds: float = 0.0
    cold_starts: int = 0
    init_duration_s: float = 0.0
    concurrent_max: int = 0

    def cost(self, prices: Prices) -> float:
        return (self.invocations / 1e6 * prices.per_million_requests
                + self.gb_seconds * prices.per_gb_second)

    @classmethod
    def from_prometheus(cls, text: str) -> dict[str, Usage]:
        """Each function's usage, from the exposition of the `lambdalake_function_*` metrics."""
        found: dict[str, dict[str, float]] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                name = sample.name.removeprefix("lambdalake_function_")
                if name in _FIELDS and "function" in sample.labels:
                    found.setdefault(sample.labels["function"], {})[name] = sample.value
        return {function: _usage(function, values) for function, values in sorted(found.items())}


# metric sample (less its prefix) -> Usage field
_FIELDS = {
    "memory_mb": "memory_mb", "invocations_total": "invocations", "errors_total": "errors",
    "throttles_total": "throttles", "duration_seconds_sum": "duration_s",
    "billed_duration_seconds_total": "billed_duration_s",
    "billed_gb_seconds_total": "gb_seconds", "cold_starts_total": "cold_starts",
    "init_duration_seconds_sum": "init_duration_s",
    "concurrent_executions_max": "concurrent_max",
}
_COUNTS = {"memory_mb", "invocations", "errors", "throttles", "cold_starts", "concurrent_max"}


def _usage(function: str, values: dict[str, float]) -> Usage:
    fields: dict[str, Any] = {}
    for name, value in values.items():
        field = _FIELDS[name]
        fields[field] = round(value) if field in _COUNTS else value
    return Usage(function, **fields)
