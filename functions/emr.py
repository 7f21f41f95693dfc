"""The Spark batch on EMR Serverless: the nightly function submits the job and polls it.

A Lambda never runs Spark. With `LAMBDALAKE_SPARK_MASTER=emr-serverless` the nightly function
copies the job's entry point shipped in this package (`lambdalake/batch/emr_entry.py`) to
the store (`_jobs/emr_entry.py`, so EMR runs the code this function ships), starts a job run
with the batch settings as its one argument (`start_job_run`), and polls `get_job_run`
until the run ends or the invocation's time is nearly spent.

The run in flight is recorded in the store (`views/_emr_job_run.json`) until it ends: an
invocation that runs out of time fails (`JobRunInFlight`), and the next one (the schedule's
retry, or the next night) resumes polling that run instead of starting a second. The
invocation's event id is the request's client token, so even a start whose answer was lost
is not run twice by EMR.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from importlib.resources import files
from typing import Any

import boto3

from lambdalake import catalog
from lambdalake.settings import Settings
from lambdalake.storage import ObjectStore, S3Store

EMR_SERVERLESS = "emr-serverless"
TERMINAL = ("SUCCESS", "FAILED", "CANCELLED")
IN_FLIGHT = f"{catalog.PREFIX}/_emr_job_run.json"
ENTRY_POINT = "_jobs/emr_entry.py"
JOB_NAME = "lambdalake-batch"
MARGIN_SECONDS = 10.0  # left to the invocation after its last poll, to record and answer
# What the batch run reads from the settings; the job gets exactly these.
BATCH_SETTINGS = (
    "project", "s3_endpoint_url", "partitions", "slice_seconds", "versions_kept",
    "runs_kept", "on_corrupt", "batch_lease_seconds",
)


class JobRunFailed(RuntimeError):
    """The job run ended FAILED or CANCELLED; the message carries EMR's state details."""


class JobRunInFlight(RuntimeError):
    """The job run was still going when the invocation's time ran out; the next resumes it."""


def job_request(settings: Settings, token: str) -> dict[str, Any]:
    """The `start_job_run` request of a batch run over the settings' store."""
    batch = settings.model_dump(include=set(BATCH_SETTINGS), mode="json")
    arguments = json.dumps(batch | {"store": settings.store_url}, sort_keys=True)
    return {
        "applicationId": settings.emr_application_id,
        "executionRoleArn": settings.emr_execution_role_arn,
        "clientToken": token,
        "name": JOB_NAME,
        "jobDriver": {
            "sparkSubmit": {
                "entryPoint": f"{settings.store_url.rstrip('/')}/{ENTRY_POINT}",
                "entryPointArguments": [arguments],
                "sparkSubmitParameters": settings.emr_spark_parameters,
            }
        },
        "tags": {"lambdalake-store": settings.store_url},
    }


def entry_point_script() -> bytes:
    return (files("lambdalake.batch") / "emr_entry.py").read_bytes()


class EmrBatch:
    """The nightly batch as an EMR Serverless job run: submit or resume, then poll."""

    def __init__(self, settings: Settings, store: ObjectStore):
        if not isinstance(store, S3Store):
            raise ValueError(f"spark_master=emr-serverless needs an s3:// store, not {store.url}")
        missing = [name for name in ("emr_application_id", "emr_execution_role_arn")
                   if not getattr(settings, name)]
        if missing:
            raise ValueError(f"spark_master=emr-serverless needs {', '.join(missing)} set")
        self.settings, self.store = settings, store
        self.client = boto3.client(
            "emr-serverless", endpoint_url=settings.emr_endpoint_url
        )

    def run(self, token: str, seconds_left: Callable[[], float]) -> dict[str, Any]:
        """The job run, ended: submitted under `token` or resumed, then polled while
        `seconds_left()` allows. Raises `JobRunInFlight` or `JobRunFailed`."""
        job_run_id = self.in_flight() or self.submit(token)
        job_run = self.poll(job_run_id, seconds_left)
        state = job_run["state"]
        if state not in TERMINAL:
            raise JobRunInFlight(
                f"EMR Serverless job run {job_run_id} is still {state}; "
                "the next invocation resumes polling it"
            )
        self.store.delete(IN_FLIGHT)
        if state != "SUCCESS":
            details = job_run.get("stateDetails") or "no details"
            raise JobRunFailed(f"EMR Serverless job run {job_run_id} ended {state}: {details}")
        return job_run

    def in_flight(self) -> str | None:
        """The job run an earlier invocation started and did not see end, if any."""
        if not self.store.exists(IN_FLIGHT):
            return None
        recorded = json.loads(self.store.get(IN_FLIGHT))
        return recorded["jobRunId"] if recorded["applicationId"] == self.application else None

    @property
    def application(self) -> str:
        return self.settings.emr_application_id

    def submit(self, token: str) -> str:
        self.store.put(ENTRY_POINT, entry_point_script())
        started = self.client.start_job_run(**job_request(self.settings, token))
        record = {"applicationId": self.application, "jobRunId": started["jobRunId"]}
        self.store.put(IN_FLIGHT, json.dumps(record).encode())
        return started["jobRunId"]

    def poll(self, job_run_id: str, seconds_left: Callable[[], float]) -> dict[str, Any]:
        pause = self.settings.emr_poll_seconds
        while True:
            job_run = self.client.get_job_run(applicationId=self.application,
                                              jobRunId=job_run_id)["jobRun"]
            if job_run["state"] in TERMINAL or seconds_left() < pause + MARGIN_SECONDS:
                return job_run
            time.sleep(pause)
