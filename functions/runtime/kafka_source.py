"""A Kafka topic as the stream mapping's source: the embedded log's partition interface
(`end`, `read`, `seal`, committed positions per group) over kafka-python.

Arrival is the running maximum of the partition's LogAppendTime timestamps, as every reader
of the bus computes it. `seal` gives the time every later record arrives at or after: the
broker stamps appends with its clock, so `now - clock_skew_ms` read before the end offset.
"""

from __future__ import annotations

from kafka import KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata

from lambdalake.eventlog import Record, now_ms
from lambdalake.kafka_security import PLAINTEXT, KafkaSecurity
from lambdalake.kafka_topics import arrival

POLL_TIMEOUT_MS = 500


class KafkaPartition:
    def __init__(self, bootstrap: str, topic: str, index: int, clock_skew_ms: int,
                 security: KafkaSecurity = PLAINTEXT):
        self.index, self.clock_skew_ms = index, clock_skew_ms
        self.tp = TopicPartition(topic, index)
        self.consumer = KafkaConsumer(
            bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
            auto_offset_reset="earliest", isolation_level="read_committed",
            **security.kafka_python(),
        )
        self.consumer.assign([self.tp])
        self._arrival = 0
        self._next: int | None = None

    @property
    def end(self) -> int:
        return self.consumer.end_offsets([self.tp])[self.tp]

    def read(self, offset: int, max_records: int) -> list[Record]:
        if self._next != offset:
            self.consumer.seek(self.tp, offset)
        polled = self.consumer.poll(timeout_ms=POLL_TIMEOUT_MS, max_records=max_records)
        records = []
        for message in polled.get(self.tp, []):
            self._arrival = arrival(self._arrival, message.timestamp)
            records.append(Record(self.index, message.offset, self._arrival, message.value))
        self._next = records[-1].offset + 1 if records else offset
        return records

    def seal(self) -> tuple[int, int]:
        t = now_ms() - self.clock_skew_ms
        return self.end, t

    def close(self) -> None:
        self.consumer.close()


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
        for consumer in [*self._groups.values(), *(p.consumer for p in self.partitions)]:
            consumer.close()
