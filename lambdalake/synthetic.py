"""A realistic synthetic stream for the example project: skewed urls, a long tail of users,
late and out-of-order event times, and producer retries that resend an event id.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from typing import Any

SECTIONS = ("home", "blog", "docs", "shop", "about")
URLS = [f"/{section}/{n}" for section in SECTIONS for n in range(40)]
SKUS = [f"sku-{n:03d}" for n in range(50)]
REFERRERS = ["google.com", "news.ycombinator.com", "twitter.com", None, None]


class WebAnalyticsStream:
    """Pageviews and purchases; `late_share` of events are up to `max_late_ms` old."""

    def __init__(
        self,
        seed: int | None = None,
        users: int = 5_000,
        late_share: float = 0.05,
        max_late_ms: int = 2 * 3_600_000,
        duplicate_share: float = 0.01,
    ):
        self.rng = random.Random(seed)
        self.users, self.late_share, self.max_late_ms = users, late_share, max_late_ms
        self.duplicate_share = duplicate_share
        self._recent: list[dict[str, Any]] = []

    def _ts(self, now_ms: int) -> int:
        jitter = self.rng.randint(0, 5_000)  # out of order within seconds
        if self.rng.random() < self.late_share:
            jitter = self.rng.randint(0, self.max_late_ms)
        return now_ms - jitter

    def _user(self) -> str:
        return f"user-{int(self.rng.paretovariate(1.2)) % self.users}"

    def event(self, now_ms: int) -> dict[str, Any]:
        if self._recent and self.rng.random() < self.duplicate_share:
            return dict(self.rng.choice(self._recent))  # a producer retry: same event id
        base = {"event_id": str(uuid.UUID(int=self.rng.getrandbits(128))), "ts": self._ts(now_ms)}
        if self.rng.random() < 0.03:
            body = base | {
                "type": "purchase",
                "user_id": self._user(),
                "sku": SKUS[min(int(self.rng.expovariate(0.15)), len(SKUS) - 1)],
                "amount": f"{self.rng.uniform(2, 200):.2f}",
            }
        else:
            body = base | {
                "type": "pageview",
                "url": URLS[min(int(self.rng.paretovariate(1.0)) - 1, len(URLS) - 1)],
                "user_id": self._user(),
                "referrer": self.rng.choice(REFERRERS),
                "duration_ms": int(self.rng.expovariate(1 / 20_000)),
            }
        self._recent = (self._recent + [body])[-100:]
        return body

    def batches(self, size: int, now: Any) -> Iterator[list[dict[str, Any]]]:
        while True:
            moment = now()
            yield [self.event(moment) for _ in range(size)]
