"""A Kafka topic as the stream mapping's source: the embedded log's partition interface
(`end`, `read`, `seal`, committed positions per group). Each partition is read and its end
asked with librdkafka (confluent-kafka): kafka-python decodes every record in Python, which
made the archiver the largest holder of the interpreter the gateway and the API share with
it. The committed positions stay with kafka-python's group client.

A partition's reader is assigned once, when it is made, and its first read waits (boundedly)
until it fetches: an assign's first fetch has to find the leader and connect, which under
load outlasts a read's timeout. A read from another offset than the next one seeks.

Arrival is the running maximum of the partition's LogAppendTime timestamps, as every reader
of the bus computes it. `seal` gives the time every later record arrives at or after: the
broker stamps appends with its clock, so `now - clock_skew_ms` read before the end offset.
"""

from __future__ import annotations

import time

from confluent_kafka import OFFSET_END, Consumer, KafkaException
from confluent_kafka import TopicPartition as Offset
from kafka import KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata

from lambdalake.eventlog import Record, now_ms
from lambdalake.kafka_security import PLAINTEXT, KafkaSecurity
from lambdalake.kafka_topics import arrival

POLL_TIMEOUT_S = 0.5
READY_WITHIN_S = 30.0  # a new reader's wait for its first fetch
QUERY_TIMEOUT_S = 30.0  # asking the end offset


class KafkaPartition:
    def __init__(self, bootstrap: str, topic: str, index: int, clock_skew_ms: int,
                 security: KafkaSecurity = PLAINTEXT):
        self.index, self.clock_skew_ms = index, clock_skew_ms
        self.tp = TopicPartition(topic, index)
        self.reader = Consumer({
            "bootstrap.servers": bootstrap,
            "group.id": "lambdalake-archive-reader",  # assigned: never joins nor commits
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",  # past what the broker retains, as kafka-python
            "isolation.level": "read_committed",
            "fetch.wait.max.ms": 50,
            # what it fetches ahead, per partition (64 MB by default): above a batch's 6 MB
            "queued.max.messages.kbytes": 16 << 10,
            **security.librdkafka(),
        })
        self.reader.assign([Offset(topic, index, OFFSET_END)])
        self._arrival = 0
        self._next: int | None = None
        self._fetching = False

    def _wait_until_fetching(self) -> None:
        """Until a first fetch has answered (the leader found, connected): it brings the
        partition's end, cached."""
        deadline = time.monotonic() + READY_WITHIN_S
        while self._cached_end() < 0 and time.monotonic() < deadline:
            self.reader.consume(1, 0.05)  # what it takes is read again: the read seeks next
        self._fetching = True

    def _cached_end(self) -> int:
        _low, high = self.reader.get_watermark_offsets(Offset(self.tp.topic, self.index),
                                                       cached=True)
        return int(high)

    @property
    def end(self) -> int:
        """The last stable offset (read committed), asked of the leader."""
        _low, high = self.reader.get_watermark_offsets(
            Offset(self.tp.topic, self.index), QUERY_TIMEOUT_S, cached=False)
        return int(high)

    def read(self, offset: int, max_records: int) -> list[Record]:
        if not self._fetching:
            self._wait_until_fetching()
        if self._next != offset:
            self.reader.seek(Offset(self.tp.topic, self.index, offset))
        # Wakes at the first record, then takes what has come with it: a consume of many
        # waits its whole timeout for a full batch.
        messages = self.reader.consume(1, POLL_TIMEOUT_S)
        if messages and max_records > 1:
            messages += self.reader.consume(max_records - 1, 0)
        records = []
        for message in messages:
            if message.error() is not None:
                raise KafkaException(message.error())
            self._arrival = arrival(self._arrival, message.timestamp()[1])
            records.append(Record(self.index, message.offset(), self._arrival, message.value()))
        self._next = records[-1].offset + 1 if records else offset
        return records

    def seal(self) -> tuple[int, int]:
        t = now_ms() - self.clock_skew_ms
        return self.end, t

    def close(self) -> None:
        self.reader.close()


class KafkaTopic:
    def __init__(self, bootstrap: str, topic: str, clock_skew_ms: int = 1_000,
                 security: KafkaSecurity = PLAINTEXT):
        self.bootstrap, self.name, self.security = bootstrap, topic, security
        probe = KafkaConsumer(bootstrap_servers=bootstrap, **security.kafka_python())
        count = len(probe.partitions_for_topic(topic) or ())
        probe.close()
        if not count:
            raise RuntimeError(f"Kafka topic {topic} does not exist on {bootstrap}")
        self.partitions = [KafkaPartition(bootstrap, topic, i, clock_skew_ms, security)
                           for i in range(count)]
        self._groups: dict[str, KafkaConsumer] = {}

    def _group(self, group: str) -> KafkaConsumer:
        if group not in self._groups:
            self._groups[group] = KafkaConsumer(
                bootstrap_servers=self.bootstrap, group_id=group, enable_auto_commit=False,
                **self.security.kafka_python(),
            )
        return self._groups[group]

    def committed(self, group: str) -> dict[int, int]:
        consumer = self._group(group)
        return {p.index: consumer.committed(p.tp) or 0 for p in self.partitions}

    def commit(self, group: str, positions: dict[int, int]) -> None:
        offsets = {
            self.partitions[index].tp: OffsetAndMetadata(offset, "", -1)
            for index, offset in positions.items()
        }
        self._group(group).commit(offsets)

    def close(self) -> None:
        for consumer in self._groups.values():
            consumer.close()
        for partition in self.partitions:
            partition.close()
