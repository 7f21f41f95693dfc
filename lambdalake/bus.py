"""The event bus seen by producers: publish validated events, durable when the call returns.

The embedded default appends to the embedded event log; Kafka is the bus past one machine.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Protocol

from lambdalake.eventlog import EventLog, Topic
from lambdalake.events import Event
from lambdalake.settings import Settings


class Bus(Protocol):
    def publish(self, events: list[Event]) -> None:
        """Return only once every event is durable on the bus."""


class EmbeddedBus:
    def __init__(self, topic: Topic):
        self.topic = topic

    def publish(self, events: list[Event]) -> None:
        by_partition: dict[int, list[bytes]] = {}
        for event in events:
            partition = self.topic.partition_for(event.event_id)
            by_partition.setdefault(partition, []).append(event.to_json())
        for partition, values in by_partition.items():
            self.topic.partitions[partition].append(values)


@lru_cache(maxsize=4)
def embedded_log(home: str) -> EventLog:
    """The process's one handle on the embedded log under `home`."""
    from pathlib import Path

    return EventLog(Path(home) / "log")


def events_topic(settings: Settings) -> Topic:
    return embedded_log(str(settings.home.resolve())).topic(settings.topic, settings.partitions)


def open_bus(settings: Settings) -> Bus:
    if settings.bus == "embedded":
        return EmbeddedBus(events_topic(settings))
    raise NotImplementedError(f"bus {settings.bus!r} is not available in this build")
