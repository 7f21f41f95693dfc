"""Shared test settings: hypothesis profiles and the S3-compatible server (moto)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings

from lambdalake.testing import free_port

# Properties here fsync, sketch and recompute: time per example varies, so no deadlines.
settings.register_profile(
    "lambdalake", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("lambdalake")


@pytest.fixture(scope="session")
def aws_credentials():
    """The session's AWS settings: moto's test credentials, never a real profile."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.delenv("AWS_SESSION_TOKEN", raising=False)
        env.delenv("AWS_PROFILE", raising=False)
        yield


@pytest.fixture(scope="session")
def s3_server(aws_credentials):
    """A real S3 API (moto's server) on 127.0.0.1; yields its endpoint URL. It serves
    Kinesis too, resharding as the service does (`lambdalake.testing.moto_kinesis`)."""
    from moto.server import ThreadedMotoServer

    from lambdalake.testing.moto_kinesis import as_on_kinesis

    as_on_kinesis()

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="session")
def kafka_broker():
    """One real Apache Kafka broker (KRaft) for the whole session."""
    from lambdalake.testing.kafka import KafkaBroker

    with KafkaBroker() as running:
        yield running
