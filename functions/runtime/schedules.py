"""Schedule events: EventBridge's `rate(...)` expressions, as the local runtime runs them.

A function with a `rate(N minute|minutes|hour|hours|day|days)` schedule is invoked with a
Scheduled Event once at start, then every N units. A failed invocation is logged; the next
one comes at its time (EventBridge retries, the next beat does the same work). `cron(...)`
schedules (the nightly batch) are not run here: `lambdalake up` runs the batch on its own
interval.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from lambdalake.events import iso
from lambdalake.functions.runtime.context import ACCOUNT, REGION
from lambdalake.functions.runtime.function import FunctionError, LocalFunction, Throttled
from lambdalake.functions.runtime.polling import Polling
from lambdalake.functions.runtime.template import Schedule
from lambdalake.loops import Loops

log = logging.getLogger("lambdalake.functions.schedules")
_RATE = re.compile(r"^rate\((\d+) (minute|minutes|hour|hours|day|days)\)$")
_UNIT_SECONDS = {"minute": 60, "hour": 3_600, "day": 86_400}


def rate_seconds(schedule: Schedule) -> float | None:
    """The period of a `rate(...)` expression; None for another (a `cron(...)`)."""
    match = _RATE.match(schedule.expression.strip())
    return int(match[1]) * _UNIT_SECONDS[match[2].rstrip("s")] if match else None


def scheduled_event(rule: str) -> dict[str, Any]:
    return {
        "id": str(uuid.uuid4()),
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": ACCOUNT,
        "time": iso(int(time.time()) * 1000),
        "region": REGION,
        "resources": [f"arn:aws:events:{REGION}:{ACCOUNT}:rule/{rule}"],
        "detail": {},
    }


class ScheduleMapping(Polling):
    def __init__(self, function: LocalFunction, period_seconds: float,
                 loops: Loops | None = None):
        self.function, self.period_seconds = function, period_seconds
        self.idle_seconds = min(1.0, period_seconds)
        self._due = time.monotonic()
        super().__init__(f"schedule-{function.name}", loops)

    def poll_once(self) -> int:
        """Invoke the function if its time has come; 1 if it was invoked."""
        now = time.monotonic()
        if now < self._due:
            return 0
        self._due = now + self.period_seconds
        try:
            self.function.invoke(scheduled_event(self.function.name))
        except (FunctionError, Throttled) as error:
            log.warning("scheduled invocation failed", extra={"function": self.function.name,
                                                              "error": str(error)})
        return 1
