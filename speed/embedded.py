"""The embedded speed driver: the kernel's view state, run in process on the embedded log.

Exactly once: the state and the log positions it reflects are checkpointed together in one
atomically replaced file, so a restart resumes from a consistent pair and replays the rest.
`restored` is set once the checkpoint is restored and the log replayed to the end it had at
start: before that, the real-time state is partial. The loop survives transient errors
(`lambdalake.loops`): a failed step is retried from the positions it left, nothing skipped.

The checkpoint is a JSON header line (format, positions) and the view state's versioned
snapshot. Views changed or added since it was written are rebuilt at start from the log's
beginning up to the checkpoint's positions (arrivals below the batch cut that covers them
only feed dedup); removed views are dropped. A checkpoint of an older format (the pickle of
earlier versions) is discarded and the whole state rebuilt from the log.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable

import orjson

from lambdalake import catalog
from lambdalake.eventlog import Topic, now_ms
from lambdalake.events import Event, Validator
from lambdalake.loops import Loop, Loops
from lambdalake.project import Project
from lambdalake.settings import Settings
from lambdalake.speed.metrics import APPLIED, DedupGauges
from lambdalake.storage import ObjectStore
from lambdalake.viewstate import CellUpdate, UnreadableSnapshot, ViewState

log = logging.getLogger("lambdalake.speed")
Sink = Callable[[list[CellUpdate], int], None]  # (updates, caught_up_at ms)

READ_BATCH = 5_000
CHECKPOINT_FORMAT = 1


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
        self.kept = catalog.KeptVersions(store, project)
        self.checkpoint_path = settings.home / "speed" / "checkpoint.json"
        self.legacy_checkpoint = settings.home / "speed" / "checkpoint.pickle"
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
        """The checkpointed state, less removed views, with changed and added views rebuilt
        from the log up to its positions."""
        stale = self._read_checkpoint()
        floor = self.kept.floor()
        self.state.drop_below(floor)
        if stale and any(self.positions.values()):
            self._rebuild(stale, floor)

    def _read_checkpoint(self) -> set[str]:
        """Restore the checkpoint if it is readable; the views it does not hold as defined."""
        if not self.checkpoint_path.exists():
            if self.legacy_checkpoint.exists():
                log.warning("speed checkpoint of an older format discarded: the state is "
                            "rebuilt from the log", extra={"path": str(self.legacy_checkpoint)})
            return set(self.project.views)
        header, _, snapshot = self.checkpoint_path.read_bytes().partition(b"\n")
        saved = orjson.loads(header)
        try:
            if saved.get("format") != CHECKPOINT_FORMAT:
                raise UnreadableSnapshot(f"checkpoint format {saved.get('format')!r}")
            stale = self.state.restore(snapshot)
        except UnreadableSnapshot as exc:
            log.warning("speed checkpoint unreadable, the state is rebuilt from the log",
                        extra={"reason": str(exc)})
            return set(self.project.views)
        self.positions.update({int(p): offset for p, offset in saved["positions"].items()})
        self.checkpointed = dict(self.positions)
        log.info("speed state restored", extra={"positions": self.positions,
                                                "views_to_rebuild": sorted(stale)})
        return stale

    def _rebuild(self, names: Iterable[str], cut: int) -> None:
        """Fold the records before the restored positions into the views named, afresh."""
        rebuilt = self.state.for_views(names, cut)
        for partition in self.topic.partitions:
            offset, end = 0, self.positions[partition.index]
            while offset < end:
                records = partition.read(offset, min(READ_BATCH, end - offset))
                for record in records:
                    event = self.validator.validate_json(record.value, record.arrival)
                    if isinstance(event, Event):
                        rebuilt.apply(event, record.arrival)
                offset = records[-1].offset + 1 if records else end
        self.state.adopt(rebuilt)
        log.info("views rebuilt from the log", extra={"views": sorted(rebuilt.cells),
                                                      "positions": self.positions})

    def checkpoint(self) -> None:
        self.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.checkpoint_path.with_suffix(".tmp")
        positions = dict(self.positions)
        header = orjson.dumps({"format": CHECKPOINT_FORMAT, "positions": positions},
                              option=orjson.OPT_NON_STR_KEYS)
        with open(tmp, "wb") as out:
            out.write(header + b"\n" + self.state.snapshot())
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.checkpoint_path)
        self.legacy_checkpoint.unlink(missing_ok=True)
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
        """Drop the slices no kept batch version and no view needs (`KeptVersions.floor`)."""
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
