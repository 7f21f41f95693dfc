"""The nightly batch: an EventBridge schedule event (`cron(0 2 * * ? *)`) starts a full run.

Where it runs is the settings' choice (`LAMBDALAKE_BATCH_ENGINE`, `LAMBDALAKE_SPARK_MASTER`);
a Lambda never runs Spark itself:
- `duckdb`: the run, here, in the function (the small-data option);
- `spark` on a Spark Connect server (`sc://host:port`): the run's driver logic here, every
  job on the server's cluster;
- `spark` on `emr-serverless`: the job submitted to EMR Serverless and polled until it ends
  (`lambdalake.functions.emr`); an invocation that runs out of time fails, and the next one
  resumes polling the same run.
A Spark master that would start a driver in the function (`local[*]`, `spark://…`) is refused.

It returns the published version's summary. A run that is refused (nothing new since the
serving cut, a partition never archived, another batch run under way) or fails raises: the
invocation is an error, counted and retried by EventBridge, and the previous version keeps
serving.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from lambdalake import catalog
from lambdalake.batch.run import BatchError, run_from_settings, summarize
from lambdalake.functions.emr import EMR_SERVERLESS, EmrBatch
from lambdalake.functions.environment import current_settings
from lambdalake.functions.schedule import require_scheduled
from lambdalake.settings import Settings
from lambdalake.storage import open_store

CONNECT = "sc://"

log = logging.getLogger("lambdalake.functions.nightly")


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    require_scheduled(event, "nightly_batch")
    settings = current_settings()
    started = time.monotonic()
    if settings.batch_engine == "spark" and settings.spark_master == EMR_SERVERLESS:
        summary = _on_emr(settings, event, context)
    else:
        summary = _here(settings)
    summary |= {"seconds": round(time.monotonic() - started, 3), "scheduled": event.get("time")}
    log.info("nightly batch published", extra=summary)
    return summary


def _here(settings: Settings) -> dict[str, Any]:
    master = settings.spark_master
    if settings.batch_engine == "spark" and not master.startswith(CONNECT):
        raise ValueError(
            f"spark_master={master}: the nightly function never runs a Spark driver itself; "
            f"use a Spark Connect server (sc://host:port) or {EMR_SERVERLESS}"
        )
    return summarize(run_from_settings(settings, settings.batch_engine, master=master))


def _on_emr(settings: Settings, event: dict[str, Any], context: Any) -> dict[str, Any]:
    store = open_store(settings.store_url, settings.s3_endpoint_url)
    job_run = EmrBatch(settings, store).run(
        event["id"], lambda: context.get_remaining_time_in_millis() / 1000
    )
    manifest = catalog.current(store)
    if manifest is None:
        raise BatchError(f"EMR Serverless job run {job_run['jobRunId']} published no version")
    return summarize(manifest) | {"job_run_id": job_run["jobRunId"]}
