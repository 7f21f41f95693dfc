"""Fixtures of the reliability suite: a lake (every process of a Kafka deployment) on the
session's broker and S3 server, shared by the crash and load cases, and the traffic runs it
has had."""

from __future__ import annotations

import shutil

import pytest
from harness import Lake, Traffic

from lambdalake.testing.moto_server import MotoServer


@pytest.fixture(scope="session")
def s3_server(aws_credentials, tmp_path_factory: pytest.TempPathFactory):
    """moto's server in a process of its own: a Spark run's thousands of object reads are
    not served under the GIL of the traffic threads and the reconciliations."""
    with MotoServer(tmp_path_factory.mktemp("moto")) as moto:
        yield moto.url


@pytest.fixture(scope="session")
def lake(kafka_broker, s3_server: str, tmp_path_factory: pytest.TempPathFactory):
    if not shutil.which("java"):
        pytest.skip("needs Java 17+ (Kafka)")
    lake = Lake(tmp_path_factory.mktemp("lake"), kafka_broker.bootstrap, s3_server)
    lake.start()
    yield lake
    lake.stop()


@pytest.fixture(scope="session")
def runs() -> list[Traffic]:
    """Every traffic run of the session's lake: each reconciliation covers them all (a
    module with a lake of its own overrides both)."""
    return []
