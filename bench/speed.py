"""Speed-layer throughput and freshness on a real Kafka broker (started here).

One topic of N events (the example project's synthetic stream, 4 partitions), read by:
- the reference: the faster of two plain Python loops that only read and decode (orjson)
  every record: confluent-kafka (librdkafka, as the Quix driver) consuming 10,000 at a time,
  and aiokafka's `getmany`;
- the Quix driver (speed/quix.py) folding the whole example project (its 4 views: counts,
  sums, HLL, KLL and Theta sketches) exactly once;
- the Faust driver (speed/faust_app.py), exactly once, and a Faust agent that only counts,
  each over the first `--faust-events` (100,000) of them;
Each as events/s and as a ratio. Then freshness as a user sees it: `lambdalake up` on this
broker (the default speed driver), a steady 5,000 events/s sent to the gateway over HTTP
by 4 clients at once (each a process of its own; a refused or lost request is counted and sent
again), and a probe event every 50 ms: from the gateway's 202 for
`POST /events` to the first `GET /views/pageviews_by_url_hour` answer on the API that
counts it. A probe never counted
is a miss, an infinite delay in the percentiles (so p99 is infinite, null in the JSON,
above 1% misses).

Every figure is the median of 3 runs (`--runs`), with its min and max under `runs`.

    .venv/bin/python bench/speed.py [--events 500000] [--runs 3] [--faust-events 100000]
    .venv/bin/python bench/speed.py --freshness-only [--runs 1] [--rate 5000]

`--freshness-only` skips the throughput parts and also says where the probes' delay went:
from the gateway's produce to the speed worker's realtime record (both Kafka timestamps),
from that record to the first answer counting the probe (the transaction's commit, the
serving feed, the query), and the gateway's own share (its produce to its 202).

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from multiprocessing.synchronize import Event as ProcessEvent
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import orjson
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from lambdalake.example import project
from lambdalake.kafka_topics import ensure_bus_topics, realtime_topic, topic_specs
from lambdalake.settings import Settings
from lambdalake.storage import open_store
from lambdalake.synthetic import WebAnalyticsStream
from lambdalake.testing.kafka import KafkaBroker

DEFAULT_ENGINE = "quix"
PARTITIONS = 4
FRESHNESS_RATE = 5_000
LOAD_SENDERS = 4  # HTTP clients sending the steady load at once
FRESHNESS_SECONDS = 15  # per run
PROBE_EVERY_S = 0.05
ANSWER_MS: list[float] = []  # how long each GET of the watched view took
VISIBLE_WITHIN_S = 10.0
SETTLE_WITHIN_S = 180.0  # a probe not counted by then is a miss
PROBED_VIEW = "pageviews_by_url_hour"
FRESH_TOPIC = "bench.fresh"
NOOP_FAUST = '''
import json, sys, time
import faust
bootstrap, topic, n, datadir, app_id = sys.argv[1:6]
n = int(n)
sys.argv = [sys.argv[0], "worker", "--without-web", "--loglevel", "warn"]
app = faust.App(app_id, broker=f"kafka://{bootstrap}", web_enabled=False,
                topic_allow_declare=False, topic_disable_leader=True,
                consumer_auto_offset_reset="earliest", datadir=datadir)
seen = {"n": 0, "first": 0.0}
@app.agent(app.topic(topic, key_serializer="raw", value_serializer="raw"))
async def count(stream):
    async for _ in stream:
        seen["first"] = seen["first"] or time.perf_counter()
        seen["n"] += 1
        if seen["n"] == n:
            print(json.dumps({"seconds": time.perf_counter() - seen["first"]}), flush=True)
app.main()
'''


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def produce(bootstrap: str, topic: str, n: int) -> None:
    stream = WebAnalyticsStream(seed=1)
    now = int(time.time() * 1000)
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 50,
                         "enable.idempotence": True})
    for _ in range(n):
        event = stream.event(now)
        while True:
            try:
                producer.produce(topic, json.dumps(event).encode(), event["event_id"].encode())
                break
            except BufferError:
                producer.poll(0.1)
    producer.flush(120)


# -- the references: read and decode, nothing else --------------------------------------------


def raw_confluent(bootstrap: str, topic: str, n: int) -> float:
    """librdkafka in batches, with the Quix driver's fetch settings."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": uuid.uuid4().hex,
                         "auto.offset.reset": "earliest", "enable.auto.commit": False,
                         "fetch.wait.max.ms": 50, "max.partition.fetch.bytes": 8 << 20,
                         "queued.min.messages": 1_000_000, "fetch.max.bytes": 64 << 20})
    consumer.subscribe([topic])
    read, started = 0, 0.0
    loads = orjson.loads
    while read < n:
        messages = consumer.consume(10_000, 1.0)
        if messages and not started:
            started = time.perf_counter()
        for message in messages:
            loads(message.value())
        read += len(messages)
    elapsed = time.perf_counter() - started
    consumer.close()
    return n / elapsed


