"""Long-running loops that survive transient errors, and the registry that health reads.

A `Loop` calls `step()` in a daemon thread until stopped; `step` returns the seconds to wait
before the next call. A step that raises an `Exception` (a full disk, too many open files, a
store or bus hiccup) is logged as JSON with the loop's name and error, counted, and tried
again after a capped exponential backoff, reset by the next step that succeeds. Anything
else that escapes a step (a `BaseException` that is no `Exception`) ends the loop: it is
dead, and `Loops.problems()` says so until the process is restarted by its supervisor.

Every step's start and end is a heartbeat, and so is `beat()`, which a step that waits on
purpose (a retried invocation) calls. A loop whose last heartbeat, taken inside a step, is
older than its `stuck_after_s` is stuck, which health reports as it reports a dead loop.
A loop waiting between steps is never stuck.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("lambdalake.loops")
Step = Callable[[], float]  # one pass; returns the seconds to wait before the next


class Loop:
    def __init__(
        self,
        name: str,
        step: Step,
        *,
        stuck_after_s: float = 60.0,
        first_backoff_s: float = 0.1,
        max_backoff_s: float = 30.0,
    ):
        self.name, self.step = name, step
        self.stuck_after_s = stuck_after_s
        self.first_backoff_s, self.max_backoff_s = first_backoff_s, max_backoff_s
        self.stopping = threading.Event()
        self.errors = 0  # steps that raised, since the start
        self.consecutive_errors = 0
        self.last_error: str | None = None
        self.death: str | None = None  # why the loop ended, if not on request
        self._in_step = False
        self._last_beat = time.monotonic()
        self._thread: threading.Thread | None = None

    def start(self, first_wait_s: float = 0.0) -> Loop:
        self._thread = threading.Thread(target=self._run, args=(first_wait_s,),
                                        name=self.name, daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float | None = None) -> None:
        self.stopping.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    def wait(self, seconds: float) -> bool:
        """Sleep up to `seconds` (a heartbeat before and after); True once stopping."""
        self.beat()
        stopping = self.stopping.wait(seconds)
        self.beat()
        return stopping

    def beat(self) -> None:
        self._last_beat = time.monotonic()

    def problem(self) -> str | None:
        """Why this loop is unhealthy (dead or stuck), or None."""
        if self.death is not None:
            return f"dead: {self.death}"
        if self._thread is not None and not self._thread.is_alive() and not self.stopping.is_set():
            return "dead: its thread ended"
        silent = self.seconds_since_beat()
        if self._in_step and silent > self.stuck_after_s:
            return f"stuck: no heartbeat for {silent:.0f} s (bound {self.stuck_after_s:.0f} s)"
        return None

    def seconds_since_beat(self) -> float:
        return time.monotonic() - self._last_beat

    def _run(self, first_wait_s: float) -> None:
        pause = first_wait_s
        while not self.wait(pause):
            try:
                pause = self._step_once()
            except BaseException as exc:  # not an Exception: nothing to retry
                self.death = f"{type(exc).__name__}: {exc}"
                log.critical("loop died", exc_info=exc, extra={"loop": self.name})
                return

    def _step_once(self) -> float:
        self._in_step = True
        self.beat()
        try:
            pause = self.step()
        except Exception as exc:
            if self.stopping.is_set():  # interrupted on the way out: nothing to report
                return 0.0
            return self._backoff(exc)
        finally:
            self._in_step = False
            self.beat()
        self.consecutive_errors = 0
        return pause

    def _backoff(self, exc: Exception) -> float:
        self.errors += 1
        self.consecutive_errors += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        pause = min(self.first_backoff_s * 2 ** (self.consecutive_errors - 1),
                    self.max_backoff_s)
        log.warning("loop step failed; retrying", exc_info=exc, extra={
            "loop": self.name, "error": self.last_error, "failures": self.consecutive_errors,
            "retry_in_s": round(pause, 3)})
        return pause


class Loops(Collector):
    """The loops of one process, by name; a Prometheus collector of their state."""

    def __init__(self) -> None:
        self._loops: dict[str, Loop] = {}

    def add(self, loop: Loop) -> Loop:
        self._loops[loop.name] = loop
        return loop

    def __iter__(self) -> Iterator[Loop]:
        return iter(list(self._loops.values()))

    def problems(self) -> dict[str, str]:
        """Each unhealthy loop's name and what is wrong with it."""
        found = {loop.name: loop.problem() for loop in self}
        return {name: problem for name, problem in found.items() if problem is not None}

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        up = GaugeMetricFamily("lambdalake_loop_up", "1 while a loop runs healthy (not dead, "
                               "not stuck)", labels=["loop"])
        errors = CounterMetricFamily("lambdalake_loop_errors", "Steps of a loop that raised "
                                     "and were retried", labels=["loop"])
        silent = GaugeMetricFamily("lambdalake_loop_seconds_since_heartbeat",
                                   "Since a loop last beat", labels=["loop"])
        for loop in self:
            up.add_metric([loop.name], 0.0 if loop.problem() else 1.0)
            errors.add_metric([loop.name], loop.errors)
            silent.add_metric([loop.name], loop.seconds_since_beat())
        yield from (up, errors, silent)
