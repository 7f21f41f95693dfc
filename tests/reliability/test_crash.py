"""kill -9, in turn, each process of a deployment during steady traffic, then its restart:
every case ends with the reconciliation (harness.reconcile). Which cases `make test` runs:
those not marked `long` (the gateway's and a speed driver's); `make test-reliability` runs all,
longer and faster."""

from __future__ import annotations

import signal
import time

import pytest
from harness import FULL, Lake, Traffic, reconcile

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
    before = set(lake.store.list(prefix))
    process = lake.cli(*args)
    while process.poll() is None:
        if set(lake.store.list(prefix)) - before:
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.02)
    return False


@pytest.mark.long
@pytest.mark.timeout(900)  # a Spark run on two busy cores takes minutes
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
