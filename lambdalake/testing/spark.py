"""A real standalone Spark cluster (a master and workers) and a Spark Connect server, for
tests and benchmarks.

No Docker: every process is started from the installed pyspark wheel (`spark-class`,
`spark-submit`) with Java 17, bound to 127.0.0.1 on free ports, its logs and work files in
one folder. Executors are small (one core, 512 MB by default): each JVM takes 10-30 s to
start on two cores and a few hundred MB.

    with SparkCluster(folder) as cluster, SparkConnect(cluster) as connect:
        SparkSession.builder.remote(connect.url)   # or .master(cluster.master_url)

``python -m lambdalake.testing.spark`` starts a cluster and a Connect server, prints their
URLs and waits for Ctrl-C (or SIGTERM).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

from lambdalake.resources import run_script
from lambdalake.testing import free_port

CONNECT_SERVER = "org.apache.spark.sql.connect.service.SparkConnectServer"
QUICK_JVM = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC"
CONNECT_MODE = ("SPARK_CONNECT_MODE_ENABLED", "SPARK_REMOTE", "SPARK_LOCAL_REMOTE")
# The master's and workers' heap (spark-submit takes it for a Connect server too: not there).
DAEMON = {"SPARK_DAEMON_MEMORY": "256m"}


def s3a_jars() -> list[str]:
    """hadoop-aws and the AWS SDK matching pyspark's Hadoop (`scripts/spark_jars.sh`)."""
    return run_script("spark_jars.sh").split(",")


def spark_home() -> Path:
    """The Spark distribution inside the installed pyspark wheel (bin/, jars/)."""
    import pyspark

    return Path(pyspark.__file__).parent


def spark_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of every Spark process: loopback only, this interpreter for Python,
    and never Spark Connect mode (pyspark sets it in the environment of a process that opened
    a Connect session; a driver inheriting it would look for a Connect server)."""
    inherited = {k: v for k, v in os.environ.items() if k not in CONNECT_MODE}
    return inherited | {
        "SPARK_HOME": str(spark_home()),
        "SPARK_LOCAL_IP": "127.0.0.1",
        "SPARK_DAEMON_JAVA_OPTS": QUICK_JVM,
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
    } | dict(extra or {})


def conf_args(conf: dict[str, str]) -> list[str]:
    return [arg for name, value in conf.items() for arg in ("--conf", f"{name}={value}")]


class SparkProcess:
    """One JVM started by a Spark script, in a session of its own, logging to a file."""

    def __init__(
        self, name: str, command: Sequence[str], folder: Path, env: dict[str, str] | None = None
    ):
        self.name, self.log_path = name, folder / f"{name}.log"
        self._log: IO[bytes] = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            list(command), stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=spark_env(env), cwd=folder, start_new_session=True,
        )

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def wait_for(self, ready: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if not self.running:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode})\n{self.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} not ready after {timeout:.0f} s\n{self.tail()}")
            time.sleep(0.5)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the process group (a script's JVM and what it started); wait for it."""
        if self.running:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()

    def tail(self, lines: int = 25) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return f"--- last lines of {self.log_path} ---\n" + "\n".join(text)


