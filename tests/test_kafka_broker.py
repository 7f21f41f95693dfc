"""The real Kafka broker (no Docker) starts and round-trips messages with kafka-python."""

from __future__ import annotations

import shutil
import time

import pytest

kafka = pytest.importorskip("kafka")

from kafka import KafkaConsumer, KafkaProducer  # noqa: E402
from kafka.admin import KafkaAdminClient, NewTopic  # noqa: E402

from lambdalake.testing.kafka import KafkaBroker  # noqa: E402

pytestmark = [
    pytest.mark.kafka,
    pytest.mark.skipif(not shutil.which("java"), reason="needs Java 17+"),
]


def test_broker_round_trips_100_messages() -> None:
    with KafkaBroker() as broker:
        admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
        admin.create_topics([NewTopic("events", num_partitions=3, replication_factor=1)])
        admin.close()

        producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
        futures = [
            producer.send("events", key=b"k%d" % (i % 7), value=b"m%d" % i) for i in range(100)
        ]
        producer.flush()
        partitions = {f.get(timeout=30).partition for f in futures}
        producer.close()
        assert len(partitions) > 1

        consumer = KafkaConsumer(
            "events",
            bootstrap_servers=broker.bootstrap,
            group_id="test",
            auto_offset_reset="earliest",
        )
        got: list[bytes] = []
        deadline = time.monotonic() + 60
        while len(got) < 100 and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=1000).values():
                got.extend(r.value for r in records)
        consumer.commit()
        consumer.close()

    assert sorted(got) == sorted(b"m%d" % i for i in range(100))
