"""Limits per API key: a request rate (a token bucket) and statements running at once.

Pure: callers name the key (its label, or the client's address on an open API) and answer
429 with Retry-After when a limit refuses.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


class Limited(Exception):
    def __init__(self, rule: str, retry_after_s: float):
        super().__init__(rule)
        self.rule, self.retry_after_s = rule, retry_after_s

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}


class RateLimiter:
    """`rate` requests a second per key, in bursts of up to `burst`; rate 0: no limit."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self._lock = threading.Lock()

    def take(self, key: str) -> None:
        """Spend a token of `key`'s, or raise Limited saying when the next one comes."""
        if not self.rate:
            return
        now = time.monotonic()
        with self._lock:
            tokens, at = self._buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - at) * self.rate)
            if tokens < 1:
                self._buckets[key] = (tokens, now)
                raise Limited(f"more than {self.rate:g} requests a second (bursts of "
                              f"{self.burst})", (1 - tokens) / self.rate)
            self._buckets[key] = (tokens - 1, now)


class ConcurrencyLimiter:
    """At most `most` holders at once per key."""

    def __init__(self, most: int, what: str):
        self.most, self.what = most, what
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    @contextmanager
    def hold(self, key: str) -> Iterator[None]:
        with self._lock:
            if self._held.get(key, 0) >= self.most:
                raise Limited(f"more than {self.most} {self.what} at once for this key", 1.0)
            self._held[key] = self._held.get(key, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                self._held[key] -= 1
                if not self._held[key]:
                    del self._held[key]
