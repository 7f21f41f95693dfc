"""kill -9, in turn, each process of a deployment during steady traffic, then its restart:
every case ends with the reconciliation (harness.reconcile). Which cases `make test` runs:
those not marked `long` (the gateway's and a speed driver's); `make test-reliability` runs all,
longer and faster."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from batch_lakes import assert_same_view, published
from harness import FULL, Lake, Traffic, reconcile

import lambdalake.batch
from lambdalake import catalog, master
from lambdalake.batch.duckdb_engine import DuckDBEngine
from lambdalake.project import load_project
from lambdalake.testing.spark import SparkCluster, spark_env, submit_command

pytestmark = pytest.mark.kafka
RATE = 2_000.0 if FULL else 400.0
STEADY_S = 20.0 if FULL else 3.0


def steady_then(lake: Lake, runs: list[Traffic], seed: int) -> Traffic:
    traffic = Traffic(lake, RATE, seed=seed).start()
    runs.append(traffic)
    time.sleep(STEADY_S)
    return traffic


def restart_and_reconcile(lake: Lake, runs: list[Traffic], name: str, case: str) -> None:
    lake.start(name)
    restarted = time.monotonic()
    time.sleep(STEADY_S)
    runs[-1].stop()
    reconcile(lake, runs, case, restarted)


@pytest.mark.parametrize("name", [
    "gateway",
    pytest.param("speed-0", marks=pytest.mark.long),
    pytest.param("archive", marks=pytest.mark.long),
    pytest.param("speed-1", marks=pytest.mark.long),
    pytest.param("serving", marks=pytest.mark.long),
])
def test_kill_9_a_process_under_steady_traffic(lake: Lake, runs: list[Traffic],
                                               name: str) -> None:
    steady_then(lake, runs, seed=len(runs) + 1)
    lake.kill(name)
    time.sleep(2)
    restart_and_reconcile(lake, runs, name, f"kill -9 {name}")


def kill_when_writing(lake: Lake, prefix: str, *args: str) -> bool:
    """Start `lambdalake ARGS`, kill it -9 the moment a new object appears under `prefix`;
    False if it finished before writing one."""
    return kill_on_new_object(lake, prefix, lake.cli(*args))


def kill_on_new_object(lake: Lake, prefix: str, process: subprocess.Popen) -> bool:
    """kill -9 `process` and its process group (a driver's JVM and Python) the moment a new
    data object appears under `prefix` (the lease, manifests and run records, named `_…`,
    do not count); False if it finished before writing one."""
    before = set(lake.store.list(prefix))
    while process.poll() is None:
        if any(not key.removeprefix(prefix).startswith("_")
               for key in set(lake.store.list(prefix)) - before):
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.02)
    return False


@pytest.mark.long
@pytest.mark.timeout(1500)  # two Spark runs over every earlier case's events, on two busy cores
@pytest.mark.parametrize("engine", ["duckdb", "spark"])
def test_kill_9_a_batch_run_mid_write(lake: Lake, runs: list[Traffic], engine: str) -> None:
    """The run dies with view files written and nothing published: the previous version
    keeps serving, and the next run publishes in full."""
    traffic = steady_then(lake, runs, seed=len(runs) + 1)
    time.sleep(1.5)  # past a slice boundary: the run has a cut to take
    assert kill_when_writing(lake, "views/", "batch", "run", "--engine", engine)
    killed = time.monotonic()
    lake.run("batch", "run", "--engine", engine)
    traffic.stop()
    reconcile(lake, runs, f"kill -9 batch run ({engine})", killed)


@pytest.mark.long
def test_kill_9_a_compaction_mid_write(lake: Lake, runs: list[Traffic]) -> None:
    traffic = steady_then(lake, runs, seed=len(runs) + 1)
    time.sleep(1.5)
    lake.run("batch", "run")  # compaction works below the serving cut
    assert kill_when_writing(lake, "master/", "compact")
    killed = time.monotonic()
    lake.run("compact")
    traffic.stop()
    reconcile(lake, runs, "kill -9 compaction", killed)


# -- the batch on a standalone Spark cluster (`make test-reliability` and `make test-long`) --

ENTRY_POINT = Path(lambdalake.batch.__file__).parent / "emr_entry.py"


@pytest.fixture(scope="module")
def spark_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SparkCluster]:
    if not shutil.which("java"):
        pytest.skip("needs Java 17+ (Spark)")
    with SparkCluster(tmp_path_factory.mktemp("spark-cluster")) as running:
        yield running


def submit_batch_job(lake: Lake, cluster: SparkCluster, name: str) -> subprocess.Popen:
    """The batch job's entry point (the script EMR Serverless runs) spark-submitted to the
    cluster with the lake's settings, its driver here, its executors on the workers; its
    output in `name`.out and .log under the lake's folder."""
    command = submit_command(cluster.master_url, cluster.executor_conf, [str(ENTRY_POINT)])
    with open(lake.root / f"{name}.out", "wb") as out, open(lake.root / f"{name}.log", "wb") as log:
        return subprocess.Popen(command, env=spark_env(lake.env), cwd=lake.root, stdout=out,
                                stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)


def assert_spark_version_equals_duckdb(lake: Lake, version: str) -> None:
    """The version the rerun published is Spark's, and each of its views equals the DuckDB
    engine's over the same master objects and cut (the reconciliation then checks DuckDB's
    against the recompute from the raw events)."""
    manifest = catalog.current(lake.store)
    assert manifest is not None and manifest.version == version and manifest.engine == "spark"
    project = load_project(lake.settings.project)
    assert set(manifest.views) == set(project.views)
    for name, table in published(lake.store, manifest).items():
        view = project.views[name]
        keys = master.data_keys(lake.store, view.event_type)
        assert_same_view(view, table,
                         DuckDBEngine().compute(project, view, lake.store, keys, manifest.cut))


@pytest.mark.long
@pytest.mark.spark
@pytest.mark.timeout(1500)  # a cluster, two jobs and a master restart on two busy cores
def test_kill_9_a_batch_run_on_the_spark_cluster_mid_write(
    lake: Lake, runs: list[Traffic], spark_cluster: SparkCluster
) -> None:
    """The job's driver killed -9 once its view files are being written: nothing of it is
    served (the version before stays current, on S3 and in the API). The rerun, its master
    also killed -9 while it runs, publishes a version equal to DuckDB's at the same cut: a
    standalone master only hands out executors, and a running application keeps them (as
    Spark's documentation says of a master failover); the master comes back for later jobs."""
    traffic = steady_then(lake, runs, seed=len(runs) + 1)
    lake.run("batch", "run")  # a version to keep serving while the job dies
    before = catalog.current(lake.store)
    assert before is not None
    time.sleep(1.5)  # past a slice boundary: the job has a newer cut to take
    assert kill_on_new_object(lake, "views/", submit_batch_job(lake, spark_cluster, "spark-killed"))
    killed = time.monotonic()
    after = catalog.current(lake.store)
    assert after is not None and after.version == before.version, "a killed run published"
    assert lake.answer("pageviews_by_url_hour", "url", "pageviews")[1]["batch_version"] \
        == before.version

    time.sleep(lake.settings.batch_lease_seconds)  # the killed driver's lease expires
    killer = threading.Thread(target=spark_cluster.kill_master_once_running, args=(300.0,))
    killer.start()
    rerun = submit_batch_job(lake, spark_cluster, "spark-rerun")
    rerun.wait(900)
    killer.join()
    spark_cluster.start_master()  # its workers register again meanwhile (a minute or more:
    # after a long outage a worker retries only every 60-90 s)
    assert rerun.returncode == 0, lake.logs()
    version = json.loads((lake.root / "spark-rerun.out").read_text().splitlines()[-1])["version"]
    assert_spark_version_equals_duckdb(lake, version)
    traffic.stop()
    reconcile(lake, runs, "kill -9 batch run (Spark cluster), master killed", killed)
    spark_cluster.wait_for_workers()
