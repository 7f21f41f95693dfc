"""The reliability harness: a deployment's processes started for real (the roles of
`lambdalake up`, each its own OS process, as docker-compose.yml runs them) against a real
Kafka and a real S3 server; steady traffic; kill -9 and restart; and the reconciliation every
case ends with: each acknowledged event in the master dataset exactly once, every answer
equal to the independent recompute. Each case appends its figures to the results file that
`report.py` prints as a table."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import boto3
import httpx
import pyarrow.parquet as pq

from lambdalake.auth import KEY_HEADER
from lambdalake.eventlog import now_ms
from lambdalake.master import data_keys, watermarks
from lambdalake.project import load_project
from lambdalake.settings import Settings
from lambdalake.storage import open_store
from lambdalake.synthetic import WebAnalyticsStream
from lambdalake.testing import free_port

BIN = Path(sys.executable).parent
FULL = os.environ.get("LAMBDALAKE_RELIABILITY") == "full"  # `make test-reliability`
RESULTS = Path(os.environ.get("LAMBDALAKE_RELIABILITY_RESULTS",
                              Path(__file__).resolve().parents[2] / "build/reliability.jsonl"))
SPEED_DRIVERS = 2


class Lake:
    """Every long-running process of a Kafka deployment, by name: `gateway` (the Ingest
    function), `archive` (the Archive mapping), `speed-0`, `speed-1` (Quix drivers in one
    consumer group) and `serving`. Batch runs and compactions are CLI processes."""

    def __init__(self, root: Path, bootstrap: str, s3_endpoint: str, partitions: int = 2,
                 replication: int = 1, with_keys: bool = False):
        self.root = root
        self._cli_runs, self.cli_log = 0, root / "cli.log"
        self.keys = {scope: uuid.uuid4().hex for scope in ("ingest", "query", "admin")} \
            if with_keys else {}
        bucket = f"lake-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
        self.api_port, self.gateway_port = free_port(), free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("LAMBDALAKE_")} | {
            "LAMBDALAKE_BUS": "kafka", "LAMBDALAKE_KAFKA_BOOTSTRAP": bootstrap,
            "LAMBDALAKE_TOPIC": f"rel-{uuid.uuid4().hex[:8]}",
            "LAMBDALAKE_PARTITIONS": str(partitions),
            "LAMBDALAKE_REPLICATION_FACTOR": str(replication),
            "LAMBDALAKE_MIN_INSYNC_REPLICAS": str(min(2, replication)),
            "LAMBDALAKE_STORE": f"s3://{bucket}/lake", "LAMBDALAKE_S3_ENDPOINT_URL": s3_endpoint,
            "LAMBDALAKE_SLICE_SECONDS": "1", "LAMBDALAKE_BATCH_INTERVAL_SECONDS": "3600",
            "LAMBDALAKE_COMPACT_INTERVAL_SECONDS": "3600", "LAMBDALAKE_BATCH_LEASE_SECONDS": "5",
            # the speed layer keeps what the oldest kept version does not cover: two versions
            # bound it to about two batch runs (the load case runs them back to back)
            "LAMBDALAKE_VERSIONS_KEPT": "2",
            "LAMBDALAKE_API_PORT": str(self.api_port), "LAMBDALAKE_PG_PORT": "0",
            "LAMBDALAKE_GATEWAY_PORT": str(self.gateway_port),
        }
        if self.keys:  # a secrets file, as compose mounts it
            secret = root / "api_keys.json"
            secret.write_text(json.dumps([{"key": k, "scopes": [s], "name": s}
                                          for s, k in self.keys.items()]))
            self.env["LAMBDALAKE_API_KEYS_FILE"] = str(secret)
        self.settings = Settings(**{k.removeprefix("LAMBDALAKE_").lower(): v
                                    for k, v in self.env.items() if k.startswith("LAMBDALAKE_")})
        self.store = open_store(self.settings.store_url, self.settings.s3_endpoint_url)
        self.commands = self._commands()
        self.processes: dict[str, subprocess.Popen] = {}
        self.restarts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._watcher = threading.Thread(target=self._restart_exited, daemon=True)

    def _commands(self) -> dict[str, tuple[list[str], dict[str, str]]]:
        up = [str(BIN / "lambdalake"), "up", "--role"]
        speed = [str(BIN / "python"), "-m", "lambdalake.speed.quix"]
        commands = {
            "gateway": ([*up, "functions"], {"LAMBDALAKE_FUNCTIONS": '["Ingest"]'}),
            "archive": ([*up, "functions"], {"LAMBDALAKE_FUNCTIONS": '["Archive"]',
                                             "LAMBDALAKE_GATEWAY_PORT": str(free_port())}),
            "serving": ([*up, "serving"], {}),
        }
        for n in range(SPEED_DRIVERS):  # each its transactional id, as compose's hostnames give
            commands[f"speed-{n}"] = ([*speed, "--worker-id", f"speed-{n}"],
                                      {"LAMBDALAKE_SPEED_METRICS_PORT": str(free_port())})
        return commands

    def headers(self, scope: str) -> dict[str, str]:
        return {KEY_HEADER: self.keys[scope]} if self.keys else {}

    @property
    def gateway(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}/events"

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def start(self, *names: str) -> None:
        for name in names or tuple(self.commands):
            self._spawn(name)
        if not self._watcher.is_alive():
            self._watcher.start()
        self.wait_ready()

    def _spawn(self, name: str) -> None:
        argv, extra = self.commands[name]
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 (the child holds it)
        with self._lock:
            self.processes[name] = subprocess.Popen(
                argv, env=self.env | extra, cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)

    def _restart_exited(self) -> None:
        """Compose's `restart: unless-stopped`: a process that exits by itself (a speed
        driver that lost its partitions in a long outage) is started again."""
        while not self._stopping.wait(1.0):
            with self._lock:
                exited = [n for n, p in self.processes.items() if p.poll() is not None]
            for name in exited:
                self.restarts[name] += 1
                self._spawn(name)

    def wait_ready(self, seconds: float = 120) -> None:
        deadline = time.monotonic() + seconds
        for url in (f"{self.api}/readyz", self.gateway.replace("/events", "/healthz")):
            while not _ok(url):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{url} not ready\n{self.logs()}")
                time.sleep(0.3)

    def kill(self, name: str) -> None:
        """kill -9: no handler runs, nothing is flushed."""
        with self._lock:
            process = self.processes.pop(name)
        process.send_signal(signal.SIGKILL)
        process.wait()

    def stop(self) -> None:
        self._stopping.set()
        for process in self.processes.values():
            process.terminate()
        for process in self.processes.values():
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
        self.processes.clear()

    def cli(self, *args: str) -> subprocess.Popen:
        """A CLI process (`batch run`, `compact`, `rebuild`) on the lake, not waited for. Its
        output goes to `cli-NN-….out` and its log to `….log` in the lake's folder: a pipe
        nobody reads while it runs would block it once full, and the log tells where a slow
        run spent its time."""
        self._cli_runs += 1
        self.cli_log = self.root / f"cli-{self._cli_runs:02d}-{'-'.join(args[:2])}.log"
        with self.cli_log.with_suffix(".out").open("wb") as out, self.cli_log.open("wb") as log:
            return subprocess.Popen([str(BIN / "lambdalake"), *args], env=self.env, cwd=self.root,
                                    stdout=out, stderr=log, stdin=subprocess.DEVNULL,
                                    start_new_session=True)

    def run(self, *args: str, attempts: int = 10) -> str:
        """A CLI command run to success, its output: retried while a killed run's lease
        expires."""
        for _ in range(attempts):
            process = self.cli(*args)
            try:
                process.wait(timeout=600)
            finally:  # a test timed out meanwhile: the run must not outlive it, lease held
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
            if process.returncode == 0:
                return self.cli_log.with_suffix(".out").read_text()
            time.sleep(2)
        raise AssertionError(f"lambdalake {' '.join(args)} kept failing:\n"
                             f"{self.cli_log.read_text(errors='replace')[-4000:]}")

    def memory_mb(self) -> dict[str, float]:
        """Resident memory of each running process (its children included)."""
        return {name: _rss_mb(p.pid) for name, p in self.processes.items()
                if p.poll() is None}

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}"
                         for p in sorted(self.root.glob("*.log")))

    # -- what the lake holds ---------------------------------------------------------------

    def master_ids(self) -> Counter[str]:
        """Every event_id in the master dataset, with how many bus records (partition,
        offset) carry it. A record in two objects (an archive batch retried with another
        range after a bus outage) is one record: readers dedup it, as any copy of an id."""
        records: set[tuple[str, int, int]] = set()
        for event_type in load_project(self.settings.project).schemas:
            for key in data_keys(self.store, event_type):
                table = pq.read_table(io.BytesIO(self.store.get(key)),
                                      columns=["event_id", "partition", "offset"])
                records.update(zip(*(table.column(c).to_pylist()
                                     for c in ("event_id", "partition", "offset")),
                                   strict=True))
        return Counter(event_id for event_id, _, _ in records)

    def holding(self, event_id: str) -> list[str]:
        """The master objects holding a row of `event_id` (for failure messages)."""
        return [key for event_type in load_project(self.settings.project).schemas
                for key in data_keys(self.store, event_type)
                if event_id in pq.read_table(io.BytesIO(self.store.get(key)),
                                             columns=["event_id"]).column("event_id").to_pylist()]

    def archived_past(self, arrival_ms: int) -> bool:
        marks = watermarks(self.store)
        return len(marks) == self.settings.partitions and all(
            m["watermark"] > arrival_ms for m in marks.values())

    def answer(self, view: str, dim: str, metric: str) -> tuple[dict[str, Any], dict]:
        reply = httpx.get(f"{self.api}/views/{view}", params={"bucket": "total"}, timeout=30,
                          headers=self.headers("query"))
        reply.raise_for_status()
        body = reply.json()
        return {r[dim]: r[metric] for r in body["rows"]}, body["freshness"]


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def _rss_mb(pid: int) -> float:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    pids = [pid, *map(int, children.read_text().split())] if children.exists() else [pid]
    total = 0
    for each in pids:
        status = Path(f"/proc/{each}/status")
        if status.exists():
            line = next((x for x in status.read_text().splitlines() if x.startswith("VmRSS")),
                        "VmRSS: 0 kB")  # an exited process, not yet reaped, has none
            total += int(line.split()[1])
    return total / 1024


@dataclass(repr=False)  # its sets change while it runs
class Traffic:
    """A steady producer: batches of synthetic events at `rate` events/s to the gateway,
    each batch resent as it was (same ids) until a 202. Every answer is checked: a 503 must
    carry Retry-After and claim nothing accepted."""

    lake: Lake
    rate: float
    seed: int = 1
    batch: int = 100
    events: dict[str, dict] = field(default_factory=dict)  # every event sent, by id
    acknowledged: set[str] = field(default_factory=set)
    resent: set[str] = field(default_factory=set)  # ids sent more than once (retries):
    # the master dataset may hold them twice, the batch layer counts them once
    refused_503: int = 0
    five_xx: list[str] = field(default_factory=list)  # a 5xx that is not a proper 503
    first_ack_ms: int = 0
    last_ack_ms: int = 0

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)
        self._stream = WebAnalyticsStream(seed=self.seed)

    def start(self) -> Traffic:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(600)
        assert not self._thread.is_alive(), "the producer hung"

    def _run(self) -> None:
        with httpx.Client(timeout=30, headers=self.lake.headers("ingest")) as client:
            while not self._stop.is_set():
                began = time.monotonic()
                self.send([self._stream.event(now_ms()) for _ in range(self.batch)], client)
                time.sleep(max(0.0, self.batch / self.rate - (time.monotonic() - began)))

    def send(self, batch: list[dict], client: httpx.Client) -> None:
        """One batch, resent until acknowledged (it is never given up: a test stops only
        between batches)."""
        for event in batch:  # the synthetic stream repeats some events, as producers retry
            if event["event_id"] in self.events:
                self.resent.add(event["event_id"])
            self.events[event["event_id"]] = event
        for attempt in range(10_000):
            if attempt:
                self.resent.update(e["event_id"] for e in batch)
            try:
                reply = client.post(self.lake.gateway, json={"events": batch})
            except httpx.TransportError:
                time.sleep(0.2)  # the gateway is down: resend once it is back
                continue
            if reply.status_code == 202:
                self.acknowledged.update(e["event_id"] for e in batch)
                self.last_ack_ms = now_ms()
                self.first_ack_ms = self.first_ack_ms or self.last_ack_ms
                return
            self.check_refusal(reply)
            time.sleep(0.2)

    def check_refusal(self, reply: httpx.Response) -> None:
        body = reply.json()
        if reply.status_code == 503 and reply.headers.get("retry-after") and \
                body.get("accepted") == 0:
            self.refused_503 += 1
        else:
            self.five_xx.append(f"{reply.status_code}: {reply.text[:200]}")


def recompute(events: list[dict]) -> tuple[Counter, Counter]:
    """The answers from the raw events alone: pageviews by url, orders by sku (by id once)."""
    unique = {e["event_id"]: e for e in events}.values()
    return (Counter(e["url"] for e in unique if e["type"] == "pageview"),
            Counter(e["sku"] for e in unique if e["type"] == "purchase"))


def acknowledging_s(traffic: Traffic) -> float:
    """From the first acknowledgement to the last (at least a millisecond)."""
    return max(traffic.last_ack_ms - traffic.first_ack_ms, 1) / 1000


def ours(answer: dict[str, Any], expected: Counter, shared: bool) -> dict[str, Any]:
    return {k: v for k, v in answer.items() if k in expected} if shared else answer


@dataclass
class Figures:
    case: str
    produced: int
    acknowledged: int
    archived: int
    counted: int
    lost: int
    duplicated: int
    five_xx: int
    recovery_s: float
    refused_503: int = 0
    max_rss_mb: float = 0.0
    acknowledged_per_s: float = 0.0  # the rate reached (the offered one is in the case's name)

    def record(self) -> None:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with RESULTS.open("a") as out:
            out.write(json.dumps(asdict(self)) + "\n")


def reconcile(lake: Lake, runs: list[Traffic], case: str, since: float,
              seconds: float = 180, max_rss_mb: float = 0.0, shared: bool = False) -> Figures:
    """After the traffic stopped: wait until the archive passed the last acknowledgement and
    the serving answers equal the recompute of every event acknowledged so far (`runs`: each
    traffic run the lake has had; the last is this case's); publish a batch version; check
    that answers still equal it, and that each acknowledged event is in the master dataset
    exactly once. `since`: when the fault ended (recovery is measured from it). `shared`:
    other clients sent events too (hostile input): only the traffic's groups are compared."""
    acknowledged = set().union(*(t.acknowledged for t in runs))
    resent = set().union(*(t.resent for t in runs))
    events = {i: e for t in runs for i, e in t.events.items()}
    pageviews, orders = recompute([events[i] for i in acknowledged])
    last_ack = max(t.last_ack_ms for t in runs)
    deadline = time.monotonic() + seconds
    answer: dict[str, Any] = {}
    while time.monotonic() < deadline:
        answer = ours(lake.answer("pageviews_by_url_hour", "url", "pageviews")[0],
                      pageviews, shared)
        if answer == pageviews and lake.archived_past(last_ack + 1000):
            break
        time.sleep(0.5)
    recovery_s = time.monotonic() - since
    version = lake.run("batch", "run").split()[1]
    served = time.monotonic() + 60  # from the publish: the run may outlast `deadline`
    batch_pageviews, freshness = lake.answer("pageviews_by_url_hour", "url", "pageviews")
    while freshness.get("batch_version") != version and time.monotonic() < served:
        time.sleep(0.2)
        batch_pageviews, freshness = lake.answer("pageviews_by_url_hour", "url", "pageviews")
    batch_pageviews = ours(batch_pageviews, pageviews, shared)
    batch_orders = ours(lake.answer("revenue_by_sku_day", "sku", "orders")[0], orders, shared)
    master = lake.master_ids()
    lost = acknowledged - set(master)
    doubled = {i for i, n in master.items() if n > 1 and i not in resent}
    expected = sum(pageviews.values()) + sum(orders.values())
    counted = sum(batch_pageviews.values()) + sum(batch_orders.values())
    over = max(0, counted - expected)
    this = runs[-1]
    # this case's share of the answers: what they count beyond the earlier runs' events
    earlier = expected - len(this.acknowledged)
    figures = Figures(case, len(this.events), len(this.acknowledged),
                      len(this.acknowledged & set(master)), counted - earlier, len(lost),
                      len(doubled) + over, sum(len(t.five_xx) for t in runs),
                      round(recovery_s, 1), this.refused_503, round(max_rss_mb, 1),
                      round(len(this.acknowledged) / acknowledging_s(this)))
    figures.record()
    print(figures)
    assert not this.five_xx, this.five_xx[:3]
    assert not lost, f"{len(lost)} acknowledged events not in the master dataset"
    assert not doubled, (f"{len(doubled)} events more than once in the master dataset, e.g. "
                         f"in {lake.holding(next(iter(doubled)))}")
    assert answer == pageviews, f"the real-time answer never matched\n{lake.logs()}"
    assert freshness["batch_version"] == version
    assert batch_pageviews == pageviews and batch_orders == orders
    return figures
