"""What every event-source mapping of the local runtime shares: a poll loop (`lambdalake.loops`)
that calls `poll_once` until stopped, at once again while records come, after `idle_seconds`
when none did; an error outside the function is logged, counted and retried with backoff."""

from __future__ import annotations

from lambdalake.loops import Loop, Loops

MAX_BACKOFF_SECONDS = 30.0
_STUCK_AFTER_SECONDS = 900.0  # an invocation's own timeout is at most 900 s on AWS


class Polling:
    idle_seconds = 0.05

    def __init__(self, name: str, loops: Loops | None, backoff_seconds: float = 0.5,
                 stuck_after_seconds: float = _STUCK_AFTER_SECONDS):
        self.loop = Loop(name, self._step, first_backoff_s=backoff_seconds,
                         max_backoff_s=MAX_BACKOFF_SECONDS, stuck_after_s=stuck_after_seconds)
        if loops is not None:
            loops.add(self.loop)

    def start(self) -> None:
        self.loop.start()

    def stop(self) -> None:
        """Stop after the invocation under way (what was not delivered is delivered later)."""
        self.loop.stop()

    def _step(self) -> float:
        return 0.0 if self.poll_once() else self.idle_seconds

    def poll_once(self) -> int:
        """One pass over the source; the records (messages, files) delivered."""
        raise NotImplementedError
