"""Scheduled compaction (`rate(1 hour)`): the master dataset's small objects below the serving
cut joined into large ones, then retention of the run history and dead letters
(`lambdalake.batch.maintenance`, what `lambdalake up`'s maintenance loop runs locally).

Compaction holds the batch lease: while a batch run holds it, the beat skips compaction (the
next one does it) and still applies retention. A failure of the store raises: the invocation
is an error, and the next beat finishes or undoes what a killed one left (`rewrite.recover`).
"""

from __future__ import annotations

import logging
from typing import Any

from lambdalake.batch.maintenance import compact, prune_history
from lambdalake.batch.run import BatchError
from lambdalake.functions.environment import current_settings
from lambdalake.functions.schedule import require_scheduled
from lambdalake.storage import open_store

log = logging.getLogger("lambdalake.functions.compaction")


def handler(event: dict[str, Any], context: object) -> dict[str, Any]:
    require_scheduled(event, "compaction")
    settings = current_settings()
    store = open_store(settings.store_url, settings.s3_endpoint_url)
    summary: dict[str, Any] = {}
    try:
        done = compact(settings, store)
        summary["compaction"] = {"objects_before": done.objects_before,
                                 "objects_after": done.objects_after}
    except BatchError as refused:
        summary["compaction"] = {"skipped": str(refused)}
    summary["pruned"] = prune_history(settings, store)
    log.info("scheduled maintenance", extra=summary)
    return summary
