"""Per-function metrics, the ones CloudWatch keeps for AWS Lambda and the bill counts, as
Prometheus metrics (`metering.py` does the billing arithmetic and reads them back)."""

from __future__ import annotations

import threading

from prometheus_client import Counter, Gauge, Histogram

from lambdalake.functions.runtime.metering import billed_ms, gb_seconds

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
BILLED_DURATION = Counter(
    "lambdalake_function_billed_duration_seconds_total",
    "Billed duration: init (cold starts) plus duration, each invocation rounded up to 1 ms", _BY,
)
BILLED = Counter(
    "lambdalake_function_billed_gb_seconds_total", "Billed duration times memory in GB", _BY,
)
COLD_STARTS = Counter(
    "lambdalake_function_cold_starts_total", "Invocations that started a new environment", _BY
)
INIT_DURATION = Histogram(
    "lambdalake_function_init_duration_seconds",
    "A new environment's init: loading the handler's module", _BY,
    buckets=(0.001, 0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10),
)
CONCURRENT = Gauge(
    "lambdalake_function_concurrent_executions", "Invocations running now", _BY
)
CONCURRENT_MAX = Gauge(
    "lambdalake_function_concurrent_executions_max", "Most invocations running at once", _BY
)
VERSIONS = Counter(
    "lambdalake_function_version_invocations_total",
    "Invocations by the version that ran them ($LATEST: never deployed)", ["function", "version"],
)
MEMORY = Gauge("lambdalake_function_memory_mb", "The function's memory, MB", _BY)
ON_FAILURE = Counter(
    "lambdalake_function_on_failure_records_total",
    "Stream records sent to the on-failure destination after retries", _BY,
)


def billed_gb_seconds(seconds: float, memory_mb: int) -> float:
    return gb_seconds(billed_ms(seconds * 1000), memory_mb)


class FunctionMetrics:
    def __init__(self, function: str, memory_mb: int):
        self.function, self.memory_mb = function, memory_mb
        self._lock = threading.Lock()
        self._running = self._most = 0
        MEMORY.labels(function).set(memory_mb)

    def started(self) -> None:
        with self._lock:
            self._running += 1
            self._most = max(self._most, self._running)
            CONCURRENT.labels(self.function).set(self._running)
            CONCURRENT_MAX.labels(self.function).set(self._most)

    def invoked(self, seconds: float, cold: bool, failed: bool, init_s: float = 0.0) -> None:
        with self._lock:
            self._running -= 1
            CONCURRENT.labels(self.function).set(self._running)
        billed = billed_ms((init_s + seconds) * 1000)
        INVOCATIONS.labels(self.function).inc()
        DURATION.labels(self.function).observe(seconds)
        BILLED_DURATION.labels(self.function).inc(billed / 1000)
        BILLED.labels(self.function).inc(gb_seconds(billed, self.memory_mb))
        if cold:
            COLD_STARTS.labels(self.function).inc()
            INIT_DURATION.labels(self.function).observe(init_s)
        if failed:
            ERRORS.labels(self.function).inc()

    def ran(self, version: str) -> None:
        VERSIONS.labels(self.function, version).inc()

    def throttled(self) -> None:
        THROTTLES.labels(self.function).inc()

    def sent_on_failure(self, records: int) -> None:
        ON_FAILURE.labels(self.function).inc(records)
