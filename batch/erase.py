"""Erasure: forget a subject's events everywhere, and recompute without them.

`erase(field, value)` holds the batch lease throughout and:
1. picks the erasure cut E, the first slice boundary past now, and waits until the archive
   has passed it (every partition's watermark at or past E): every event of the subject that
   had arrived when the request came is then in the master dataset;
2. rewrites (`lambdalake.rewrite`, crash-safe like compaction) every master object holding an
   event with `field == value` that arrived before E, without those events;
3. records an audit entry, `master/_erasures/<id>.json`: who asked, when, the field, how
   many events and objects; never the value;
4. publishes a full recompute at the newest cut (at or past E, published even at the serving
   cut) and deletes every other batch version, which may still count the subject.

The real-time state forgets the subject without knowing it: every event of the subject it
holds arrived before E, so below the new version's cut, and the speed layer drops the slices
below a published cut. Approx-distinct sketches, which cannot forget one member, are rebuilt
by the recompute. The bus keeps the subject's records until retention deletes their segments
(the oldest kept version is now this one, so that is as soon as they are archived and folded).
Events of the subject arriving after E are new data, not erased.
"""

from __future__ import annotations

import getpass
import json
import logging
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc

from lambdalake import master, rewrite
from lambdalake.batch.engine import Engine
from lambdalake.batch.run import BatchError, batch_lease, recompute
from lambdalake.eventlog import now_ms
from lambdalake.events import EventSchema, iso
from lambdalake.lease import LeaseHeld
from lambdalake.project import Project
from lambdalake.settings import Settings
from lambdalake.storage import ObjectStore

log = logging.getLogger("lambdalake.batch")
AUDIT = f"{master.PREFIX}/_erasures"
_POLL_S = 0.5


@dataclass(frozen=True, slots=True)
class Erasure:
    """The audit record of one erasure (it never holds the erased value)."""

    id: str
    by: str
    at: str
    field: str
    events: int
    objects: int
    before_arrival: int
    version: str


def erase(
    settings: Settings,
    project: Project,
    store: ObjectStore,
    engine: Engine,
    field: str,
    value: str,
    by: str | None = None,
) -> Erasure:
    """Erase every event with `field == value` (the value as the field's type)."""
    schemas = [s for s in project.schemas.values() if field in s.fields]
    if not schemas:
        raise BatchError(f"--field {field!r}: no event type of the project has this field")
    subjects = {s.name: _typed(s, field, value) for s in schemas}
    try:
        with batch_lease(settings, store, f"erasure by {field}") as lease:
            before = _archived_past_now(settings, store)
            job = rewrite.Rewrite(store, "erase")
            rewrite.recover(store)
            events = sum(_stage(store, job, event_type, field, subject, before)
                         for event_type, subject in subjects.items())
            if lease.lost:
                raise BatchError("erasure lost the batch lease; nothing committed")
            job.finish(job.commit())
            manifest = recompute(settings, project, store, engine, lease)
    except LeaseHeld as exc:
        raise BatchError(f"erasure refused: {exc}") from None
    record = Erasure(job.id, by or getpass.getuser(), datetime.now(UTC).isoformat(), field,
                     events, len(job.replaces), before, manifest.version)
    store.put(f"{AUDIT}/{record.id}.json", json.dumps(asdict(record)).encode())
    log.info("subject erased", extra=asdict(record))
    return record


def audit(store: ObjectStore) -> list[dict[str, object]]:
    return [json.loads(store.get(key)) for key in store.list(f"{AUDIT}/")]


def _typed(schema: EventSchema, field: str, value: str) -> pa.Scalar:
    arrow_type = master.arrow_schema(schema).field(field).type
    try:
        return pa.scalar(value).cast(arrow_type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise BatchError(f"--value: not a {schema.field_type(field)}, the type of "
                         f"{schema.name}.{field}") from None


def _archived_past_now(settings: Settings, store: ObjectStore) -> int:
    """The erasure cut E, once every partition's watermark is at or past it."""
    boundary = now_ms() // settings.slice_ms * settings.slice_ms + settings.slice_ms
    deadline = time.monotonic() + settings.erase_wait_seconds
    while True:
        try:
            lowest = min(master.cut_bounds(store, settings), default=0)
        except master.NoWatermark:
            lowest = 0
        if lowest >= boundary:
            return boundary
        if time.monotonic() > deadline:
            raise BatchError(f"the archive has not passed {iso(boundary)} within "
                             f"{settings.erase_wait_seconds:g} s (lowest watermark "
                             f"{iso(lowest)}); nothing erased")
        time.sleep(_POLL_S)


def _stage(
    store: ObjectStore, job: rewrite.Rewrite, event_type: str, field: str, subject: pa.Scalar,
    before: int,
) -> int:
    """Stage the type's objects holding the subject without its events; how many events."""
    erased = 0
    for key in master.data_keys(store, event_type):
        table = rewrite.read_table(store, key)
        if field not in table.column_names:  # written before the field was declared
            continue
        hit = pc.fill_null(pc.and_(pc.equal(table[field], subject),
                                   pc.less(table["arrival"], before)), False)
        found = pc.sum(hit).as_py() or 0
        if found:
            job.stage([key], table.filter(pc.invert(hit)), key.rsplit("/", 1)[0])
            erased += found
    return erased
