"""End to end on the embedded default: `lambdalake up` as a real process, HTTP in and out.

The answers are checked against an independent recompute from the events the test sent.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import psycopg
import pytest

from lambdalake.eventlog import now_ms
from lambdalake.producer import ProduceStats, send_batch
from lambdalake.synthetic import WebAnalyticsStream
from lambdalake.testing import free_port

BIN = Path(sys.executable).parent


class Flow:
    """`lambdalake up` in `home`, run by the `lambdalake` command in `bin_dir`."""

    def __init__(self, home: Path, bin_dir: Path = BIN):
        self.bin = bin_dir
        self.env = os.environ | {
            "LAMBDALAKE_HOME": str(home),
            "LAMBDALAKE_GATEWAY_PORT": str(free_port()),
            "LAMBDALAKE_API_PORT": str(free_port()),
            "LAMBDALAKE_PG_PORT": str(free_port()),
            "LAMBDALAKE_SLICE_SECONDS": "1",
            "LAMBDALAKE_BATCH_INTERVAL_SECONDS": "3600",
        }
        self.gateway = f"http://127.0.0.1:{self.env['LAMBDALAKE_GATEWAY_PORT']}/events"
        self.api = f"http://127.0.0.1:{self.env['LAMBDALAKE_API_PORT']}"
        self.process: subprocess.Popen | None = None
        self.log_path = home / "up.log"  # `up`'s output, to read when a test fails
        self.preexec_fn: Callable[[], None] | None = None  # run in the child before `up`

    def spawn(self, *args: str) -> None:
        """`lambdalake up` started, not waited for; its output appended to `log_path`."""
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [self.bin / "lambdalake", "up", *args], env=self.env,
                cwd=self.env["LAMBDALAKE_HOME"], stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=self.preexec_fn,
            )

    def start(self, *args: str) -> None:
        self.spawn(*args)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.api}/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        raise TimeoutError("lambdalake up did not become ready")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([self.bin / "lambdalake", *args], env=self.env, capture_output=True,
                              text=True, timeout=120, cwd=self.env["LAMBDALAKE_HOME"])

    def totals(self, view: str, dim: str) -> dict[str, int | float]:
        reply = httpx.get(f"{self.api}/views/{view}", params={"bucket": "total"}, timeout=30)
        reply.raise_for_status()
        return reply.json()

    def wait_for(self, expected: dict, view: str, dim: str, metric: str, seconds: float = 20):
        answer: dict = {}
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            answer = {r[dim]: r[metric] for r in self.totals(view, dim)["rows"]}
            if answer == expected:
                return answer
            time.sleep(0.1)
        return answer


@pytest.fixture
def flow(tmp_path: Path):
    flow = Flow(tmp_path)
    yield flow
    flow.stop()


def recompute(events: list[dict]) -> tuple[Counter, Counter]:
    unique = {e["event_id"]: e for e in events}.values()
    pageviews = Counter(e["url"] for e in unique if e["type"] == "pageview")
    orders = Counter(e["sku"] for e in unique if e["type"] == "purchase")
    return pageviews, orders


def send_synthetic(flow: Flow, n: int, seed: int) -> list[dict]:
    """N synthetic events sent to the gateway, every one accepted."""
    stream = WebAnalyticsStream(seed=seed)
    events = [stream.event(now_ms()) for _ in range(n)]
    stats = ProduceStats()
    send(flow, events, stats)
    assert stats.accepted == len(events)
    return events


def batch_run(flow: Flow, *options: str) -> dict:
    """`lambdalake batch run`; the pageviews answer once the serving layer serves it. A run
    refused because an idle partition has no watermark yet (the archiver seals one within
    about a second of starting) is run again, as an operator would."""
    deadline = time.monotonic() + 30
    while True:
        run = flow.cli("batch", "run", *options)
        if "no archive watermark yet" not in run.stderr or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert run.returncode == 0, run.stderr
    answer = first_answer_from(flow, run.stdout.split()[1])
    assert answer["freshness"]["cut"] is not None
    return answer


def first_answer_from(flow: Flow, version: str) -> dict:
    """The first pageviews answer the serving layer gives from this batch version."""
    deadline = time.monotonic() + 10
    answer = flow.totals("pageviews_by_url_hour", "url")
    while answer["freshness"]["batch_version"] != version and time.monotonic() < deadline:
        time.sleep(0.1)  # the serving layer picks a new version up within its poll interval
        answer = flow.totals("pageviews_by_url_hour", "url")
    assert answer["freshness"]["batch_version"] == version
    return answer


def send(flow: Flow, events: list[dict], stats: ProduceStats) -> None:
    with httpx.Client(timeout=30) as client:
        for start in range(0, len(events), 200):
            send_batch(client, flow.gateway, events[start : start + 200], stats, attempts=60)


def test_events_show_up_within_a_second_and_survive_a_batch_run(flow: Flow) -> None:
    flow.start()
    pageviews, orders = recompute(send_synthetic(flow, 3_000, seed=7))

    started = time.monotonic()
    assert flow.wait_for(dict(pageviews), "pageviews_by_url_hour", "url", "pageviews") == pageviews
    assert time.monotonic() - started < 1.5

    time.sleep(1.5)  # let the archiver pass a slice boundary
    answer = batch_run(flow)
    assert {r["url"]: r["pageviews"] for r in answer["rows"]} == pageviews
    assert flow.wait_for(dict(orders), "revenue_by_sku_day", "sku", "orders") == orders

    # the PostgreSQL endpoint `up` starts beside the API answers the same, its loop healthy
    with psycopg.connect(host="127.0.0.1", port=int(flow.env["LAMBDALAKE_PG_PORT"]),
                         user="anyone", dbname="lambdalake", autocommit=True) as connection:
        rows = connection.execute("SELECT url, sum(pageviews) FROM pageviews_by_url_hour "
                                  "GROUP BY url").fetchall()
    assert {url: int(total) for url, total in rows} == pageviews
    assert httpx.get(f"{flow.api}/healthz").json()["loops"]["pgwire"] == "ok"


@pytest.mark.kafka
@pytest.mark.skipif(not shutil.which("java"), reason="needs Java 17+")
@pytest.mark.parametrize("engine", ["quix", pytest.param("faust", marks=pytest.mark.long)])
def test_the_same_flow_runs_on_kafka(flow: Flow, kafka_broker, engine: str) -> None:
    """`lambdalake up --bus kafka --bootstrap HOST:PORT`, with either speed driver: events
    sent to the gateway are answered exactly, before and after a batch run."""
    flow.env |= {"LAMBDALAKE_TOPIC": f"flow-{uuid.uuid4().hex[:10]}",
                 "LAMBDALAKE_SPEED_ENGINE": engine}
    flow.start("--bus", "kafka", "--bootstrap", kafka_broker.bootstrap)
    pageviews, orders = recompute(send_synthetic(flow, 2_000, seed=5))
    assert flow.wait_for(dict(pageviews), "pageviews_by_url_hour", "url", "pageviews",
                         seconds=90) == pageviews
    time.sleep(1.5)  # let the archiver pass a slice boundary
    batch_run(flow)
    assert flow.wait_for(dict(pageviews), "pageviews_by_url_hour", "url", "pageviews") == pageviews
    assert flow.wait_for(dict(orders), "revenue_by_sku_day", "sku", "orders") == orders


@pytest.mark.kafka
@pytest.mark.skipif(not shutil.which("java"), reason="needs Java 17+")
@pytest.mark.parametrize("engine", ["quix", pytest.param("faust", marks=pytest.mark.long)])
def test_the_speed_worker_under_up_is_restarted_and_ends_with_it(
    flow: Flow, kafka_broker, engine: str
) -> None:
    """`lambdalake up --bus kafka` restarts its speed worker when it dies: after a kill -9,
    events sent before and after are answered exactly, each counted once. And when `up`
    itself is killed with -9, its worker does not live on."""
    flow.env |= {"LAMBDALAKE_TOPIC": f"flow-{uuid.uuid4().hex[:10]}",
                 "LAMBDALAKE_SPEED_ENGINE": engine}
    flow.start("--bus", "kafka", "--bootstrap", kafka_broker.bootstrap)
    before = send_synthetic(flow, 1_000, seed=8)
    assert flow.wait_for(dict(recompute(before)[0]), "pageviews_by_url_hour", "url",
                         "pageviews", seconds=90) == recompute(before)[0]
    worker = speed_worker(flow)
    os.kill(worker, signal.SIGKILL)
    after = send_synthetic(flow, 1_000, seed=9)
    pageviews, _ = recompute(before + after)
    assert flow.wait_for(dict(pageviews), "pageviews_by_url_hour", "url", "pageviews",
                         seconds=90) == pageviews
    restarted = speed_worker(flow)
    assert restarted != worker
    flow.kill()
    deadline = time.monotonic() + 30
    while is_speed_worker(restarted):
        assert time.monotonic() < deadline, "the speed worker outlived lambdalake up"
        time.sleep(0.1)


def speed_worker(flow: Flow) -> int:
    """The pid of the speed worker process that `lambdalake up` started."""
    assert flow.process is not None
    for task in Path(f"/proc/{flow.process.pid}/task").iterdir():
        for child in map(int, (task / "children").read_text().split()):
            if is_speed_worker(child):
                return child
    raise AssertionError("no speed worker under lambdalake up")


def is_speed_worker(pid: int) -> bool:
    """A live speed worker (a zombie's command line is empty)."""
    try:
        return b"speed." in Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return False


needs_java = pytest.mark.skipif(not shutil.which("java"), reason="needs Java 17+")


@pytest.mark.parametrize("bus", ["embedded", pytest.param("quix", marks=[pytest.mark.kafka,
                                                                          needs_java,
                                                                          pytest.mark.long])])
def test_a_rollback_is_exact_at_once(flow: Flow, request: pytest.FixtureRequest, bus: str) -> None:
    """Two batch runs, more events, then `batch rollback` to the first version: its first
    answer counts every event, those that arrived between the two cuts too."""
    if bus == "quix":
        broker = request.getfixturevalue("kafka_broker")
        flow.env |= {"LAMBDALAKE_TOPIC": f"flow-{uuid.uuid4().hex[:10]}",
                     "LAMBDALAKE_SPEED_ENGINE": "quix"}
        flow.start("--bus", "kafka", "--bootstrap", broker.bootstrap)
    else:
        flow.start()
    sent: list[dict] = []
    versions = []
    for seed in (21, 22, 23):
        sent += send_synthetic(flow, 500, seed)
        pageviews, _ = recompute(sent)
        assert flow.wait_for(dict(pageviews), "pageviews_by_url_hour", "url", "pageviews",
                             seconds=90) == pageviews
        if len(versions) < 2:
            time.sleep(1.5)  # let the archiver pass a slice boundary
            versions.append(batch_run(flow)["freshness"]["batch_version"])
    rolled = flow.cli("batch", "rollback", versions[0])
    assert rolled.returncode == 0, rolled.stderr
    answer = first_answer_from(flow, versions[0])
    assert {r["url"]: r["pageviews"] for r in answer["rows"]} == pageviews


def test_kill_9_mid_produce_loses_nothing_and_counts_once(flow: Flow) -> None:
    flow.start()
    stream = WebAnalyticsStream(seed=11)
    events = [stream.event(now_ms()) for _ in range(6_000)]
    stats = ProduceStats()
    producer = threading.Thread(target=send, args=(flow, events, stats))
    producer.start()
    while stats.accepted < 1_500:
        time.sleep(0.01)
    flow.kill()  # mid-stream: requests in flight are retried with the same event ids
    flow.start()
    producer.join(120)
    assert not producer.is_alive()
    assert stats.acknowledged_ids and set(stats.acknowledged_ids) == {e["event_id"] for e in events}
    pageviews, _ = recompute(events)
    answer = flow.wait_for(dict(pageviews), "pageviews_by_url_hour", "url", "pageviews")
    assert answer == pageviews


def test_cli_errors_are_one_line(flow: Flow) -> None:
    result = flow.cli("query", "pageviews_by_url_hour")
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    result = flow.cli("batch", "rollback", "v-nope")
    assert result.returncode != 0 and result.stderr.startswith("error: ")