async def raw_aiokafka(bootstrap: str, topic: str, n: int) -> float:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=uuid.uuid4().hex,
                                auto_offset_reset="earliest", enable_auto_commit=False,
                                max_partition_fetch_bytes=8 << 20)
    await consumer.start()
    read, started = 0, 0.0
    loads = orjson.loads
    while read < n:
        batches = await consumer.getmany(timeout_ms=1000, max_records=10_000)
        if batches and not started:
            started = time.perf_counter()
        for records in batches.values():
            for record in records:
                loads(record.value)
            read += len(records)
    elapsed = time.perf_counter() - started
    await consumer.stop()
    return n / elapsed


# -- the drivers ------------------------------------------------------------------------------


def quix_eps(settings: Settings, n: int, run: int) -> float:
    from lambdalake.speed.quix import QuixSpeed, group_id

    reset_speed_state(settings, group_id(settings))
    speed = QuixSpeed(settings, project, open_store(settings.store_url), f"bench-{run}")
    stop = threading.Event()
    thread = threading.Thread(target=speed.run, args=(stop,))
    thread.start()
    consumed = lambda: sum(p.next_offset or 0 for p in list(speed.parts.values()))  # noqa: E731
    while consumed() == 0:
        time.sleep(0.01)
    started, first = time.perf_counter(), consumed()
    while consumed() < n:
        time.sleep(0.01)
    elapsed = time.perf_counter() - started
    stop.set()
    thread.join()
    return (n - first) / elapsed


def committed(watcher: Consumer, topic: str) -> int:
    """Offsets the watcher's consumer group has committed, summed over the partitions."""
    tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    return sum(max(tp.offset, 0) for tp in watcher.committed(tps, timeout=30))


def faust_eps(settings: Settings, n: int, env: dict[str, str]) -> float:
    """The Faust driver commits after every batch: its progress is its committed offsets."""
    group = f"{settings.topic}.speed-faust"
    reset_speed_state(settings, group)
    worker = subprocess.Popen([sys.executable, "-m", "lambdalake.speed.faust_app"], env=env,
                              cwd=settings.home, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    watcher = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": group})
    try:
        while (first := committed(watcher, settings.topic)) == 0:
            time.sleep(0.2)
        started = time.perf_counter()
        while committed(watcher, settings.topic) < n:
            time.sleep(0.2)
        return (n - first) / (time.perf_counter() - started)
    finally:
        watcher.close()
        worker.terminate()
        worker.wait(60)


def noop_faust_eps(settings: Settings, n: int, run: int) -> float:
    """A plain Faust agent that counts; it prints (Faust logs it) how long n events took."""
    agent = subprocess.Popen(
        [sys.executable, "-c", NOOP_FAUST, settings.kafka_bootstrap, settings.topic, str(n),
         str(settings.home / f"noop-{run}"), f"{settings.topic}.noop-{run}"],
        cwd=settings.home, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert agent.stderr is not None
        line = next(line for line in agent.stderr if '{"seconds"' in line)
    finally:
        agent.kill()
        agent.wait(60)
    return n / json.loads(line[line.index("{"): line.rindex("}") + 1])["seconds"]


def reset_speed_state(settings: Settings, group: str) -> None:
    """No committed offsets for the driver's group, fresh realtime, changelog and dead-letter
    topics: the driver starts from no state and reads the topic from its start."""
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    for future in admin.delete_consumer_groups([group], request_timeout=30).values():
        try:
            future.result()
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.GROUP_ID_NOT_FOUND:
                raise
    existing = admin.list_topics(timeout=30).topics
    companions = [t for t in topic_specs(settings.topic, PARTITIONS)
                  if t != settings.topic and t in existing]
    if companions:
        for future in admin.delete_topics(companions, operation_timeout=30).values():
            future.result()
    time.sleep(2)
    ensure_bus_topics(settings)


# -- freshness over HTTP ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Lambdalake:
    """`lambdalake up` on the broker, in its own process: gateway, default speed driver, API."""

    def __init__(self, broker: KafkaBroker, home: Path):
        self.gateway, self.api = free_port(), free_port()
        env = dict(os.environ, LAMBDALAKE_HOME=str(home), LAMBDALAKE_TOPIC=FRESH_TOPIC,
                   LAMBDALAKE_PARTITIONS=str(PARTITIONS), LAMBDALAKE_STORE=(home / "lake").as_uri(),
                   LAMBDALAKE_GATEWAY_PORT=str(self.gateway), LAMBDALAKE_API_PORT=str(self.api),
                   LAMBDALAKE_SPEED_METRICS_PORT=str(free_port()))
        home.mkdir(parents=True)
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from lambdalake.stack.cli import main; main()", "up",
             "--bus", "kafka", "--bootstrap", broker.bootstrap, "--batch-every", "86400"],
            env=env, cwd=home, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
            stderr=open(home / "up.log", "wb"),
        )

    def __enter__(self) -> Lambdalake:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url(self.api, "/readyz"), timeout=2).status_code == 200:
                    socket.create_connection(("127.0.0.1", self.gateway), timeout=2).close()
                    return self
            except (httpx.TransportError, OSError):
                pass
            time.sleep(0.5)
        raise RuntimeError("lambdalake up (API and gateway) did not become ready in 120 s")

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.wait(120)

    @staticmethod
    def url(port: int, path: str) -> str:
        return f"http://127.0.0.1:{port}{path}"


