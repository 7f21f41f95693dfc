"""What every event-source mapping of the local runtime shares: a poller (`lambdalake.polling`)
that calls `poll_once` until stopped, at once again while records come, after `idle_seconds`
when none did; an error outside the function is logged, counted and retried with backoff.
Stopped, it ends after the invocation under way (what was not delivered is delivered later)."""

from __future__ import annotations

from lambdalake.loops import Loops
from lambdalake.polling import Poller

MAX_BACKOFF_SECONDS = 30.0
_STUCK_AFTER_SECONDS = 900.0  # an invocation's own timeout is at most 900 s on AWS


class Polling(Poller):
    def __init__(self, name: str, loops: Loops | None, backoff_seconds: float = 0.5,
                 stuck_after_seconds: float = _STUCK_AFTER_SECONDS):
        super().__init__(name, loops, first_backoff_s=backoff_seconds,
                         max_backoff_s=MAX_BACKOFF_SECONDS, stuck_after_s=stuck_after_seconds)
