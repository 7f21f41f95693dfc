"""Per-function metrics, the ones CloudWatch keeps for AWS Lambda, as Prometheus metrics."""

from __future__ import annotations

import math

from prometheus_client import Counter, Histogram

_BY = ["function"]
INVOCATIONS = Counter("lambdalake_function_invocations_total", "Invocations run", _BY)
ERRORS = Counter("lambdalake_function_errors_total", "Invocations that raised or timed out", _BY)
THROTTLES = Counter(
    "lambdalake_function_throttles_total", "Invocations refused at the concurrency limit", _BY
)
DURATION = Histogram(
    "lambdalake_function_duration_seconds", "Invocation duration", _BY,
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60, 300, 900),
)
COLD_STARTS = Counter(
    "lambdalake_function_cold_starts_total", "Invocations that started a new environment", _BY
)
BILLED = Counter(
    "lambdalake_function_billed_gb_seconds_total",
    "Duration rounded up to 1 ms, times memory in GB", _BY,
)
ON_FAILURE = Counter(
    "lambdalake_function_on_failure_records_total",
    "Stream records sent to the on-failure destination after retries", _BY,
)


def billed_gb_seconds(seconds: float, memory_mb: int) -> float:
    return math.ceil(seconds * 1000) / 1000 * memory_mb / 1024


class FunctionMetrics:
    def __init__(self, function: str, memory_mb: int):
        self.function, self.memory_mb = function, memory_mb

    def invoked(self, seconds: float, cold: bool, failed: bool) -> None:
        INVOCATIONS.labels(self.function).inc()
        DURATION.labels(self.function).observe(seconds)
        BILLED.labels(self.function).inc(billed_gb_seconds(seconds, self.memory_mb))
        if cold:
            COLD_STARTS.labels(self.function).inc()
        if failed:
            ERRORS.labels(self.function).inc()

    def throttled(self) -> None:
        THROTTLES.labels(self.function).inc()

    def sent_on_failure(self, records: int) -> None:
        ON_FAILURE.labels(self.function).inc(records)