class LoadTally:
    """The steady load's count per sender, shared with the sender processes: events accepted
    (202), and requests refused (another status) or lost in transport (an error before any
    answer); a refused or lost request is sent again, as a client would."""

    def __init__(self, senders: int):
        context = multiprocessing.get_context("spawn")
        self.accepted = context.Array("q", senders, lock=False)  # a slot per sender
        self.refused = context.Array("q", senders, lock=False)
        self.lost = context.Array("q", senders, lock=False)


def steady_load(events_url: str, stop: ProcessEvent, tally: LoadTally,
                rate: int = FRESHNESS_RATE) -> None:
    """`rate` events/s to the gateway in batches of 250, from LOAD_SENDERS clients at once (as
    many producers send): one client alone waits out each request's round trip, so it
    measures that latency rather than what the gateway takes. Each sender is a process of its
    own: the probes' and the watcher's clocks, in this process, never wait for the senders'
    Python to let them run."""
    context = multiprocessing.get_context("spawn")
    senders = [context.Process(target=one_sender,
                               args=(events_url, stop, tally, seed, rate / LOAD_SENDERS))
               for seed in range(LOAD_SENDERS)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()


def one_sender(events_url: str, stop: ProcessEvent, tally: LoadTally, seed: int,
               rate: float) -> None:
    """Its share of the load, counted in `tally`'s slot `seed`. A batch the gateway refuses
    (503 while the bus is slow) or that a transport error loses is said and sent again."""
    stream, batch = WebAnalyticsStream(seed=2 + seed), 250
    with httpx.Client(timeout=30) as client:
        started = time.perf_counter()
        while not stop.is_set():
            events = [stream.event(int(time.time() * 1000)) for _ in range(batch)]
            if send(client, events_url, orjson.dumps({"events": events}), stop, tally, seed):
                tally.accepted[seed] += batch
            ahead = tally.accepted[seed] / rate - (time.perf_counter() - started)
            if ahead > 0:
                time.sleep(ahead)


def send(client: httpx.Client, events_url: str, body: bytes, stop: ProcessEvent, tally: LoadTally,
         seed: int) -> bool:
    """Until the gateway accepts the body (True) or the load stops (False)."""
    while not stop.is_set():
        try:
            reply = client.post(events_url, content=body,
                                headers={"content-type": "application/json"})
        except httpx.TransportError as error:
            tally.lost[seed] += 1
            say(f"load: a request was lost: {type(error).__name__}: {error}")
        else:
            if reply.status_code == 202:
                return True
            tally.refused[seed] += 1
            say(f"load: the gateway answered {reply.status_code}: {reply.text[:200]}")
        time.sleep(0.1)
    return False


class Moment(NamedTuple):
    """When something happened: `perf` (perf_counter, s) for the delays, `wall_ms` (the wall
    clock, read then) to set beside Kafka's timestamps: a wall clock stepped during the run
    would skew one derived from `perf`."""

    perf: float
    wall_ms: float


def now() -> Moment:
    return Moment(time.perf_counter(), time.time() * 1000)


def probe(events_url: str, seconds: float, run: int) -> dict[str, Moment]:
    """One probe pageview every 50 ms through the gateway; when each was acknowledged."""
    acked: dict[str, Moment] = {}
    deadline = time.perf_counter() + seconds
    with httpx.Client(timeout=30) as client:
        i = 0
        while time.perf_counter() < deadline:
            url = f"/probe/{run}/{i}"
            event = {"event_id": uuid.uuid4().hex, "type": "pageview",
                     "ts": int(time.time() * 1000), "url": url, "user_id": "probe"}
            reply = client.post(events_url, json=event)
            if reply.status_code == 202:
                acked[url] = now()
            i += 1
            time.sleep(PROBE_EVERY_S)
    return acked


def watch(view_url: str, stop: ProcessEvent, visible: dict[str, Moment]) -> None:
    """Query the view over and over; when each probe url is first counted in an answer."""
    with httpx.Client(timeout=30) as client:
        while not stop.is_set():
            asked = time.perf_counter()
            reply = client.get(view_url, params={"bucket": "total", "group_by": "url"})
            answered = now()
            ANSWER_MS.append((answered.perf - asked) * 1000)
            for row in reply.json()["rows"]:
                if row["url"].startswith("/probe/") and row["pageviews"] >= 1:
                    visible.setdefault(row["url"], answered)


def freshness_run(stack: Lambdalake, run: int, visible: dict[str, Moment],
                  all_acked: dict[str, Moment]) -> dict[str, float]:
    acked = probe(stack.url(stack.gateway, "/events"), FRESHNESS_SECONDS, run)
    all_acked.update(acked)
    deadline = time.perf_counter() + VISIBLE_WITHIN_S
    while time.perf_counter() < deadline and not all(url in visible for url in acked):
        time.sleep(0.1)
    delays = sorted((visible[url].perf - t.perf) * 1000 if url in visible else math.inf
                    for url, t in acked.items())
    misses = sum(math.isinf(d) for d in delays)
    p99 = delays[math.ceil(len(delays) * 0.99) - 1]
    say(f"freshness run {run + 1}: p50 {statistics.median(delays):.0f} ms, p99 {p99:.0f} ms, "
        f"{misses} of {len(delays)} probes never counted")
    return {"p50": statistics.median(delays), "p99": p99, "misses": misses,
            "probes": len(delays)}


def settle(events_url: str, visible: dict[str, Moment]) -> None:
    """Until a first probe is counted: the speed worker has joined its group and the load
    has settled (a machine under load takes far longer than a fixed pause would allow)."""
    httpx.post(events_url, json={"event_id": uuid.uuid4().hex, "type": "pageview",
                                 "ts": int(time.time() * 1000), "url": "/probe/settle",
                                 "user_id": "probe"}, timeout=30).raise_for_status()
    deadline = time.perf_counter() + SETTLE_WITHIN_S
    while "/probe/settle" not in visible:
        if time.perf_counter() > deadline:
            raise RuntimeError(f"no probe counted within {SETTLE_WITHIN_S:.0f} s of the start")
        time.sleep(0.1)
    time.sleep(5)  # the backlog of the start is read


def freshness(broker: KafkaBroker, home: Path, runs: int,
              acked: dict[str, Moment] | None = None,
              visible: dict[str, Moment] | None = None,
              rate: int = FRESHNESS_RATE) -> tuple[list[dict[str, float]], float]:
    """Freshness runs on one running stack under the steady load; the load achieved (events/s).
    Every probe's 202 and first counting answer go to `acked` and `visible`."""
    acked = {} if acked is None else acked
    visible = {} if visible is None else visible
    with Lambdalake(broker, home) as stack:
        stop, tally = multiprocessing.get_context("spawn").Event(), LoadTally(LOAD_SENDERS)
        load = threading.Thread(target=steady_load,
                                args=(stack.url(stack.gateway, "/events"), stop, tally, rate))
        watcher = threading.Thread(
            target=watch, args=(stack.url(stack.api, f"/views/{PROBED_VIEW}"), stop, visible))
        load.start()
        watcher.start()
        settle(stack.url(stack.gateway, "/events"), visible)
        accepted_before, started = sum(tally.accepted), time.perf_counter()
        results = [freshness_run(stack, run, visible, acked) for run in range(runs)]
        accepted, took = sum(tally.accepted) - accepted_before, time.perf_counter() - started
        stop.set()
        load.join()
        watcher.join()
        say(f"load during the runs: {accepted / took:,.0f} events/s accepted; in all "
            f"{sum(tally.refused)} requests refused, {sum(tally.lost)} lost in transport")
        return results, accepted / took


def first_times(bootstrap: str, topic: str,
                url_of: Callable[[Any], str | None]) -> dict[str, float]:
    """Each probe url's first record's Kafka timestamp (ms) in `topic`, read to its end."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": uuid.uuid4().hex,
                         "enable.partition.eof": True, "isolation.level": "read_committed",
                         "auto.offset.reset": "earliest"})
    consumer.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
    first: dict[str, float] = {}
    at_end: set[int] = set()
    while len(at_end) < PARTITIONS:
        for message in consumer.consume(10_000, 1.0):
            if message.error() is not None:
                at_end.add(message.partition())
                continue
            url = url_of(message)
            if url is not None and url not in first:
                first[url] = message.timestamp()[1]
    consumer.close()
    return first


def probe_url(text: bytes | None) -> str | None:
    start = text.find(b"/probe/") if text else -1
    return None if start < 0 or text is None else text[start:].split(b'"')[0].decode()


def stages(bootstrap: str, acked: dict[str, Moment], visible: dict[str, Moment]) -> None:
    """Where the delay of the probes went (medians and p99s, ms)."""
    produced = first_times(bootstrap, FRESH_TOPIC, lambda m: probe_url(m.value()))
    folded = first_times(bootstrap, realtime_topic(FRESH_TOPIC), lambda m: probe_url(m.key()))
    shares: dict[str, list[float]] = {"gateway produce -> 202": [],
                                      "produce -> realtime record": [],
                                      "realtime record -> counted": [], "202 -> counted": []}
    for url, ack in acked.items():
        if url in produced and url in folded and url in visible:
            ack_ms, seen_ms = ack.wall_ms, visible[url].wall_ms
            shares["gateway produce -> 202"].append(ack_ms - produced[url])
            shares["produce -> realtime record"].append(folded[url] - produced[url])
            shares["realtime record -> counted"].append(seen_ms - folded[url])
            shares["202 -> counted"].append(seen_ms - ack_ms)
    shares["GET /views answer"] = ANSWER_MS
    for name, values in shares.items():
        values.sort()
        if values:
            say(f"stage {name}: p50 {statistics.median(values):.0f} ms, "
                f"p99 {values[math.ceil(len(values) * 0.99) - 1]:.0f} ms ({len(values)} probes)")


# -- figures ----------------------------------------------------------------------------------


def spread(values: list[float]) -> dict[str, Any]:
    finite = [v for v in values if math.isfinite(v)]
    median = statistics.median(values)
    return {"median": rounded(median), "min": rounded(min(values)), "max": rounded(max(values)),
            "all": [rounded(v) for v in values]} if finite else {"median": None, "all": []}


def rounded(value: float) -> float | None:
    return None if not math.isfinite(value) else round(value, 3 if value < 10 else None)


def measured(name: str, runs: int, measure: Callable[[int], float]) -> list[float]:
    values = []
    for run in range(runs):
        values.append(measure(run))
        say(f"{name} run {run + 1}: {values[-1]:,.0f} events/s")
    return values


def main() -> None:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # bench/speed.py shadows `speed`
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=500_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--faust-events", type=int, default=100_000,
                        help="events the Faust driver and the no-op agent read (Faust is slow)")
    parser.add_argument("--freshness-only", action="store_true",
                        help="skip the throughput parts; say where the probes' delay went")
    parser.add_argument("--rate", type=int, default=FRESHNESS_RATE,
                        help="events/s of the steady load (with --freshness-only)")
    args = parser.parse_args()
    if args.freshness_only:
        freshness_only(args.runs, args.rate)
        return
    n, runs, faust_n = args.events, args.runs, min(args.faust_events, args.events)
    home = Path(tempfile.mkdtemp(prefix="lambdalake-bench-"))
    say(f"load before: {os.getloadavg()}")
    with KafkaBroker(heap="1g") as broker:
        settings = Settings(bus="kafka", kafka_bootstrap=broker.bootstrap, topic="bench.events",
                            partitions=PARTITIONS, home=home, store=(home / "lake").as_uri())
        env = dict(os.environ, LAMBDALAKE_BUS="kafka", LAMBDALAKE_HOME=str(home),
                   LAMBDALAKE_KAFKA_BOOTSTRAP=broker.bootstrap, LAMBDALAKE_TOPIC=settings.topic,
                   LAMBDALAKE_PARTITIONS=str(PARTITIONS), LAMBDALAKE_STORE=settings.store_url)
        ensure_bus_topics(settings)
        say(f"producing {n} events")
        produce(broker.bootstrap, settings.topic, n)
        figures = {
            "raw_confluent_eps": measured(
                "raw confluent-kafka + orjson", runs,
                lambda _: raw_confluent(broker.bootstrap, settings.topic, n)),
            "raw_aiokafka_eps": measured(
                "raw aiokafka + orjson", runs,
                lambda _: asyncio.run(raw_aiokafka(broker.bootstrap, settings.topic, n))),
            "default_eps": measured("quix driver", runs, lambda run: quix_eps(settings, n, run)),
            "faust_eps": measured("faust driver", runs,
                                  lambda _: faust_eps(settings, faust_n, env)),
            "noop_faust_eps": measured("faust agent that only counts", runs,
                                       lambda run: noop_faust_eps(settings, faust_n, run)),
        }
        fresh, load_eps = freshness(broker, home / "fresh", runs)
    say(f"load after: {os.getloadavg()}")
    print(json.dumps(report(figures, fresh, load_eps, runs)))


def freshness_only(runs: int, rate: int) -> None:
    home = Path(tempfile.mkdtemp(prefix="lambdalake-bench-"))
    say(f"load before: {os.getloadavg()}")
    acked: dict[str, Moment] = {}
    visible: dict[str, Moment] = {}
    with KafkaBroker(heap="1g") as broker:
        fresh, load_eps = freshness(broker, home / "fresh", runs, acked, visible, rate)
        stages(broker.bootstrap, acked, visible)
    say(f"load after: {os.getloadavg()}")
    print(json.dumps(freshness_figures(fresh, load_eps, {}, runs)))


def freshness_figures(fresh: list[dict[str, float]], load_eps: float,
                      figures: dict[str, list[float]], runs: int) -> dict[str, Any]:
    """The freshness figures (medians), then every run's spread and the load average."""
    p50s, p99s = [f["p50"] for f in fresh], [f["p99"] for f in fresh]
    return {
        "freshness_p50_ms": rounded(statistics.median(p50s)),
        # null: infinite (more than 1% of probes missed)
        "freshness_p99_ms": rounded(statistics.median(p99s)),
        "freshness_misses": sum(int(f["misses"]) for f in fresh),
        "freshness_probes": sum(int(f["probes"]) for f in fresh),
        "freshness_load_eps": round(load_eps),
        "runs": {"count": runs, **{name: spread(values) for name, values in figures.items()},
                 "freshness_p50_ms": spread(p50s), "freshness_p99_ms": spread(p99s),
                 "freshness_misses": [int(f["misses"]) for f in fresh]},
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def report(figures: dict[str, list[float]], fresh: list[dict[str, float]], load_eps: float,
           runs: int) -> dict[str, Any]:
    median = {name: statistics.median(values) for name, values in figures.items()}
    raw_client = max(("confluent", "aiokafka"), key=lambda c: median[f"raw_{c}_eps"])
    raw = median[f"raw_{raw_client}_eps"]
    return {
        "raw_eps": round(raw), "raw_client": raw_client, "default_engine": DEFAULT_ENGINE,
        "default_eps": round(median["default_eps"]),
        "default_ratio": round(median["default_eps"] / raw, 3),
        "faust_eps": round(median["faust_eps"]),
        "faust_ratio_to_noop_faust": round(median["faust_eps"] / median["noop_faust_eps"], 3),
        **freshness_figures(fresh, load_eps, figures, runs),
        "views": sorted(project.views),
    }


if __name__ == "__main__":
    main()
