"""The nightly function on EMR Serverless (moto's, on the S3 server's endpoint): the job run it
submits, the run in flight it resumes, a failed run, and the Spark drivers it refuses to run.

moto records a job run without running it (every run is SUCCESS at once), so these tests
check the submission's shape; `test_spark_cluster` spark-submits the same request to a
real cluster.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import boto3
import pytest
from batch_lakes import PROJECT
from moto.emrserverless.models import emrserverless_backends
from test_batch_spark import invoke_nightly, write_pageviews

from lambdalake import catalog, master
from lambdalake.batch.duckdb_engine import DuckDBEngine
from lambdalake.batch.run import run_batch
from lambdalake.functions import emr
from lambdalake.functions.runtime.function import FunctionError
from lambdalake.settings import Settings
from lambdalake.storage import S3Store

ROLE = "arn:aws:iam::123456789012:role/lambdalake-batch"
PARAMETERS = "--conf spark.executor.cores=2 --conf spark.executor.memory=4g"


@pytest.fixture(scope="module")
def emr_client(s3_server: str) -> Any:
    return boto3.client("emr-serverless", endpoint_url=s3_server)


@pytest.fixture
def application(s3_server: str) -> str:
    return new_application(s3_server)


def new_application(endpoint: str) -> str:
    """A Spark application on moto's EMR Serverless."""
    client = boto3.client("emr-serverless", endpoint_url=endpoint)
    created = client.create_application(name=f"lake-{uuid.uuid4().hex[:6]}",
                                        releaseLabel="emr-7.9.0", type="SPARK")
    return created["applicationId"]


@pytest.fixture
def lake(s3_server: str) -> S3Store:
    """A lake on the S3 server with two archived pageviews, and the version a run published."""
    bucket = f"emr-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    store = S3Store(f"s3://{bucket}/lake", s3_server)
    write_pageviews(store, ["a", "b", "a"])
    master.write_watermark(store, 0, 3, 5_000)
    run_batch(Settings(partitions=1, slice_seconds=1), PROJECT, store, DuckDBEngine())
    return store


def emr_settings(store: S3Store, application: str, **overrides: Any) -> Settings:
    return Settings(**{
        "store": store.url, "s3_endpoint_url": store.endpoint_url, "partitions": 1,
        "slice_seconds": 1,
        "project": "batch_lakes:PROJECT", "batch_engine": "spark",
        "spark_master": "emr-serverless", "emr_application_id": application,
        "emr_execution_role_arn": ROLE, "emr_endpoint_url": store.endpoint_url,
        "emr_spark_parameters": PARAMETERS, "emr_poll_seconds": 0.1, **overrides,
    })


def job_runs(client: Any, application: str) -> list[dict[str, Any]]:
    return client.list_job_runs(applicationId=application)["jobRuns"]


def test_the_nightly_function_submits_the_spark_job_to_emr_serverless(
    lake, application, emr_client
):
    summary = invoke_nightly(emr_settings(lake, application))
    [listed] = job_runs(emr_client, application)
    run = emr_client.get_job_run(applicationId=application, jobRunId=listed["id"])["jobRun"]
    assert summary["job_run_id"] == run["jobRunId"]
    assert (run["name"], run["executionRole"], run["state"]) == ("lambdalake-batch", ROLE,
                                                                   "SUCCESS")
    submit = run["jobDriver"]["sparkSubmit"]
    assert submit["entryPoint"] == f"{lake.url}/_jobs/emr_entry.py"
    assert lake.get("_jobs/emr_entry.py") == emr.entry_point_script()  # the shipped script
    assert submit["sparkSubmitParameters"] == PARAMETERS
    [arguments] = submit["entryPointArguments"]
    job = Settings(**json.loads(arguments))
    assert (job.store, job.s3_endpoint_url, job.project, job.partitions) == (
        lake.url, lake.endpoint_url, "batch_lakes:PROJECT", 1)
    assert "api_keys" not in json.loads(arguments)  # only what the batch run reads
    current = catalog.current(lake)
    assert current is not None and summary["version"] == current.version  # moto ran nothing
    assert not lake.exists(emr.IN_FLIGHT)


def test_a_reinvocation_resumes_the_run_in_flight_instead_of_starting_another(
    lake, application, emr_client
):
    """An invocation that ran out of time left its run recorded; the next one polls it."""
    started = emr_client.start_job_run(**emr.job_request(emr_settings(lake, application), "t1"))
    lake.put(emr.IN_FLIGHT, json.dumps({"applicationId": application,
                                        "jobRunId": started["jobRunId"]}).encode())
    summary = invoke_nightly(emr_settings(lake, application))
    assert summary["job_run_id"] == started["jobRunId"]
    assert len(job_runs(emr_client, application)) == 1
    assert not lake.exists(emr.IN_FLIGHT)


def test_a_cancelled_job_run_fails_the_invocation_naming_it(lake, application, emr_client):
    started = emr_client.start_job_run(**emr.job_request(emr_settings(lake, application), "t2"))
    emr_client.cancel_job_run(applicationId=application, jobRunId=started["jobRunId"])
    lake.put(emr.IN_FLIGHT, json.dumps({"applicationId": application,
                                        "jobRunId": started["jobRunId"]}).encode())
    with pytest.raises(FunctionError, match=f"job run {started['jobRunId']} ended CANCELLED"):
        invoke_nightly(emr_settings(lake, application))
    assert not lake.exists(emr.IN_FLIGHT)  # the next night starts a new run


@pytest.mark.parametrize("missing", ["emr_application_id", "emr_execution_role_arn"])
def test_emr_serverless_without_its_application_or_role_is_refused(lake, missing):
    with pytest.raises(FunctionError, match=f"needs {missing} set"):
        invoke_nightly(emr_settings(lake, "app", **{missing: ""}))


@pytest.mark.parametrize("master_url", ["local[2]", "spark://spark-master:7077"])
def test_the_nightly_function_never_runs_a_spark_driver_itself(lake, master_url):
    with pytest.raises(FunctionError, match="never runs a Spark driver itself"):
        invoke_nightly(emr_settings(lake, "app", spark_master=master_url))


def test_a_run_still_going_when_time_runs_out_is_resumed_by_the_next_invocation(
    lake, application, emr_client
):
    """The S3 server runs in this process: its EMR Serverless holds the run RUNNING (moto's
    runs are SUCCESS at once otherwise), as a long batch would be."""
    settings = emr_settings(lake, application)
    started = emr_client.start_job_run(**emr.job_request(settings, "t3"))["jobRunId"]
    lake.put(emr.IN_FLIGHT, json.dumps({"applicationId": application,
                                        "jobRunId": started}).encode())
    held = emrserverless_backends["123456789012"]["us-east-1"].get_job_run(application, started)
    held.state = "RUNNING"
    with pytest.raises(emr.JobRunInFlight, match=f"{started} is still RUNNING"):
        emr.EmrBatch(settings, lake).run("t4", lambda: emr.MARGIN_SECONDS)  # no time left
    assert lake.exists(emr.IN_FLIGHT)
    held.state = "SUCCESS"
    job_run = emr.EmrBatch(settings, lake).run("t4", lambda: 600.0)
    assert job_run["jobRunId"] == started and not lake.exists(emr.IN_FLIGHT)
    assert len(job_runs(emr_client, application)) == 1
