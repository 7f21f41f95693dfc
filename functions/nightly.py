"""The nightly batch: an EventBridge schedule event (`cron(0 2 * * ? *)`) starts a full run.

The run recomputes every view from the whole master dataset with the settings' engine
(`LAMBDALAKE_BATCH_ENGINE`, `LAMBDALAKE_SPARK_MASTER`), publishes a new version and returns
its summary. A run that is refused (nothing new since the serving cut, a partition never
archived, another batch run under way) or fails raises: the invocation is an error, counted and
retried by EventBridge, and the previous version keeps serving.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from lambdalake.batch.run import run_from_settings
from lambdalake.events import iso
from lambdalake.functions.environment import current_settings
from lambdalake.functions.schedule import require_scheduled

log = logging.getLogger("lambdalake.functions.nightly")


def handler(event: dict[str, Any], context: object) -> dict[str, Any]:
    require_scheduled(event, "nightly_batch")
    settings = current_settings()
    started = time.monotonic()
    manifest = run_from_settings(settings, settings.batch_engine, master=settings.spark_master)
    summary = {
        "version": manifest.version,
        "cut": iso(manifest.cut),
        "engine": manifest.engine,
        "rows_read": manifest.rows_read,
        "rows_written": sum(files.rows for files in manifest.views.values()),
        "views": {name: files.rows for name, files in manifest.views.items()},
        "seconds": round(time.monotonic() - started, 3),
        "scheduled": event.get("time"),
    }
    log.info("nightly batch published", extra=summary)
    return summary
