"""Outages during steady traffic: the S3 server stopped for 30 s, the Kafka broker killed and
restarted. Ingestion answers 503 with Retry-After while it cannot store (never a 202 for what
it did not store), and everything catches up by itself; then the reconciliation."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from harness import FULL, Lake, Traffic, reconcile
from moto.server import ThreadedMotoServer

from lambdalake.testing import free_port
from lambdalake.testing.kafka import KafkaBroker

pytestmark = [pytest.mark.kafka, pytest.mark.long]
RATE = 2_000.0 if FULL else 400.0
S3_DOWN_S = 30.0
BROKER_DOWN_S = 30.0 if FULL else 25.0  # past the ingest publish budget (19 s)


class S3Server:
    """moto's S3 on a fixed port that can be stopped and started again; the objects live
    in this process, so they are there again after the restart."""

    def __init__(self) -> None:
        self.port = free_port()
        self.server: ThreadedMotoServer | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with pytest.MonkeyPatch.context() as env:
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            env.setenv(key, "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        server = S3Server()
        server.start()
        yield server
        server.stop()


@pytest.fixture(scope="module")
def broker() -> Iterator[KafkaBroker]:
    with KafkaBroker(heap="384m") as running:
        yield running


@pytest.fixture(scope="module")
def runs() -> list[Traffic]:
    return []


@pytest.fixture(scope="module")
def lake(broker: KafkaBroker, s3: S3Server, tmp_path_factory: pytest.TempPathFactory):
    lake = Lake(tmp_path_factory.mktemp("outage-lake"), broker.bootstrap, s3.endpoint)
    lake.start()
    yield lake
    lake.stop()


def test_the_s3_server_stopped_for_30_s(lake: Lake, s3: S3Server, runs: list[Traffic]) -> None:
    traffic = Traffic(lake, RATE, seed=61).start()
    runs.append(traffic)
    time.sleep(3)
    s3.stop()
    time.sleep(S3_DOWN_S)
    s3.start()
    back = time.monotonic()
    time.sleep(5)
    traffic.stop()
    reconcile(lake, runs, "S3 server stopped 30 s", back)


def test_the_broker_killed_and_restarted(lake: Lake, broker: KafkaBroker,
                                         runs: list[Traffic]) -> None:
    traffic = Traffic(lake, RATE, seed=62).start()
    runs.append(traffic)
    time.sleep(3)
    broker.kill()
    time.sleep(BROKER_DOWN_S)
    broker.restart()
    back = time.monotonic()
    time.sleep(10)
    traffic.stop()
    assert traffic.refused_503 > 0, "no request was refused while the broker was down"
    reconcile(lake, runs, "Kafka broker down, restarted", back, seconds=240)