class SparkCluster:
    """A standalone master and `workers` workers of `worker_cores` and `worker_memory` each.

    `executor_conf` sizes an application to fit: one core and `executor_memory` per executor,
    at most one executor per worker. `kill_master` / `start_master` stop and restart the
    master on the same port, as an outage would.
    """

    def __init__(
        self,
        folder: Path | None = None,
        *,
        workers: int = 2,
        worker_cores: int = 1,
        worker_memory: str = "1g",
        executor_memory: str = "512m",
        startup_timeout: float = 180.0,
    ):
        self.folder = Path(folder or tempfile.mkdtemp(prefix="lambdalake-spark-"))
        self.workers, self.worker_cores, self.worker_memory = workers, worker_cores, worker_memory
        self.executor_memory, self.startup_timeout = executor_memory, startup_timeout
        self.port, self.ui_port = free_port(), free_port()
        self.master: SparkProcess | None = None
        self.worker_processes: list[SparkProcess] = []

    @property
    def master_url(self) -> str:
        return f"spark://127.0.0.1:{self.port}"

    @property
    def executor_conf(self) -> dict[str, str]:
        """An application's settings on this cluster (a driver on 127.0.0.1, small executors)."""
        return {
            "spark.executor.cores": "1",
            "spark.executor.memory": self.executor_memory,
            "spark.cores.max": str(self.workers),
            "spark.driver.host": "127.0.0.1",
            "spark.driver.bindAddress": "127.0.0.1",
            "spark.ui.enabled": "false",
            "spark.sql.shuffle.partitions": str(self.workers),
            # The s3a jars from this machine's disk (every worker is here): shipping the AWS
            # SDK bundle (700 MB) to each executor would cost more than the job.
            "spark.executor.extraClassPath": os.pathsep.join(s3a_jars()),
            # Short jobs on two shared cores: the quick JIT only, the serial collector.
            "spark.executor.extraJavaOptions": QUICK_JVM,
            "spark.driver.extraJavaOptions": QUICK_JVM,
        }

    def __enter__(self) -> SparkCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> SparkCluster:
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            self.start_master()
            self.worker_processes = [self._worker(n) for n in range(self.workers)]
            self.master_process.wait_for(self._all_workers_alive, self.startup_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def master_process(self) -> SparkProcess:
        if self.master is None:
            raise RuntimeError("the Spark master is not started")
        return self.master

    def start_master(self) -> None:
        """Start the master (again, after `kill_master`) and wait until it answers."""
        command = [
            str(spark_home() / "bin" / "spark-class"), "org.apache.spark.deploy.master.Master",
            "--host", "127.0.0.1", "--port", str(self.port), "--webui-port", str(self.ui_port),
        ]
        self.master = SparkProcess("master", command, self.folder, DAEMON)
        self.master.wait_for(lambda: self.status() is not None, self.startup_timeout)

    def kill_master(self) -> None:
        """kill -9 the master; workers and running executors stay."""
        self.master_process.kill()

    def kill_master_once_running(self, timeout: float) -> None:
        """kill -9 the master once an application runs on the cluster (AssertionError when
        none does within `timeout` seconds)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (self.status() or {}).get("activeapps"):
                self.kill_master()
                return
            time.sleep(0.2)
        raise AssertionError("the job never started on the cluster")

    def _worker(self, n: int) -> SparkProcess:
        command = [
            str(spark_home() / "bin" / "spark-class"), "org.apache.spark.deploy.worker.Worker",
            "--host", "127.0.0.1", "--webui-port", str(free_port()),
            "--cores", str(self.worker_cores), "--memory", self.worker_memory,
            "--work-dir", str(self.folder / f"worker-{n}"), self.master_url,
        ]
        return SparkProcess(f"worker-{n}", command, self.folder, DAEMON)

    def status(self) -> dict | None:
        """The master's JSON status (workers, applications), None while it does not answer."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ui_port}/json/", timeout=2) as r:
                return json.load(r)
        except OSError:
            return None

    def _all_workers_alive(self) -> bool:
        status = self.status() or {}
        alive = [w for w in status.get("workers", []) if w.get("state") == "ALIVE"]
        return len(alive) >= self.workers

    def wait_for_workers(self) -> None:
        """Until every worker has registered (again, with a restarted master)."""
        self.master_process.wait_for(self._all_workers_alive, self.startup_timeout)

    def stop(self) -> None:
        for process in [*self.worker_processes, *([self.master] if self.master else [])]:
            process.kill(signal.SIGTERM)
        self.worker_processes, self.master = [], None


class SparkConnect:
    """A Spark Connect server: a driver on `cluster` (or `local[2]`) serving `sc://` clients,
    with the s3a jars on its class path."""

    def __init__(
        self, cluster: SparkCluster | None, folder: Path | None = None,
        *, startup_timeout: float = 180.0,
    ):
        self.cluster, self.startup_timeout = cluster, startup_timeout
        self.folder = Path(folder or (cluster.folder if cluster else tempfile.mkdtemp()))
        self.port = free_port()
        self.process: SparkProcess | None = None

    @property
    def url(self) -> str:
        return f"sc://127.0.0.1:{self.port}"

    def __enter__(self) -> SparkConnect:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> SparkConnect:
        master, conf = ("local[2]", {})
        if self.cluster is not None:
            master, conf = self.cluster.master_url, self.cluster.executor_conf
        conf |= {
            "spark.connect.grpc.binding.address": "127.0.0.1",
            "spark.connect.grpc.binding.port": str(self.port),
            "spark.driver.memory": "768m",  # Spark refuses a driver under 450 MB
        }
        command = submit_command(master, conf, ["--class", CONNECT_SERVER, "spark-internal"])
        self.process = SparkProcess("connect", command, self.folder)
        try:
            self.process.wait_for(self._listening, self.startup_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill(signal.SIGTERM)
            self.process = None


def submit_command(master: str, conf: dict[str, str], application: Sequence[str]) -> list[str]:
    """`spark-submit` of `application` (a script and its arguments, or `--class` …) to
    `master` in client mode, with the s3a jars on the driver's class path."""
    return [
        str(spark_home() / "bin" / "spark-submit"), "--master", master,
        "--driver-class-path", os.pathsep.join(s3a_jars()), *conf_args(conf), *application,
    ]


def spark_submit(
    cluster: SparkCluster, application: Sequence[str], *, conf: dict[str, str] | None = None,
    env: dict[str, str] | None = None, timeout: float = 600.0,
) -> subprocess.CompletedProcess[str]:
    """Run `application` (a script and its arguments) on `cluster` with spark-submit, in
    client mode: the driver runs here, its executors on the workers. Output is captured."""
    command = submit_command(cluster.master_url, cluster.executor_conf | dict(conf or {}),
                             application)
    return subprocess.run(command, capture_output=True, text=True, env=spark_env(env),
                          timeout=timeout, stdin=subprocess.DEVNULL)


def main() -> None:
    """Start a cluster and a Connect server, print their URLs, wait for Ctrl-C or SIGTERM."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stops them on the way out
    started = time.monotonic()
    with SparkCluster() as cluster, SparkConnect(cluster) as connect:
        print(cluster.master_url, connect.url, flush=True)
        print(f"Spark ready in {time.monotonic() - started:.0f} s (logs: {cluster.folder}); "
              "Ctrl-C to stop", file=sys.stderr)
        try:
            while cluster.master_process.running:
                time.sleep(1)
        except KeyboardInterrupt:
            return
    raise SystemExit(1)


if __name__ == "__main__":
    main()
