"""A source polled in a loop (`lambdalake.loops`) until stopped: `poll_once` is called again
after `busy_seconds` when it read something (at once, by default), after `idle_seconds` when
it read nothing. What the loop does with a pass that raises (log, count, back off, retry) is
the loop's: a `Poller` only says what one pass is and when the next one comes.

    class TopicPoller(Poller):
        def poll_once(self) -> int:
            ...  # read and apply what came; the number of records read

    poller = TopicPoller("feed", loops, max_backoff_s=10.0)  # `Loop`'s own options
    poller.start()
"""

from __future__ import annotations

from lambdalake.loops import Loop, Loops


class Poller:
    busy_seconds = 0.0  # the wait after a pass that read something
    idle_seconds = 0.05  # after one that read nothing

    def __init__(self, name: str, loops: Loops | None, **loop_options: float):
        self.loop = Loop(name, self._step, **loop_options)
        if loops is not None:
            loops.add(self.loop)

    def start(self) -> None:
        self.loop.start()

    def stop(self) -> None:
        """Stop after the pass under way."""
        self.loop.stop()

    def _step(self) -> float:
        return self.busy_seconds if self.poll_once() else self.idle_seconds

    def poll_once(self) -> int:
        """One pass over the source; what it read (records, messages, files)."""
        raise NotImplementedError
