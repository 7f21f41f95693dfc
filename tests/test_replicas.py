"""Serving as stateless replicas: `lambdalake serve` processes beside `lambdalake up --bus
kafka`, each answering from the published batch views and the speed layer's real-time feed.
Answers are checked against a recompute from the events sent."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from test_flow import BIN, Flow, batch_run, recompute, send_synthetic

from lambdalake.testing import free_port

pytestmark = [pytest.mark.kafka,
              pytest.mark.skipif(not shutil.which("java"), reason="needs Java 17+")]


class Replica:
    """One `lambdalake serve` process, with the environment of `up`."""

    def __init__(self, flow: Flow, bootstrap: str):
        self.port = free_port()
        self.args = [BIN / "lambdalake", "serve", "--bootstrap", bootstrap,
                     "--port", str(self.port), "--pg-port", "0"]
        self.env, self.home = flow.env, flow.env["LAMBDALAKE_HOME"]
        self.api = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Replica:
        self.process = subprocess.Popen(self.args, env=self.env, cwd=self.home,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self

    def ready(self) -> Replica:
        assert self.process is not None
        wait_ready(self.api, self.process)
        return self

    def pageviews(self) -> tuple[dict[str, int], str | None]:
        reply = httpx.get(f"{self.api}/views/pageviews_by_url_hour",
                          params={"bucket": "total", "group_by": "url"}, timeout=30)
        reply.raise_for_status()
        answer = reply.json()
        return ({r["url"]: r["pageviews"] for r in answer["rows"]},
                answer["freshness"]["batch_version"])

    def wait_for(self, expected: dict[str, int], version: str | None = None) -> dict[str, int]:
        answer: dict[str, int] = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            answer, served = self.pageviews()
            if answer == expected and (version is None or served == version):
                return answer
            time.sleep(0.1)
        return answer

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()


def wait_ready(api: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert process.poll() is None, f"{process.args} exited"
        try:
            if httpx.get(f"{api}/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{process.args} did not become ready")


@pytest.fixture
def replicas(tmp_path: Path, kafka_broker) -> Iterator[tuple[Flow, list[Replica]]]:
    flow = Flow(tmp_path)
    flow.env |= {"LAMBDALAKE_TOPIC": f"replicas-{uuid.uuid4().hex[:10]}",
                 "LAMBDALAKE_SPEED_ENGINE": "quix"}
    started = [Replica(flow, kafka_broker.bootstrap) for _ in range(2)]
    try:
        flow.spawn("--bus", "kafka", "--bootstrap", kafka_broker.bootstrap)
        for replica in started:
            replica.start()
        assert flow.process is not None
        wait_ready(flow.api, flow.process)
        yield flow, [replica.ready() for replica in started]
    finally:
        for replica in started:
            replica.kill()  # stateless: nothing to lose
        flow.stop()


def test_replicas_answer_alike_and_one_killed_leaves_the_other_answering(replicas) -> None:
    flow, (first, second) = replicas
    document = httpx.get(flow.gateway.replace("/events", "/openapi.json")).json()
    assert "/events" in document["paths"]  # `up`'s gateway documents its route
    events = send_synthetic(flow, 600, seed=21)
    pageviews = dict(recompute(events)[0])
    assert first.wait_for(pageviews) == pageviews
    assert second.wait_for(pageviews) == pageviews
    time.sleep(1.5)  # let the archiver pass a slice boundary
    version = batch_run(flow)["freshness"]["batch_version"]
    first.kill()
    events += send_synthetic(flow, 400, seed=22)
    pageviews = dict(recompute(events)[0])
    assert second.wait_for(pageviews, version) == pageviews  # the batch version and the feed
    restarted = first.start().ready()  # rebuilt from the published views and the feed alone
    assert restarted.wait_for(pageviews, version) == pageviews
