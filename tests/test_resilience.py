"""`lambdalake up` as a real process under a hostile client: a flood of half-sent connections
past its file limit, and kill -9 with a restart while answers are being read."""

from __future__ import annotations

import resource
import socket
import threading
import time
from contextlib import suppress
from pathlib import Path

import httpx
import pytest
from test_flow import Flow, batch_run, recompute, send

from lambdalake.eventlog import now_ms
from lambdalake.producer import ProduceStats
from lambdalake.synthetic import WebAnalyticsStream

FILE_LIMIT = 1024
HALF_SENT = [  # a partial request line, partial headers, a partial body
    b"POST /ev",
    b"POST /events HTTP/1.1\r\nhost: x\r\ncontent-type: applica",
    b"POST /events HTTP/1.1\r\nhost: x\r\ncontent-length: 5000\r\n\r\n{\"events\": [",
]


@pytest.fixture
def flow(tmp_path: Path):
    flow = Flow(tmp_path)
    yield flow
    flow.stop()


def lower_file_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FILE_LIMIT, FILE_LIMIT))


class Flood:
    """Waves of half-sent connections to some ports, held open until `release()`."""

    def __init__(self, ports: list[int], per_wave: int, waves: int, every_s: float):
        self.ports, self.per_wave, self.waves, self.every_s = ports, per_wave, waves, every_s
        self.sockets: list[socket.socket] = []
        self.opened = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Flood:
        self._thread.start()
        return self

    def _run(self) -> None:
        for _ in range(self.waves):
            wave = [self._connect(self.ports[i % len(self.ports)]) for i in range(self.per_wave)]
            time.sleep(self.every_s / 2)
            for i, sock in enumerate(wave):  # those connected by now send a part of a request
                with suppress(OSError):  # not connected yet, or closed by the server: held
                    sock.send(HALF_SENT[i % len(HALF_SENT)])
            time.sleep(self.every_s / 2)

    def _connect(self, port: int) -> socket.socket:
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        self.sockets.append(sock)
        self.opened += 1
        return sock

    def release(self) -> None:
        self._thread.join()
        for sock in self.sockets:
            sock.close()


def open_files(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def test_a_flood_of_half_sent_connections_past_the_file_limit_kills_no_loop(flow: Flow) -> None:
    """The server's file limit is 1,024; 6,000 half-sent connections go to the gateway and the
    API while a producer sends. Afterwards every loop is alive and every acknowledged event is
    counted exactly once, in real time and after a batch run."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the flood's own sockets
    flow.preexec_fn = lower_file_limit
    flow.env |= {"LAMBDALAKE_HTTP_READ_TIMEOUT_SECONDS": "2"}
    flow.start()
    assert flow.process is not None
    ports = [int(flow.env["LAMBDALAKE_GATEWAY_PORT"]), int(flow.env["LAMBDALAKE_API_PORT"])]
    stream = WebAnalyticsStream(seed=21)
    events = [stream.event(now_ms()) for _ in range(3_000)]
    stats = ProduceStats()
    producer = threading.Thread(target=send, args=(flow, events, stats))
    flood = Flood(ports, per_wave=750, waves=8, every_s=0.75).start()
    producer.start()
    most_files = 0
    while flood._thread.is_alive():
        most_files = max(most_files, open_files(flow.process.pid))
        time.sleep(0.1)
    flood.release()
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    producer.join(180)
    assert not producer.is_alive()
    print(f"flood: {flood.opened} connections; server files at most {most_files} "
          f"of {FILE_LIMIT}; producer retries {stats.retries}")
    assert most_files < FILE_LIMIT * 0.9

    health = httpx.get(f"{flow.api}/healthz", timeout=10)
    assert health.status_code == 200, health.text
    assert set(health.json()["loops"]) >= {"speed", "serving-batch-views", "batch-schedule",
                                          "mapping-Archive"}
    acknowledged = set(stats.acknowledged_ids)
    assert acknowledged == {e["event_id"] for e in events}
    pageviews, _ = recompute(events)
    assert flow.wait_for(dict(pageviews), "pageviews_by_url_hour", "url", "pageviews") == pageviews
    time.sleep(1.5)  # let the archiver pass a slice boundary
    answer = batch_run(flow)
    assert {r["url"]: r["pageviews"] for r in answer["rows"]} == pageviews
    dropped = [line for line in httpx.get(f"{flow.api}/metrics").text.splitlines()
               if line.startswith("lambdalake_http_connections_dropped_total")]
    print("\n".join(dropped))
    assert dropped


def total_pageviews(reply: httpx.Response) -> int:
    return sum(row["pageviews"] for row in reply.json()["rows"])


def test_no_answer_undercounts_while_the_real_time_state_is_restored(flow: Flow) -> None:
    """kill -9, restart, and ask from the moment the API listens: every answer is either
    503 with Retry-After, or counts every event acknowledged before the kill."""
    flow.start()
    stream = WebAnalyticsStream(seed=22)
    events = [stream.event(now_ms()) for _ in range(5_000)]
    send(flow, events, ProduceStats())
    flow.kill()  # at once: the last events are past the speed layer's last checkpoint
    expected = sum(recompute(events)[0].values())
    flow.spawn()
    answers: list[int | str] = []
    deadline = time.monotonic() + 60
    with httpx.Client(timeout=10) as client:
        while answers.count(expected) < 20:
            assert time.monotonic() < deadline, f"no full answer in time: {answers[-5:]}"
            try:
                reply = client.get(f"{flow.api}/views/pageviews_by_url_hour",
                                   params={"bucket": "total"})
            except httpx.TransportError:
                continue  # not listening yet
            if reply.status_code == 503:
                assert reply.headers["retry-after"] == "1"
                answers.append(reply.json()["errors"][0]["field"])
            else:
                assert reply.status_code == 200, reply.text
                answers.append(total_pageviews(reply))
    counted = [a for a in answers if isinstance(a, int)]
    print(f"answers after restart: {len(answers) - len(counted)} x 503 "
          f"({sorted(set(answers) - set(counted))}), then {len(counted)} x 200")
    assert set(counted) == {expected}
