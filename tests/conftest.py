"""Shared test settings: hypothesis profiles, the S3-compatible server (moto), and which
tests may run beside others under pytest-xdist."""

from __future__ import annotations

import contextlib
import os
from pathlib import PurePosixPath

import pytest
from hypothesis import HealthCheck, settings
from xdist.remote import Producer
from xdist.scheduler import LoadScopeScheduling

from lambdalake.testing import free_port

# Properties here fsync, sketch and recompute: time per example varies, so no deadlines.
settings.register_profile(
    "lambdalake", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("lambdalake")

# Modules that time nothing and share no service with other tests: pure logic, and runs of
# Spark, pip or moto of their own. Under pytest-xdist (make test: `-n 2`) one worker runs
# them while the other runs every other test in turn, as a serial run would: a test that
# times the brokers and the flow never shares the machine with another such test.
BESIDE_SERVICES = frozenset({
    "test_auth", "test_batch", "test_batch_incremental", "test_batch_spark", "test_client",
    "test_compaction", "test_decimals", "test_emr_serverless", "test_erasure",
    "test_event_columns", "test_eventlog", "test_events", "test_functions", "test_fuzz",
    "test_id_index", "test_layout", "test_loops", "test_monoids", "test_packaging",
    "test_query", "test_realtime", "test_rebuild", "test_serving", "test_serving_feed",
    "test_sketches", "test_storage", "test_supervisor", "test_viewstate", "test_wheel",
})


class ServicesInTurn(LoadScopeScheduling):
    """xdist's per-module scheduling, with every service test in one scope of its own."""

    def _split_scope(self, nodeid: str) -> str:
        module = nodeid.split("::", 1)[0]
        return module if PurePosixPath(module).stem in BESIDE_SERVICES else "services"


def pytest_xdist_make_scheduler(config: pytest.Config, log: Producer) -> ServicesInTurn:
    return ServicesInTurn(config, log)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Under xdist, the worker running the modules beside the services runs at a lower
    priority, so the time the service tests measure is theirs: the CPU those modules use is
    what the services leave idle."""
    if "PYTEST_XDIST_WORKER" in os.environ:
        lowered = item.path.stem in BESIDE_SERVICES
        # A Linux priority is per thread; without /proc (macOS) nothing is lowered. Raising
        # it back needs root.
        with contextlib.suppress(OSError):
            for thread in os.listdir("/proc/self/task"):
                with contextlib.suppress(OSError):
                    os.setpriority(os.PRIO_PROCESS, int(thread), 10 if lowered else 0)


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
