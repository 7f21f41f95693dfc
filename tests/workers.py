"""Worker processes a test starts, and their teardown:

    @pytest.fixture
    def spawn(broker: KafkaBroker) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
        with workers(worker_process) as start:  # killed before the broker it depends on
            yield start
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from lambdalake.settings import Settings

Start = Callable[..., subprocess.Popen[bytes]]


def worker_env(settings: Settings, fields: Iterable[str]) -> dict[str, str]:
    """This process's environment, with the named settings as a worker reads them."""
    wanted = set(fields)
    return {**os.environ, **{f"LAMBDALAKE_{k.upper()}": str(v)
                             for k, v in settings.model_dump().items() if k in wanted}}


@contextmanager
def workers(start: Start) -> Iterator[Start]:
    """`start`, keeping what it starts; any process still running at the end is killed."""
    started: list[subprocess.Popen[bytes]] = []

    def spawn(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        started.append(start(*args, **kwargs))
        return started[-1]

    try:
        yield spawn
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
                process.wait()
