"""The Faust speed driver: the kernel's view state in a faust-streaming agent, exactly once.

The agent takes events in micro-batches (`take_events`) and folds them into one `ViewState`
per partition (`speed.kafka_common.PartitionState`, shared with the Quix driver). Its state
is kept in three Faust tables whose changelogs are the bus's compacted topics: `cells`
(`<topic>.realtime`, which the serving layer reads), `state` (`<topic>.speed-changelog`:
dedup ids, arrival) and `dead` (`<topic>.dlq`, keyed by source position). Faust recovers
the tables of the partitions a worker is given before its agent runs; the view state is
rebuilt from them.

Exactly once (`processing_guarantee="exactly_once"`): Faust keeps one transactional producer
per partition and commits each partition's offsets in its transaction. The driver sends its
table writes into that transaction (`Topic.send`, not the buffered `send_soon`, which Faust
does not flush before a commit), waits until the broker has them (aiokafka may otherwise end
the transaction before they are sent), then acknowledges the batch and commits. Faust's own timed
and counted commits are switched off: one of them landing while a batch is half written
would commit part of its state with none of its offsets, and a restart would count that
part twice. Faust still commits on a rebalance, after waiting for the batch in flight.

    python -m speed.faust_app worker     (settings from LAMBDALAKE_* variables)
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import faust
import orjson

from lambdalake import catalog
from lambdalake.eventlog import now_ms
from lambdalake.events import Validator
from lambdalake.kafka_topics import changelog_topic, dlq_topic, realtime_topic
from lambdalake.project import Project
from lambdalake.settings import Settings
from lambdalake.storage import ObjectStore
from speed.kafka_common import PartitionState, Record

log = logging.getLogger("lambdalake.speed.faust")
BATCH = 10_000
RAW = {"key_serializer": "raw", "value_serializer": "raw"}
COMMIT_NEVER = 10**9


class FaustSpeed:
    def __init__(self, settings: Settings, project: Project, store: ObjectStore):
        self.settings, self.project, self.store = settings, project, store
        self.validator = Validator(project.schemas, settings.max_future_seconds * 1000)
        self.flush_s = settings.flush_interval_ms / 1000
        self.app = faust.App(
            f"{settings.topic}.speed-faust",
            broker=f"kafka://{settings.kafka_bootstrap}",
            store="memory://",
            processing_guarantee="exactly_once",
            topic_partitions=settings.partitions,
            topic_allow_declare=False,  # the bus's topics are made by ensure_bus_topics
            topic_disable_leader=True,
            broker_commit_interval=COMMIT_NEVER,  # the agent commits after each batch
            broker_commit_every=COMMIT_NEVER,
            broker_session_timeout=10.0,  # a worker killed with -9 holds its partitions so long
            broker_heartbeat_interval=2.0,
            consumer_auto_offset_reset="earliest",
            web_enabled=False,
            datadir=str(settings.home / "faust"),
        )
        self.tables = {
            name: self.app.Table(
                name,
                partitions=settings.partitions,
                changelog_topic=self.app.topic(topic, partitions=settings.partitions, **RAW),
                key_type=bytes,
                value_type=bytes,
            )
            for name, topic in (
                ("cells", realtime_topic(settings.topic)),
                ("state", changelog_topic(settings.topic)),
                ("dead", dlq_topic(settings.topic)),
            )
        }
        self.parts: dict[int, PartitionState] = {}
        self.cut = 0
        self._sent: list[Any] = []  # the current batch's sends, awaited before its commit
        events = self.app.topic(settings.topic, **RAW)
        self.app.agent(events, name="speed")(self.process)
        self.app.timer(1.0)(self.follow_batch)
        self.app.on_partitions_revoked.connect(self.revoked)

    async def process(self, stream: Any) -> None:
        async for batch in stream.take_events(BATCH, within=self.flush_s):
            started, self._sent = now_ms(), []
            for part in await self._fold(batch):
                if len(batch) < BATCH:
                    part.caught_up_at = started
                await self._write(part)
            await asyncio.gather(*self._sent)
            for event in batch:
                await stream.ack(event)
            await self.app.consumer.commit()

    async def _fold(self, batch: list[Any]) -> list[PartitionState]:
        """Fold a batch into its partitions' states; the partitions it touched."""
        touched = {}
        for event in batch:
            message = event.message
            touched[message.partition] = part = self._part(message.partition)
            reason = part.take(message.value, round(message.timestamp * 1000), self.validator)
            if reason is not None:
                await self._dead_letter(message, reason)
            part.next_offset = message.offset + 1
        return list(touched.values())

    async def _dead_letter(self, message: Any, reason: str) -> None:
        source = f"{self.settings.topic}/{message.partition}/{message.offset}"
        headers = [("reason", reason.encode()), ("source", source.encode())]
        key = orjson.dumps([message.partition, message.offset])
        await self._send("dead", message.partition, [(key, message.value)], headers)

    async def _write(self, part: PartitionState) -> None:
        await self._send("cells", part.partition, part.realtime_records())
        await self._send("state", part.partition, part.changelog_records())
        part.flush_metrics()

    async def _send(
        self, table: str, partition: int, records: list[Record], headers: Any = None
    ) -> None:
        """Into the partition's open transaction; the table's own copy kept in step."""
        data = self.tables[table].data
        topic = self.tables[table].changelog_topic
        for key, value in records:
            sent = await topic.send(key=key, value=value, partition=partition, headers=headers)
            self._sent.append(sent)
            if value is None:
                data.pop(key, None)
            else:
                data[key] = value

    def _part(self, partition: int) -> PartitionState:
        part = self.parts.get(partition)
        if part is None:
            part = self.parts[partition] = PartitionState(partition, self.project, self.settings)
            part.restore(dict(self.tables["cells"].data.items()),
                         dict(self.tables["state"].data.items()))
            part.follow(self.cut)
        return part

    async def follow_batch(self) -> None:
        try:
            manifest = await asyncio.to_thread(catalog.current, self.store)
        except Exception:  # an unreachable store delays the drop; it never stops the layer
            log.warning("cannot read the batch catalog", exc_info=True)
            return
        self.cut = max(self.cut, manifest.cut if manifest else 0)
        for part in self.parts.values():
            part.follow(self.cut)

    async def revoked(self, app: Any, revoked: Any, **_: Any) -> None:
        """Forget revoked partitions; Faust recovers their tables if they come back."""
        numbers = {tp.partition for tp in revoked if tp.topic == self.settings.topic}
        for number in numbers:
            self.parts.pop(number, None)
        for table in self.tables.values():
            for key in [k for k in table.data if orjson.loads(k)[0] in numbers]:
                table.data.pop(key, None)


def main() -> None:
    from lambdalake.kafka_topics import ensure_bus_topics
    from lambdalake.project import load_project
    from lambdalake.storage import open_store

    settings = Settings()
    ensure_bus_topics(settings)
    store = open_store(settings.store_url, settings.s3_endpoint_url)
    try:
        FaustSpeed(settings, load_project(settings.project), store).app.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    else:
        code = 0
    logging.shutdown()
    os._exit(code)  # faust-streaming leaves its consumer thread running after a clean stop


if __name__ == "__main__":
    main()
