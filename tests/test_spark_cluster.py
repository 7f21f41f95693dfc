"""The Spark batch on real Spark processes: a standalone cluster (a master and two workers
from the pyspark wheel), Spark Connect, and the EMR Serverless job's entry point submitted to
the cluster exactly as the nightly function asks EMR to run it.

Every answer is checked against the DuckDB engine and the independent recompute of
`test_batch`. Each JVM takes 10-30 s to start on two cores: every test here is marked `long`
(`make test-long`; `make test-reliability` also kills a batch job on a cluster mid-write).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from batch_lakes import assert_same_view, published
from test_batch import PROJECT, Lake, assert_views_equal, write_lake
from test_batch_spark import invoke_nightly
from test_emr_serverless import emr_settings, new_application

from lambdalake import catalog, master
from lambdalake.batch.duckdb_engine import DuckDBEngine
from lambdalake.batch.spark_engine import spark_session
from lambdalake.events import Event
from lambdalake.functions import emr
from lambdalake.master import Archived
from lambdalake.project import Project
from lambdalake.settings import Settings
from lambdalake.storage import S3Store
from lambdalake.testing.spark import SparkCluster, SparkConnect, spark_env, spark_submit

TESTS = Path(__file__).parent
ENTRY_POINT = Path(emr.__file__).parent.parent / "batch" / "emr_entry.py"
SLICE_MS = 1_000
DUCKDB = DuckDBEngine()


def small_lake(seed: int, events: int = 300, partitions: int = 2) -> Lake:
    """Pageviews and purchases over three days on `partitions` partitions, a tenth of them
    sent twice (some retries carry other fields under the same id), archived in batches
    that overlap (a retried archive batch)."""
    rng = random.Random(seed)
    sent = [random_event(rng, f"e{i}") for i in range(events)]
    sent += [rng.choice(sent) if rng.random() < 0.5 else random_event(rng, e.event_id)
             for e in rng.sample(sent, events // 10)]
    on_bus: dict[int, list[Archived]] = {p: [] for p in range(partitions)}
    arrival = dict.fromkeys(range(partitions), SLICE_MS)
    for event in sent:
        partition = rng.randrange(partitions)
        arrival[partition] += rng.randrange(50)
        on_bus[partition].append(Archived(event, partition, len(on_bus[partition]),
                                          arrival[partition]))
    batches = [rs[i : i + 40] for rs in on_bus.values() for i in range(0, len(rs), 40)]
    batches += [rs[10:60] for rs in on_bus.values()]
    return Lake(partitions, [r for rs in on_bus.values() for r in rs], batches,
                {p: arrival[p] + 1 for p in on_bus}, {p: len(rs) for p, rs in on_bus.items()})


def random_event(rng: random.Random, event_id: str) -> Event:
    ts = rng.randrange(3 * 86_400_000)
    if rng.random() < 0.6:
        return Event(event_id, "pageview", ts, {
            "url": rng.choice(["/", "/a", "/b"]), "user_id": f"u{rng.randrange(20)}",
            "referrer": rng.choice([None, "g", "t"]),
            "duration_ms": rng.choice([None, rng.randrange(300)]),
        })
    return Event(event_id, "purchase", ts, {
        "user_id": f"u{rng.randrange(20)}", "sku": rng.choice(["s0", "s1", "it's \\ odd"]),
        "amount": round(rng.uniform(0, 50), 2),
    })


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SparkCluster]:
    with SparkCluster(tmp_path_factory.mktemp("spark-cluster")) as running:
        yield running


@pytest.fixture(scope="module")
def bucket(s3_server: str) -> str:
    name = f"cluster-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


def s3_lake(s3_server: str, bucket: str, seed: int, events: int = 300) -> tuple[S3Store, Lake]:
    store = S3Store(f"s3://{bucket}/{uuid.uuid4().hex}", s3_server)
    lake = small_lake(seed, events)
    write_lake(store, lake)
    return store, lake


# Two of test_batch's views, one per event type (a filter, sketches, sums): the smoke test's.
SMOKE = Project.of(PROJECT.schemas.values(), [
    PROJECT.views["pageviews_by_url_hour"], PROJECT.views["big_purchases_by_user_day"]
])


def job_settings(store: S3Store, lake: Lake, project: str = "test_batch:PROJECT") -> dict:
    return {"store": store.url, "s3_endpoint_url": store.endpoint_url, "project": project,
            "partitions": lake.partitions, "slice_seconds": 1}


def submit_entry_point(cluster: SparkCluster, script: Path, arguments: list[str]):
    """spark-submit the job's entry point to the cluster (the driver finds `test_batch`)."""
    return spark_submit(cluster, [str(script), *arguments], env={"PYTHONPATH": str(TESTS)})


