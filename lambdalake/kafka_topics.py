"""The Kafka topics of the bus, created with the partitions and configs they need.

- `<topic>`: the events, `settings.partitions` partitions, keyed by `event_id` (so a
  producer retry lands in the partition of its first copy). The broker stamps every record
  with its append time (`message.timestamp.type=LogAppendTime`).
- `<topic>.dlq`: records the speed layer could not read (not JSON, wrong schema), with the
  reason in a `reason` header.
- `<topic>.realtime`: compacted; the whole current value of every real-time cell, keyed by
  (source partition, cell), for the serving layer. Also the speed layer's cell state.
- `<topic>.speed-changelog`: compacted; the rest of the speed layer's state (dedup ids,
  arrival), written in the same Kafka transaction as the consumed offsets.

Arrival on Kafka: a record's arrival is the running maximum of the record timestamps of its
partition (the broker's append time), so it never decreases even if the broker's clock steps
back. Every reader of a partition computes it the same way; `arrival` is that rule.
"""

from __future__ import annotations

from typing import Any

from lambdalake.kafka_security import PLAINTEXT, KafkaSecurity, kafka_security
from lambdalake.settings import Settings

TOPIC_EXISTS = 36  # Kafka error code TOPIC_ALREADY_EXISTS
_COMPACTED = {
    "cleanup.policy": "compact",
    "segment.ms": str(3_600_000),
    "min.cleanable.dirty.ratio": "0.1",
}


def dlq_topic(topic: str) -> str:
    return f"{topic}.dlq"


def realtime_topic(topic: str) -> str:
    return f"{topic}.realtime"


def changelog_topic(topic: str) -> str:
    return f"{topic}.speed-changelog"


def arrival(previous: int, timestamp: int) -> int:
    """The arrival of a record: the running maximum of its partition's timestamps."""
    return timestamp if timestamp > previous else previous


def topic_specs(
    topic: str, partitions: int, replication: int = 1, min_insync: int = 1
) -> dict[str, dict[str, Any]]:
    """Every topic of the bus: name -> partitions, replicas and configs (for `create_topics`).
    With acks=all a record is acknowledged once `min_insync` replicas hold it."""
    durable = {"min.insync.replicas": str(min_insync)}
    configs = {
        topic: {"message.timestamp.type": "LogAppendTime"},
        dlq_topic(topic): {},
        realtime_topic(topic): dict(_COMPACTED),
        changelog_topic(topic): dict(_COMPACTED),
    }
    return {name: {"num_partitions": partitions, "replication_factor": replication,
                   "configs": durable | extra} for name, extra in configs.items()}


def ensure_topics(bootstrap: str, topic: str, partitions: int,
                  security: KafkaSecurity = PLAINTEXT, replication: int = 1,
                  min_insync: int = 1) -> None:
    """Create the bus's topics where missing (existing ones are left as they are)."""
    from kafka.admin import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="lambdalake-admin",
                             **security.kafka_python())
    try:
        result = admin.create_topics(
            topic_specs(topic, partitions, replication, min_insync), raise_errors=False,
            wait_for_metadata=True,
        )
    finally:
        admin.close()
    for created in result["topics"]:
        if created["error_code"] not in (0, TOPIC_EXISTS):
            raise RuntimeError(
                f"cannot create Kafka topic {created['name']} on {bootstrap}: "
                f"{created.get('error_message') or created['error_code']}"
            )


def ensure_bus_topics(settings: Settings) -> None:
    ensure_topics(settings.kafka_bootstrap, settings.topic, settings.partitions,
                  kafka_security(settings), settings.replication_factor,
                  settings.min_insync_replicas)


def retention_needed_ms(settings: Settings) -> int:
    """How far back the events topic must reach: to the cut of the oldest kept batch version
    (a rollback or a view rebuild replays from there), about `versions_kept` runs ago."""
    return (settings.versions_kept + 1) * settings.batch_interval_seconds * 1000


def retention_ms(bootstrap: str, topic: str, security: KafkaSecurity = PLAINTEXT) -> int:
    """The topic's `retention.ms` (-1: forever)."""
    from kafka.admin import ConfigResource, KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="lambdalake-admin",
                             **security.kafka_python())
    try:
        wanted = ConfigResource("TOPIC", topic, {"retention.ms": None})
        found = admin.describe_configs([wanted], config_filter="all")
    finally:
        admin.close()
    return int(found["topic"][topic]["retention.ms"]["value"])


def retention_shortfall(settings: Settings) -> str | None:
    """Why the events topic may delete records a rollback or rebuild needs (None: it won't)."""
    kept = retention_ms(settings.kafka_bootstrap, settings.topic, kafka_security(settings))
    needed = retention_needed_ms(settings)
    if 0 <= kept < needed:
        return (f"topic {settings.topic} keeps records {kept} ms (retention.ms), less than the "
                f"{needed} ms back to the oldest kept batch version ((versions_kept + 1) x "
                "batch_interval_seconds): a rollback or view rebuild may miss events")
    return None
