"""Long-running loops (`lambdalake.loops`): transient errors are retried with a capped backoff,
logged and counted; a dead or stuck loop fails /healthz; answers wait for the restore."""

from __future__ import annotations

import errno
import logging
import os
import resource
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from lambdalake.eventlog import EventLog
from lambdalake.events import Event, epoch_ms
from lambdalake.example import project
from lambdalake.loops import Loop, Loops
from lambdalake.realtime import RealtimeCells
from lambdalake.serving.server import ServerThread, build_server
from lambdalake.settings import Settings
from lambdalake.speed.embedded import EmbeddedSpeed
from lambdalake.storage import FileStore
from lambdalake.synthetic import WebAnalyticsStream
from lambdalake.tables import table_schema


def eventually(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


class Flaky:
    """A step that fails `failures` times with `error`, then succeeds; it notes when called."""

    def __init__(self, failures: int, error: Exception):
        self.failures, self.error = failures, error
        self.calls: list[float] = []

    def __call__(self) -> float:
        self.calls.append(time.monotonic())
        if len(self.calls) <= self.failures:
            raise self.error
        return 0.01


def test_a_step_raising_oserror_is_retried_with_a_capped_backoff(caplog) -> None:
    step = Flaky(6, OSError(errno.EMFILE, "Too many open files"))
    loop = Loop("flaky", step, first_backoff_s=0.02, max_backoff_s=0.08)
    with caplog.at_level(logging.WARNING, logger="lambdalake.loops"):
        loop.start()
        eventually(lambda: len(step.calls) > 10)
        loop.stop()
    waits = [b - a for a, b in zip(step.calls, step.calls[1:7], strict=False)]
    for wait, expected in zip(waits, [0.02, 0.04, 0.08, 0.08, 0.08, 0.08], strict=True):
        assert expected * 0.9 <= wait < expected + 0.05  # doubling, capped at max_backoff_s
    assert loop.errors == 6 and loop.consecutive_errors == 0
    assert loop.problem() is None
    logged = [r for r in caplog.records if getattr(r, "loop", None) == "flaky"]
    assert len(logged) == 6
    assert "Too many open files" in logged[0].error and logged[-1].retry_in_s == 0.08


class Fatal(BaseException):
    """Not an `Exception`: a loop does not retry it."""


def dying() -> float:
    raise Fatal("gone")


@contextmanager
def served(tmp_path: Path, loops: Loops, realtime: RealtimeCells) -> Iterator[httpx.Client]:
    settings = Settings(home=tmp_path)
    server = ServerThread(build_server(settings, project, FileStore(tmp_path / "lake"), realtime,
                                       port=0, poll_seconds=0.02, loops=loops)).start()
    try:
        with httpx.Client(base_url=server.url) as client:
            yield client
    finally:
        server.stop()


def restored_cells() -> RealtimeCells:
    cells = RealtimeCells(project)
    cells.restored.set()
    return cells


def test_a_dead_loop_and_a_stuck_loop_fail_healthz(tmp_path: Path) -> None:
    loops = Loops()
    release = threading.Event()

    def hanging() -> float:
        release.wait(30)
        return 0.01

    loops.add(Loop("healthy", Flaky(2, OSError("transient")), first_backoff_s=0.01)).start()
    with served(tmp_path, loops, restored_cells()) as api:
        eventually(lambda: api.get("/readyz").status_code == 200)
        reply = api.get("/healthz")
        assert reply.status_code == 200
        assert reply.json()["loops"] == {"healthy": "ok", "serving-batch-views": "ok"}

        loops.add(Loop("speed", dying)).start()
        loops.add(Loop("stuck", hanging, stuck_after_s=0.2)).start()
        eventually(lambda: len(api.get("/healthz").json()["errors"]) == 2)
        reply = api.get("/healthz")
        assert reply.status_code == 503
        problems = {e["field"]: e["error"] for e in reply.json()["errors"]}
        assert problems["loop speed"] == "dead: Fatal: gone"
        assert problems["loop stuck"].startswith("stuck: no heartbeat")
        metrics = api.get("/metrics").text
        assert 'lambdalake_loop_up{loop="speed"} 0.0' in metrics
        assert 'lambdalake_loop_up{loop="healthy"} 1.0' in metrics
        assert 'lambdalake_loop_errors_total{loop="healthy"} 2.0' in metrics
        assert api.get("/readyz").status_code == 503  # a dead loop is no ready replica either

        release.set()  # the stuck step returns: only the dead loop is left to report
        eventually(lambda: len(api.get("/healthz").json()["errors"]) == 1)
    for loop in loops:
        loop.stop(timeout_s=5)


def test_answers_wait_for_the_real_time_restore(tmp_path: Path) -> None:
    cells = RealtimeCells(project)
    with served(tmp_path, Loops(), cells) as api:
        eventually(lambda: api.get("/readyz").json()["errors"][0]["field"] == "realtime")
        for reply in (api.get("/readyz"), api.get("/views"),
                      api.get("/views/pageviews_by_url_hour"),
                      api.post("/sql", json={"sql": "SELECT 1"})):
            assert reply.status_code == 503 and reply.headers["retry-after"] == "1"
            assert reply.json()["errors"][0]["field"] == "realtime"
        assert api.get("/healthz").status_code == 200  # alive, just not ready
        assert api.get("/metrics").status_code == 200
        cells.restored.set()
        assert api.get("/readyz").status_code == 200
        assert api.get("/views/pageviews_by_url_hour").status_code == 200


@contextmanager
def no_new_files() -> Iterator[None]:
    """This process's file limit at what it holds now: the next open() fails with EMFILE."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowest_free = os.open(os.devnull, os.O_RDONLY)  # a new descriptor takes the lowest free
    os.close(lowest_free)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_embedded_speed_layer_outlives_too_many_open_files(tmp_path: Path) -> None:
    """A real EMFILE in the speed loop (reading the log, checkpointing) is retried: once
    files can be opened again, every event is counted, once, and the state is restored."""
    settings = Settings(home=tmp_path, slice_seconds=1, flush_interval_ms=20)
    log = EventLog(tmp_path / "log")
    topic = log.topic(settings.topic, settings.partitions)
    stream = WebAnalyticsStream(seed=3)
    events = [stream.event(time.time_ns() // 1_000_000) for _ in range(400)]
    for event in events[:200]:
        topic.partitions[topic.partition_for(event["event_id"])].append([_json(event)])
    cells, loops = RealtimeCells(project), Loops()
    speed = EmbeddedSpeed(settings, project, topic, FileStore(tmp_path / "lake"),
                          lambda updates, _at: cells.upsert(updates), checkpoint_seconds=0.05,
                          loops=loops, restored=cells.restored)
    speed.start()
    eventually(cells.restored.is_set)
    with no_new_files():
        for event in events[200:]:  # appends open no file; reading them does
            topic.partitions[topic.partition_for(event["event_id"])].append([_json(event)])
        eventually(lambda: speed.loop.errors >= 3)
        assert loops.problems() == {}
    unique = {e["event_id"]: e for e in events}.values()  # the stream has producer retries
    eventually(lambda: pageviews(cells) == sum(e["type"] == "pageview" for e in unique))
    eventually(lambda: speed.loop.consecutive_errors == 0)  # the step under way completes
    assert speed.loop.problem() is None
    speed.stop()
    log.close()


def _json(event: dict) -> bytes:
    fields = {k: v for k, v in event.items() if k not in ("event_id", "type", "ts")}
    return Event(event["event_id"], event["type"], epoch_ms(event["ts"]), fields).to_json()


def pageviews(cells: RealtimeCells) -> int:
    view = project.views["pageviews_by_url_hour"]
    table = cells.table(view, table_schema(project, view), 0)
    return sum(table.column("pageviews").to_pylist())
