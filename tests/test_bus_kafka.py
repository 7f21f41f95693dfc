"""The Kafka bus (librdkafka) on a real broker: each event lands on the partition the Java
client's partitioner (murmur2 of the key, as kafka-python computes it) gives its `event_id`,
so a retry sent by any Kafka client lands where its first copy did (dedup relies on it), and
every record is the event's own."""

from __future__ import annotations

import uuid

import pytest
from kafka.partitioner.default import murmur2

from lambdalake.bus import KafkaBus
from lambdalake.events import Event, decode
from lambdalake.kafka_topics import ensure_topics
from lambdalake.testing.kafka import KafkaBroker, read_topic

pytestmark = pytest.mark.kafka
PARTITIONS = 5


def test_events_land_on_the_java_clients_partition_of_their_id(
    kafka_broker: KafkaBroker,
) -> None:
    topic = f"bus-{uuid.uuid4().hex[:10]}"
    ensure_topics(kafka_broker.bootstrap, topic, PARTITIONS)
    events = [Event(f"id-{i}", "pageview", 1_700_000_000_000 + i, {"url": f"/{i}"})
              for i in range(60)]
    bus = KafkaBus(kafka_broker.bootstrap, topic)
    try:
        bus.publish(events[:30])
        bus.publish(events[30:])
    finally:
        bus.close()
    records = read_topic(kafka_broker.bootstrap, topic)
    assert {m.key().decode(): m.partition() for m in records} == {
        e.event_id: (murmur2(e.event_id.encode()) & 0x7FFFFFFF) % PARTITIONS for e in events
    }
    assert sorted((decode(m.value()) for m in records), key=lambda e: e.ts) == events


def test_events_the_full_queue_refused_are_sent_once_it_has_room(
    kafka_broker: KafkaBroker,
) -> None:
    """A request larger than the client's queue: what the queue refused is sent as it
    drains, each event once, before `publish` returns."""
    topic = f"bus-{uuid.uuid4().hex[:10]}"
    ensure_topics(kafka_broker.bootstrap, topic, PARTITIONS)
    events = [Event(f"id-{i}", "pageview", 1_700_000_000_000 + i, {"url": f"/{i}"})
              for i in range(50)]
    bus = KafkaBus(kafka_broker.bootstrap, topic, queue_messages=8)
    try:
        bus.publish(events)
        records = read_topic(kafka_broker.bootstrap, topic)
    finally:
        bus.close()
    assert sorted((decode(m.value()) for m in records), key=lambda e: e.ts) == events
