"""A worker process kept running: restarted when it exits on its own, stopped on request.

A Kafka speed worker exits when it cannot go on exactly (its partitions lost to the group
after a long broker outage, a fenced transaction): it restarts from its last committed
transaction, so restarting it is the whole recovery. Restarts back off from 1 s to 30 s
while the worker keeps failing fast.
"""

from __future__ import annotations

import logging
import subprocess
import threading
import time

log = logging.getLogger("lambdalake.stack.supervisor")
FIRST_BACKOFF_S, MAX_BACKOFF_S = 1.0, 30.0
HEALTHY_AFTER_S = 60.0  # a run this long resets the back-off


class Supervised:
    def __init__(self, name: str, argv: list[str], env: dict[str, str]):
        self.name, self.argv, self.env = name, argv, env
        self.restarts = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._keep_running, name=name, daemon=True)

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    def start(self) -> Supervised:
        self._spawn()
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 60.0) -> None:
        """SIGTERM the worker (it finishes its transaction) and wait; SIGKILL past timeout."""
        self._stopping.set()
        with self._lock:
            process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._thread.join(timeout_s)

    def _spawn(self) -> None:
        with self._lock:
            if not self._stopping.is_set():
                # the worker reads end of file on stdin once this process is gone
                self._process = subprocess.Popen(self.argv, env=self.env, stdin=subprocess.PIPE)

    def _keep_running(self) -> None:
        backoff = FIRST_BACKOFF_S
        while not self._stopping.is_set():
            started = time.monotonic()
            code = self._process.wait() if self._process is not None else 0
            if self._stopping.is_set():
                return
            if time.monotonic() - started >= HEALTHY_AFTER_S:
                backoff = FIRST_BACKOFF_S
            log.warning("worker exited; restarting it",
                        extra={"worker": self.name, "exit_code": code, "in_s": backoff})
            if self._stopping.wait(backoff):
                return
            self.restarts += 1
            self._spawn()
            backoff = min(backoff * 2, MAX_BACKOFF_S)
