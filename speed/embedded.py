"""The embedded speed driver: the kernel's view state, run in process on the embedded log.

Exactly once: the state and the log positions it reflects are checkpointed together in one
atomically replaced file, so a restart resumes from a consistent pair and replays the rest.
`restored` is set once the checkpoint is restored and the log replayed to the end it had at
start: before that, the real-time state is partial. The loop survives transient errors
(`lambdalake.loops`): a failed step is retried from the positions it left, nothing skipped.
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
import time
from collections.abc import Callable

from lambdalake import catalog
from lambdalake.eventlog import Topic, now_ms
from lambdalake.events import Event, Validator
from lambdalake.loops import Loop, Loops
from lambdalake.project import Project
from lambdalake.settings import Settings
from lambdalake.speed.metrics import APPLIED, DedupGauges
from lambdalake.storage import ObjectStore
from lambdalake.viewstate import CellUpdate, ViewState

log = logging.getLogger("lambdalake.speed")
Sink = Callable[[list[CellUpdate], int], None]  # (updates, caught_up_at ms)

READ_BATCH = 5_000


class EmbeddedSpeed:
    def __init__(
        self,
        settings: Settings,
        project: Project,
        topic: Topic,
        store: ObjectStore,
        sink: Sink,
        checkpoint_seconds: float = 2.0,
        loops: Loops | None = None,
        restored: threading.Event | None = None,
    ):
        self.settings, self.project, self.topic, self.store, self.sink = (
            settings, project, topic, store, sink,
        )
        self.state = ViewState(project, settings.slice_ms, settings.dedup_window_ms,
                               settings.dedup_max_ids)
        self.validator = Validator(project.schemas, settings.max_future_seconds * 1000)
        self.dedup_gauges = DedupGauges("all")
        self.positions = {p.index: 0 for p in topic.partitions}
        self.checkpointed = dict(self.positions)  # what a restart resumes from: log retention
        self.kept = catalog.KeptVersions(store)
        self.checkpoint_path = settings.home / "speed" / "checkpoint.pickle"
        self.checkpoint_seconds = checkpoint_seconds
        self.restored = restored or threading.Event()
        self._replay_to: dict[int, int] = {}
        self._caught_up_at = 0
        self._last_checkpoint = self._last_catalog = time.monotonic()
        self.loop = Loop("speed", self.step)
        if loops is not None:
            loops.add(self.loop)

    def start(self) -> None:
        self.restore()
        self._replay_to = {p.index: p.end for p in self.topic.partitions}
        self.sink(self.state.everything(), 0)
        self.loop.start()

    def stop(self) -> None:
        self.loop.stop()
        self.checkpoint()

    def restore(self) -> None:
        if self.checkpoint_path.exists():
            positions, snapshot = pickle.loads(self.checkpoint_path.read_bytes())
            self.positions.update(positions)
            self.checkpointed = dict(self.positions)
            self.state.restore(snapshot)
            log.info("speed state restored", extra={"positions": positions})

    def checkpoint(self) -> None:
        self.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.checkpoint_path.with_suffix(".tmp")
        positions = dict(self.positions)
        with open(tmp, "wb") as out:
            pickle.dump((positions, self.state.snapshot()), out, protocol=5)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.checkpoint_path)
        self.checkpointed = positions

    def poll_once(self) -> bool:
        """Apply what each partition has; True when every partition was read to its end."""
        caught_up = True
        for partition in self.topic.partitions:
            records = partition.read(self.positions[partition.index], READ_BATCH)
            for record in records:
                self._apply(record.value, record.arrival)
            if records:
                self.positions[partition.index] = records[-1].offset + 1
            caught_up &= len(records) < READ_BATCH
        return caught_up

    def _apply(self, value: bytes, arrival: int) -> None:
        # Checked as the archiver checks it (an older version may have written it), so an
        # event is counted here exactly when the batch layer will count it.
        event = self.validator.validate_json(value, arrival)
        if not isinstance(event, Event):
            APPLIED.labels("unreadable").inc()
            log.error("unreadable record on the embedded log", extra={
                "arrival": arrival, "reason": "; ".join(f"{p.field}: {p.error}" for p in event)})
            return
        APPLIED.labels("counted" if self.state.apply(event, arrival) else "skipped").inc()

    def follow_batch(self) -> None:
        """Drop the slices no kept batch version needs (below the lowest kept cut)."""
        self.state.drop_below(self.kept.floor())

    def step(self) -> float:
        """Read, publish, follow the batch, checkpoint; the seconds until the next step."""
        started = now_ms()
        if self.poll_once():
            self._caught_up_at = started
        self.sink(self.state.drain(), self._caught_up_at)
        self._note_restored()
        self.dedup_gauges.report(self.state)
        now = time.monotonic()
        if now - self._last_catalog >= 1.0:
            self.follow_batch()
            self._last_catalog = now
        if now - self._last_checkpoint >= self.checkpoint_seconds:
            self.checkpoint()
            self._last_checkpoint = now
        caught_up = self._caught_up_at == started
        return self.settings.flush_interval_ms / 1000 if caught_up else 0.0

    def _note_restored(self) -> None:
        if self.restored.is_set():
            return
        if all(self.positions[index] >= end for index, end in self._replay_to.items()):
            self.restored.set()
            log.info("speed state restored and the log replayed", extra={
                "positions": dict(self.positions)})