def assert_equals_duckdb_and_the_recompute(
    store: S3Store, lake: Lake, project: Project = PROJECT
) -> catalog.Manifest:
    """The serving version is Spark's, and each of its views equals the DuckDB engine's over
    the same objects and cut, and the independent recompute from the records."""
    manifest = catalog.current(store)
    assert manifest is not None and manifest.engine == "spark"
    assert set(manifest.views) == set(project.views)
    for name, table in published(store, manifest).items():
        view = project.views[name]
        keys = master.data_keys(store, view.event_type)
        assert_same_view(view, table, DUCKDB.compute(project, view, store, keys, manifest.cut))
    assert_views_equal(store, manifest, lake.records)
    return manifest


# -- the default suite's smoke test ---------------------------------------------------------


@pytest.mark.long
@pytest.mark.spark
def test_the_batch_job_on_a_standalone_cluster_equals_duckdb(cluster, s3_server, bucket):
    """The EMR entry point, spark-submitted to a master and two workers: its executors (other
    JVMs) read the master dataset from the S3 server through s3a."""
    store, lake = s3_lake(s3_server, bucket, seed=1, events=150)
    settings = job_settings(store, lake, "test_spark_cluster:SMOKE")
    done = submit_entry_point(cluster, ENTRY_POINT, [json.dumps(settings)])
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    manifest = assert_equals_duckdb_and_the_recompute(store, lake, SMOKE)
    assert summary["version"] == manifest.version and summary["engine"] == "spark"
    apps = (cluster.status() or {}).get("completedapps", [])
    assert apps and apps[-1]["cores"] == cluster.workers  # it ran on the cluster's executors


# -- longer cases ---------------------------------------------------------------------------


@pytest.mark.long
@pytest.mark.spark
def test_a_refused_job_exits_1_with_one_line(cluster, s3_server, bucket):
    store, lake = s3_lake(s3_server, bucket, seed=2)
    settings = job_settings(store, lake) | {"partitions": lake.partitions + 1}
    done = submit_entry_point(cluster, ENTRY_POINT, [json.dumps(settings)])
    assert done.returncode == 1
    # (spark-submit's PythonRunner merges the script's stderr into its stdout)
    [line] = [ln for ln in done.stdout.splitlines() if ln.startswith("lambdalake batch job:")]
    assert f"no archive watermark yet for partition(s) {lake.partitions}" in line
    assert catalog.current(store) is None


@pytest.mark.long
@pytest.mark.spark
@pytest.mark.timeout(900)  # each executor copies the AWS SDK bundle (700 MB) from the driver
def test_the_cli_batch_drives_the_cluster_from_here(cluster, s3_server, bucket):
    """`lambdalake batch run --engine spark --master spark://…`: the driver in the CLI's
    process, the s3a jars shipped to the executors in `spark.jars`."""
    store, lake = s3_lake(s3_server, bucket, seed=7)
    settings = job_settings(store, lake)
    env = spark_env({f"LAMBDALAKE_{name.upper()}": str(value) for name, value in settings.items()}
                    | {"PYTHONPATH": str(TESTS)})
    command = [sys.executable, "-m", "lambdalake.stack.cli", "batch", "run", "--engine", "spark",
               "--master", cluster.master_url]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "published" in done.stdout
    assert_equals_duckdb_and_the_recompute(store, lake)


