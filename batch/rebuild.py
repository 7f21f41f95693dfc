"""Disaster recovery: every batch view rebuilt from the master dataset, the source of truth.

The master dataset (and the archive's watermarks beside it) is the one thing a deployment
must keep; everything else derives from it. `rebuild` finishes or clears any interrupted
master rewrite (a killed compaction or erasure), checks every object is readable with
today's schemas, recomputes every view in full at the newest cut, publishes that version even
at the serving cut, and deletes every other kept version: after a loss or corruption of the
views, nothing older is trusted. The speed layer needs nothing: its real-time slices past the
new cut stay valid, and those below it leave the merge.
"""

from __future__ import annotations

from lambdalake import master, rewrite
from lambdalake.batch.engine import Engine
from lambdalake.batch.run import BatchError, batch_lease, recompute
from lambdalake.catalog import Manifest
from lambdalake.lease import LeaseHeld
from lambdalake.project import Project
from lambdalake.settings import Settings
from lambdalake.storage import ObjectStore


def rebuild(settings: Settings, project: Project, store: ObjectStore, engine: Engine) -> Manifest:
    """Every view recomputed from the whole master dataset and published; older versions gone."""
    if not master.watermarks(store):
        raise BatchError(f"nothing to rebuild from: no master dataset at {settings.store_url} "
                         "(no archive watermark)")
    master.check_schemas(store, project)
    try:
        with batch_lease(settings, store, "rebuild") as lease:
            rewrite.recover(store)
            return recompute(settings, project, store, engine, lease)
    except LeaseHeld as exc:
        raise BatchError(f"rebuild refused: {exc}") from None
