"""The freshness bench's load senders (bench/speed.py): a request lost in transport or refused
is counted and sent again; the sender goes on (it used to die on a transport error, and the
load with it)."""

from __future__ import annotations

import http.server
import importlib.util
import multiprocessing
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import httpx
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "speed.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_speed", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Flaky(http.server.BaseHTTPRequestHandler):
    """Drops the first request's connection unanswered, refuses the second, takes the rest."""

    requests = 0

    def do_POST(self) -> None:
        type(self).requests += 1
        self.rfile.read(int(self.headers["content-length"]))
        if self.requests == 1:
            self.close_connection = True  # no status line: the client sees the connection end
            return
        status = 503 if self.requests == 2 else 202
        self.send_response(status)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def flaky_url() -> Iterator[str]:
    Flaky.requests = 0
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/events"
    finally:
        server.shutdown()
        server.server_close()


def test_a_lost_or_refused_request_is_counted_and_sent_again(
        bench: ModuleType, flaky_url: str) -> None:
    tally = bench.LoadTally(2)
    stop = multiprocessing.get_context("spawn").Event()
    with httpx.Client(timeout=10) as client:
        assert bench.send(client, flaky_url, b'{"events": []}', stop, tally, 1)
    assert (list(tally.lost), list(tally.refused)) == ([0, 1], [0, 1])
    assert Flaky.requests == 3


def test_a_stopped_load_sends_nothing_more(bench: ModuleType, flaky_url: str) -> None:
    tally = bench.LoadTally(1)
    stop = multiprocessing.get_context("spawn").Event()
    stop.set()
    with httpx.Client(timeout=10) as client:
        assert not bench.send(client, flaky_url, b'{"events": []}', stop, tally, 0)
    assert Flaky.requests == 0