@pytest.mark.long
@pytest.mark.spark
@pytest.mark.timeout(900)  # 3-5 minutes on this machine under load
def test_the_nightly_batch_through_spark_connect_equals_duckdb(
    cluster, s3_server, bucket, monkeypatch
):
    """The nightly function as a Spark Connect client (`sc://`): every job runs on the
    server's cluster, none in the function."""
    # pyspark turns the whole process to Connect mode (this variable) with the first Connect
    # session: set here, it is removed at the end, so later tests get classic sessions again.
    monkeypatch.setenv("SPARK_CONNECT_MODE_ENABLED", "1")
    store, lake = s3_lake(s3_server, bucket, seed=3)
    settings = Settings(**job_settings(store, lake), batch_engine="spark")
    with SparkConnect(cluster) as connect:
        try:
            summary = invoke_nightly(settings.model_copy(update={"spark_master": connect.url}))
        finally:
            spark_session(connect.url).stop()
    manifest = assert_equals_duckdb_and_the_recompute(store, lake)
    assert summary["version"] == manifest.version and summary["engine"] == "spark"


@pytest.mark.long
@pytest.mark.spark
@pytest.mark.timeout(1200)  # three jobs, Spark's registration attempts, workers coming back
def test_the_master_killed_mid_run_then_down_then_back(cluster, s3_server, bucket):
    """kill -9 of the master while a job runs: the job keeps the executors it was given (the
    master is not on the data path) and publishes the exact answer. A job submitted while
    the master is down fails with one line and publishes nothing (after Spark's three
    20 s registration attempts); with the master back, its rerun publishes the exact answer."""
    store, lake = s3_lake(s3_server, bucket, seed=4)
    killer = threading.Thread(target=cluster.kill_master_once_running, args=(120.0,))
    killer.start()
    running = submit_entry_point(cluster, ENTRY_POINT, [json.dumps(job_settings(store, lake))])
    killer.join()
    assert running.returncode == 0, running.stdout[-3000:]
    assert_equals_duckdb_and_the_recompute(store, lake)

    store, lake = s3_lake(s3_server, bucket, seed=6)
    arguments = [json.dumps(job_settings(store, lake))]
    refused = submit_entry_point(cluster, ENTRY_POINT, arguments)
    assert refused.returncode == 1
    [line] = [ln for ln in refused.stdout.splitlines() if ln.startswith("lambdalake batch job:")]
    assert "failed" in line and catalog.current(store) is None
    cluster.start_master()
    cluster.wait_for_workers()
    done = submit_entry_point(cluster, ENTRY_POINT, arguments)
    assert done.returncode == 0, done.stdout[-3000:]
    assert_equals_duckdb_and_the_recompute(store, lake)


# -- EMR Serverless: the submission (moto), and the same job on the cluster -----------------


@pytest.mark.long
@pytest.mark.spark
@pytest.mark.timeout(900)  # 3-5 minutes on this machine under load
def test_the_job_the_nightly_function_submits_runs_on_the_cluster(cluster, s3_server, bucket):
    """The request moto's EMR Serverless recorded, spark-submitted as it is: the script object
    it names on S3, its arguments, its spark-submit parameters."""
    store, lake = s3_lake(s3_server, bucket, seed=5)
    settings = emr_settings(store, new_application(s3_server), project="test_batch:PROJECT",
                            partitions=lake.partitions,
                            emr_spark_parameters="--conf spark.executor.memory=512m")
    job = emr.EmrBatch(settings, store)
    job_run_id = job.submit(uuid.uuid4().hex)
    recorded = job.client.get_job_run(applicationId=settings.emr_application_id,
                                      jobRunId=job_run_id)["jobRun"]["jobDriver"]["sparkSubmit"]
    script = Path(cluster.folder) / f"{job_run_id}.py"
    script.write_bytes(store.get(recorded["entryPoint"].removeprefix(f"{store.url}/")))
    parameters = recorded["sparkSubmitParameters"].split()
    done = spark_submit(cluster, [*parameters, str(script), *recorded["entryPointArguments"]],
                        env={"PYTHONPATH": str(TESTS)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert_equals_duckdb_and_the_recompute(store, lake)
