"""The supervisor keeps a worker process running: restarted when it exits, stopped on request."""

from __future__ import annotations

import os
import sys
import time

import pytest

from lambdalake.stack import supervisor
from lambdalake.stack.supervisor import Supervised


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supervisor, "FIRST_BACKOFF_S", 0.05)


def wait_until(condition, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_worker_that_exits_is_started_again_with_growing_pauses() -> None:
    worker = Supervised("fails", [sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ))
    started = time.monotonic()
    worker.start()
    wait_until(lambda: worker.restarts >= 3)
    worker.stop()
    # pauses of 0.05, 0.1, 0.2 s at least before the third restart
    assert time.monotonic() - started >= 0.35
    restarts = worker.restarts
    time.sleep(0.5)
    assert worker.restarts == restarts  # stopped means stopped


def test_stop_terminates_a_running_worker_and_it_stays_down() -> None:
    worker = Supervised("sleeps", [sys.executable, "-c", "import time; time.sleep(600)"],
                        dict(os.environ)).start()
    pid = worker.pid
    assert pid is not None
    worker.stop(timeout_s=10)
    assert worker.pid is None and worker.restarts == 0
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
