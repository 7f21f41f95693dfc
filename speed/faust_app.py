"""The Faust speed driver: the kernel's view state in a faust-streaming agent, exactly once.

The agent takes events in micro-batches (`take_events`, gathered up to `BATCH` events or
`BACKLOG_FLUSH_S` while reading a backlog) and folds them into one `ViewState` per
partition (`speed.kafka_common.PartitionState`, shared with the Quix driver). Its state is
kept where the Quix driver keeps it: the compacted `<topic>.realtime` (the cells, which the
serving layer reads) and `<topic>.speed-changelog` (dedup ids, arrival, offset); dead
letters go to `<topic>.dlq`. A worker given partitions rebuilds their state from those
topics, read committed, before its agent sees a record of them. Not from Faust tables:
under exactly-once, Faust's table recovery takes each changelog partition's end from the
consumer's cached last stable offset, which is unknown for a partition the worker has not
fetched yet, so a worker taking over partitions in a rebalance recovered nothing of them.

Exactly once (`processing_guarantee="exactly_once"`): Faust keeps one transactional
producer per event partition. The driver sends a partition's writes into its transaction
as record batches, waits until the broker has them (aiokafka's commit does not: a record
still queued would land in the next transaction, torn from this one's offset), then
commits the partitions' transactions side by side, each with the offset after the last
record it folded. Faust's own offset tracking is off for the
event topic (`acks=False`): it commits from acknowledged offsets with gap bookkeeping that,
after a restart, can stall a partition's commits at one offset a batch. The state keeps its
own offset (written in the same transaction), and only the record at that offset is folded:
one delivered twice is passed over, and when Faust skips records (it can drop a few it had
fetched around a seek) the partition is rewound to the first one missing. A rebalance waits
for the batch in flight to be committed, then forgets the revoked partitions' state and
stops their producers (Faust keeps them), as the Quix driver commits before it gives
partitions up; a partition this worker keeps is rebuilt at its committed offset. A worker
dropped from the group meanwhile is fenced by the new owner's producer: nothing of it is
committed.

    python -m lambdalake.speed.faust_app      (settings from LAMBDALAKE_* variables)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import ssl
import time
from typing import Any, cast

import faust
import orjson
from aiokafka import TopicPartition
from aiokafka.errors import ProducerFenced
from faust.transport.consumer import TopicPartitionGroup
from mode.supervisors import CrashingSupervisor
from mode.types.signals import SignalHandlerT

from lambdalake import catalog
from lambdalake.event_columns import BatchDecoder
from lambdalake.eventlog import now_ms
from lambdalake.events import Validator
from lambdalake.kafka_security import KafkaSecurity, kafka_security
from lambdalake.kafka_topics import changelog_topic, dlq_topic, realtime_topic
from lambdalake.project import Project
from lambdalake.settings import Settings
from lambdalake.speed.kafka_common import PartitionState, Record, restore_partitions
from lambdalake.speed.worker import prepare
from lambdalake.storage import ObjectStore

log = logging.getLogger("lambdalake.speed.faust")
BATCH = 10_000
REWIND_AFTER_S = 1.0
BACKLOG_FLUSH_S = 0.5  # as the Quix driver's: a backlog's batches are gathered up to so long
SEND_BATCH_BYTES = 512 * 1024  # a record batch's size, below the broker's 1 MB a batch


def broker_credentials(security: KafkaSecurity) -> Any:
    """Faust's `broker_credentials` for the bus's Kafka security (None: plaintext)."""
    context = ssl.create_default_context(cafile=security.ca_file) if security.tls else None
    if security.sasl:
        return faust.SASLCredentials(username=security.username, password=security.password,
                                     mechanism=security.mechanism, ssl_context=context)
    return faust.SSLCredentials(context) if context else None


class FaustSpeed:
    def __init__(self, settings: Settings, project: Project, store: ObjectStore):
        self.settings, self.project, self.store = settings, project, store
        self.validator = Validator(project.schemas, settings.max_future_seconds * 1000)
        self.decoder = BatchDecoder(project.schemas, settings.max_future_seconds * 1000)
        self.flush_s = settings.flush_interval_ms / 1000
        self.app = faust.App(
            f"{settings.topic}.speed-faust",
            broker=f"kafka://{settings.kafka_bootstrap}",
            broker_credentials=broker_credentials(kafka_security(settings)),
            processing_guarantee="exactly_once",
            topic_partitions=settings.partitions,
            producer_max_batch_size=SEND_BATCH_BYTES,
            topic_allow_declare=False,  # the bus's topics are made by ensure_bus_topics
            topic_disable_leader=True,
            broker_session_timeout=10.0,  # a worker killed with -9 holds its partitions so long
            broker_heartbeat_interval=2.0,
            consumer_auto_offset_reset="earliest",
            web_enabled=False,
            agent_supervisor=CrashingSupervisor,  # a crash mid-batch must not leave it half folded
            datadir=str(settings.home / "faust"),
        )
        self.topics = {"cells": realtime_topic(settings.topic),
                       "state": changelog_topic(settings.topic),
                       "dead": dlq_topic(settings.topic)}
        self.parts: dict[int, PartitionState] = {}
        self.kept = catalog.KeptVersions(store, project)
        self.floor = 0  # the lowest cut of a kept batch version: slices below it are dropped
        self._rewound: dict[int, float] = {}  # partition -> when it was last rewound
        # held by a batch from its fold to its commit, and by a rebalance: a revoked
        # partition's batch is committed before it is given up, like the Quix driver's
        self._batch = asyncio.Lock()
        self._held: list[Any] = []  # events of a backlog, gathered into one batch
        self._held_since = 0.0
        events = self.app.topic(settings.topic, acks=False, key_serializer="raw",
                                value_serializer="raw")
        self.app.agent(events, name="speed")(self.process)
        self.app.timer(1.0)(self.follow_batch)
        # mode types a receiver as taking any arguments; Faust sends these (app, partitions)
        self.app.on_partitions_revoked.connect(cast(SignalHandlerT, self.revoked))
        self.app.on_partitions_assigned.connect(cast(SignalHandlerT, self.assigned))

    async def process(self, stream: Any) -> None:
        """Fold each `take_events` batch, or, while the consumer knows of records after it (a
        backlog, late already), gather batches up to `BATCH` events or `BACKLOG_FLUSH_S`:
        a batch's fold and transactions cost about as much for 200 events as for 2,000."""
        async for batch in stream.take_events(BATCH, within=self.flush_s):
            if not self._held:
                self._held_since = time.monotonic()
            self._held += batch
            if len(self._held) >= BATCH or self._held_long() or not self._behind(batch):
                await self._release()

    def _behind(self, batch: list[Any]) -> bool:
        last = {event.message.partition: event.message.offset for event in batch}
        return any(offset + 1 < self._end(partition) for partition, offset in last.items())

    def _end(self, partition: int) -> int:
        """The partition's end offset as of the consumer's last fetch (0: unknown)."""
        try:
            end = self.app.consumer.highwater(TopicPartition(self.settings.topic, partition))
        except AssertionError:  # aiokafka's: a partition given up in a rebalance meanwhile
            return 0
        return end or 0

    def _held_long(self) -> bool:
        return time.monotonic() - self._held_since >= BACKLOG_FLUSH_S

    async def _release(self) -> None:
        async with self._batch:
            batch, self._held = self._held, []
            if batch:
                await self._process(batch)

    async def _process(self, batch: list[Any]) -> None:
        started = now_ms()
        touched, sent = await self._fold(batch)
        for part in touched:
            if len(batch) < BATCH:
                part.caught_up_at = started
            sent += await self._write(part)
        await self._commit(touched, sent)

    async def _fold(self, batch: list[Any]) -> tuple[list[PartitionState], list[Any]]:
        """Fold a batch into its partitions' states, column-wise where it can (`take_all`);
        the partitions it touched, and the sends of its dead letters."""
        taken: dict[int, tuple[PartitionState, list[Any]]] = {}
        for event in batch:
            message = event.message
            part = self.parts.get(message.partition)
            if part is None:
                continue  # fetched before a rebalance gave its partition to another worker
            if part.next_offset is not None and message.offset != part.next_offset:
                if message.offset > part.next_offset:
                    await self._rewind(part, part.next_offset)
                continue  # a record folded already, or one after records Faust skipped
            taken.setdefault(message.partition, (part, []))[1].append(message)
            part.next_offset = message.offset + 1
        sent = []
        for part, messages in taken.values():
            values = [m.value for m in messages]
            stamps = [round(m.timestamp * 1000) for m in messages]
            for i, reason in part.take_all(values, stamps, self.decoder, self.validator):
                sent += await self._dead_letter(messages[i], reason)
        return [part for part, _ in taken.values()], sent

    async def _rewind(self, part: PartitionState, offset: int) -> None:
        """Read again from `offset`, the first record Faust skipped (it can drop some it had
        fetched when it seeks or rebalances). Records already queued behind the gap arrive
        next and are passed over, so a partition is rewound at most once a second."""
        now = time.monotonic()
        if now - self._rewound.get(part.partition, 0.0) < REWIND_AFTER_S:
            return
        self._rewound[part.partition] = now
        log.warning("records skipped by the consumer, reading them again",
                    extra={"partition": part.partition, "offset": offset})
        tp = TopicPartition(self.settings.topic, part.partition)
        await self.app.consumer.seek(tp, offset)

    async def _commit(self, parts: list[PartitionState], sent: list[Any]) -> None:
        """End each partition's transaction with the offset after its last folded record,
        once the broker has every record `sent` into it: aiokafka's commit does not wait for
        them, and one sent after it would land in the next transaction, torn from this one's
        offset."""
        await asyncio.gather(*sent)
        # one producer a partition: their round trips to the coordinator overlap
        await asyncio.gather(*(self._commit_one(part) for part in parts))

    async def _commit_one(self, part: PartitionState) -> None:
        assert part.next_offset is not None, "a partition is committed after a record is read"
        tp = TopicPartition(self.settings.topic, part.partition)
        offsets = {self._transaction_id(part.partition): {tp: part.next_offset}}
        try:
            await self.app.producer.commit_transactions(offsets, self.app.conf.id)
        except ProducerFenced:
            self._handed_over(part, tp)

    def _handed_over(self, part: PartitionState, tp: TopicPartition) -> None:
        """A rebalance gave the partition to another worker while its batch was in flight:
        that worker's transaction fenced this one, so none of the batch was committed."""
        if tp in self.app.consumer.assignment():
            raise RuntimeError(f"fenced on partition {part.partition}, which is still ours")
        self.parts.pop(part.partition, None)
        log.info("partition handed over mid-batch; its new owner reads the batch again",
                 extra={"partition": part.partition})

    async def _dead_letter(self, message: Any, reason: str) -> list[Any]:
        source = f"{self.settings.topic}/{message.partition}/{message.offset}"
        headers = [("reason", reason.encode()), ("source", source.encode())]
        key = orjson.dumps([message.partition, message.offset])
        return await self._send("dead", message.partition, [(key, message.value)], headers)

    async def _write(self, part: PartitionState) -> list[Any]:
        """Send what the partition's state changed into its transaction; the sends."""
        sent = await self._send("cells", part.partition, part.realtime_records())
        sent += await self._send("state", part.partition, part.changelog_records())
        part.flush_metrics()
        return sent

    async def _send(
        self, topic: str, partition: int, records: list[Record], headers: Any = None
    ) -> list[Any]:
        """Into the open transaction of the event partition, a record batch at a time: Faust's
        `send` costs a lock, a future and a metadata check a record, more than the fold of an
        event. The partition's transactional producer is taken from Faust's own (Faust has
        no public way to it; routed by topic, Faust would send a record of a topic its
        consumer does not read outside any transaction)."""
        producers = self.app.producer._transaction_producers  # type: ignore[attr-defined]
        producer = producers[self._transaction_id(partition)]
        name, sent, batch = self.topics[topic], [], producer.create_batch()
        for key, value in records:
            if batch.append(timestamp=None, key=key, value=value, headers=headers) is None:
                sent.append(await producer.send_batch(batch, name, partition=partition))
                batch = producer.create_batch()  # a batch takes its first record whatever its size
                batch.append(timestamp=None, key=key, value=value, headers=headers)
        if records:
            sent.append(await producer.send_batch(batch, name, partition=partition))
        return sent

    def _transaction_id(self, partition: int) -> str:
        group = self.app.assignor.group_for_topic(self.settings.topic)
        # Faust's transaction manager's format, not in its public type
        transactions = self.app.consumer.transactions
        return transactions.transactional_id_format.format(  # type: ignore[attr-defined]
            group_id=self.app.conf.id,
            tpg=TopicPartitionGroup(self.settings.topic, partition, group))

    async def follow_batch(self) -> None:
        try:
            floor = await asyncio.to_thread(self.kept.floor)
        except Exception:  # an unreachable store delays the drop; it never stops the layer
            log.warning("cannot read the batch catalog", exc_info=True)
            return
        self.floor = max(self.floor, floor)
        for part in self.parts.values():
            part.follow(self.floor)
        if self._held and self._held_long():  # no batch came after (Faust can drop records)
            await self._release()

    async def revoked(self, app: Any, revoked: Any, **_: Any) -> None:
        """Give revoked partitions up once the batch in flight is committed: forget their
        state and stop their transactional producers. Faust would keep a revoked
        partition's producer, fenced once its new owner starts one, and reuse it if the
        partition came back; a new one is started when it is assigned again."""
        async with self._batch:
            # a held event of a partition given up could be taken for its first record if
            # the partition came back with no state: its new owner reads it again
            gone = {tp.partition for tp in revoked if tp.topic == self.settings.topic}
            self._held = [event for event in self._held if event.message.partition not in gone]
            for tp in revoked:
                if tp.topic == self.settings.topic:
                    self.parts.pop(tp.partition, None)
                    await self.app.producer.stop_transaction(self._transaction_id(tp.partition))

    async def assigned(self, app: Any, assigned: Any, **_: Any) -> None:
        """Rebuild the state of the partitions given, before any of their records is read.
        Faust has by now begun their transactions, which aborts any a killed worker left
        open, so what is read is what the committed offsets were committed with."""
        async with self._batch:
            await self._assign(assigned)

    async def _assign(self, assigned: Any) -> None:
        numbers = sorted(tp.partition for tp in assigned if tp.topic == self.settings.topic)
        fresh = [n for n in numbers if n not in self.parts]
        # Blocks the loop on purpose: no record of these partitions may be folded meanwhile
        # (the consumer, and its heartbeats, run on Faust's consumer thread).
        restored = restore_partitions(self.settings, self.project, fresh, self.floor)
        self.parts.update(restored)
        # only after a view changed: an eager transaction in the middle of a rebalance, when
        # nothing changed, races the batch in flight
        await self._publish_restored(
            [p for p in restored.values() if p.next_offset is not None and p.redefined])
        log.info("partitions assigned, state restored", extra={"partitions": numbers})

    async def _publish_restored(self, parts: list[PartitionState]) -> None:
        """Commit what restoring changed (views rebuilt or dropped since the last transaction,
        and a heartbeat naming today's views), without waiting for a partition's next record."""
        sent = []
        for part in parts:
            sent += await self._write(part)
        await self._commit(parts, sent)


def main(argv: list[str] | None = None) -> None:
    from lambdalake.logs import setup_logging
    from lambdalake.project import load_project

    parser = argparse.ArgumentParser(
        prog="python -m lambdalake.speed.faust_app", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)  # --help
    setup_logging(everything=True)  # Faust's and aiokafka's logs too, one JSON object a line
    settings = Settings()
    store = prepare(settings)
    app = FaustSpeed(settings, load_project(settings.project), store).app
    try:
        faust.Worker(app, loglevel="INFO", override_logging=False).execute_from_commandline()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    logging.shutdown()
    os._exit(code)  # faust-streaming leaves its consumer thread running after a clean stop


if __name__ == "__main__":
    main()
