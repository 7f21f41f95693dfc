"""Speed-layer throughput and freshness on a real Kafka broker (started here).

One topic of N events (the example project's synthetic stream, 4 partitions), read by:
- the reference: a raw aiokafka loop that only reads and JSON-decodes;
- the Quix driver (speed/quix.py) with the example project's views, exactly once;
- the Faust driver (speed/faust_app.py), exactly once, and a Faust agent that only counts.
Each as events/s and as a ratio. Then freshness of the default driver: p50 and p99 ms from the
ingest acknowledgement (`KafkaBus.publish` returning) to the event being in the serving
layer's real-time cells, under a steady 5,000 events/s.

    .venv/bin/python bench/speed.py [--events 500000]

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition
from kafka.admin import KafkaAdminClient

from lambdalake.bus import KafkaBus
from lambdalake.events import Event
from lambdalake.example import project
from lambdalake.kafka_topics import ensure_bus_topics, topic_specs
from lambdalake.realtime import RealtimeCells
from lambdalake.settings import Settings
from lambdalake.storage import open_store
from lambdalake.synthetic import WebAnalyticsStream
from lambdalake.testing.kafka import KafkaBroker

DEFAULT_ENGINE = "quix"
PARTITIONS = 4
FRESHNESS_RATE = 5_000
FRESHNESS_SECONDS = 20
NOOP_FAUST = '''
import json, sys, time
import faust
bootstrap, topic, n, datadir = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
sys.argv = [sys.argv[0], "worker", "--without-web", "--loglevel", "warn"]
app = faust.App(f"{topic}.noop", broker=f"kafka://{bootstrap}", web_enabled=False,
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


async def raw_aiokafka(bootstrap: str, topic: str, n: int) -> float:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=uuid.uuid4().hex,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    read, started = 0, None
    while read < n:
        batches = await consumer.getmany(timeout_ms=1000, max_records=10_000)
        started = started or (time.perf_counter() if batches else None)
        for records in batches.values():
            for record in records:
                json.loads(record.value)
            read += len(records)
    elapsed = time.perf_counter() - started
    await consumer.stop()
    return n / elapsed


def quix_eps(settings: Settings, n: int) -> float:
    from lambdalake.speed.quix import QuixSpeed

    speed = QuixSpeed(settings, project, open_store(settings.store_url), "bench")
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
    worker = subprocess.Popen([sys.executable, "-m", "lambdalake.speed.faust_app"], env=env,
                              cwd=settings.home, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    watcher = Consumer({"bootstrap.servers": settings.kafka_bootstrap,
                        "group.id": f"{settings.topic}.speed-faust"})
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


def noop_faust_eps(settings: Settings, n: int) -> float:
    """A plain Faust agent that counts; it prints (Faust logs it) how long n events took."""
    agent = subprocess.Popen(
        [sys.executable, "-c", NOOP_FAUST, settings.kafka_bootstrap, settings.topic, str(n),
         str(settings.home / "noop")],
        cwd=settings.home, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert agent.stderr is not None
        line = next(line for line in agent.stderr if '{"seconds"' in line)
    finally:
        agent.kill()
        agent.wait(60)
    return n / json.loads(line[line.index("{"): line.rindex("}") + 1])["seconds"]


class ProbedCells(RealtimeCells):
    """Real-time cells that note when each probe url first becomes visible."""

    def __init__(self) -> None:
        super().__init__(project)
        self.visible: dict[str, float] = {}

    def upsert(self, updates: Any) -> None:
        updates = list(updates)
        super().upsert(updates)
        now = time.perf_counter()
        for u in updates:
            if u.view == "pageviews_by_url_hour" and str(u.key[0]).startswith("/probe/"):
                self.visible.setdefault(u.key[0], now)


def freshness(settings: Settings) -> tuple[float, float]:
    from lambdalake.serving.realtime_feed import RealtimeFeed
    from lambdalake.speed.quix import QuixSpeed

    cells = ProbedCells()
    feed = RealtimeFeed(settings.kafka_bootstrap, settings.topic, cells)
    feed.start()
    speed = QuixSpeed(settings, project, open_store(settings.store_url), "fresh")
    stop = threading.Event()
    worker = threading.Thread(target=speed.run, args=(stop,))
    worker.start()
    time.sleep(8)  # the worker joins its group and reads the backlog
    load = threading.Thread(target=steady_load, args=(settings, stop))
    load.start()
    acked = probe(settings)
    time.sleep(2)
    stop.set()
    worker.join()
    load.join()
    feed.stop()
    delays = sorted((cells.visible[url] - t) * 1000 for url, t in acked.items()
                    if url in cells.visible)
    if len(delays) < len(acked):
        say(f"{len(acked) - len(delays)} of {len(acked)} probes never became visible")
    return statistics.median(delays), delays[int(len(delays) * 0.99) - 1]


def steady_load(settings: Settings, stop: threading.Event) -> None:
    stream = WebAnalyticsStream(seed=2)
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "linger.ms": 5,
                         "enable.idempotence": True})
    started, sent = time.perf_counter(), 0
    while not stop.is_set():
        for _ in range(50):
            event = stream.event(int(time.time() * 1000))
            producer.produce(settings.topic, json.dumps(event).encode(), event["event_id"].encode())
        sent += 50
        producer.poll(0)
        ahead = sent / FRESHNESS_RATE - (time.perf_counter() - started)
        if ahead > 0:
            time.sleep(ahead)
    producer.flush(30)


def probe(settings: Settings) -> dict[str, float]:
    """One probe event every 50 ms through the ingest path; the time each was acknowledged."""
    bus = KafkaBus(settings.kafka_bootstrap, settings.topic)
    acked: dict[str, float] = {}
    deadline = time.perf_counter() + FRESHNESS_SECONDS
    i = 0
    while time.perf_counter() < deadline:
        url = f"/probe/{i}"
        bus.publish([Event(uuid.uuid4().hex, "pageview", int(time.time() * 1000),
                           {"url": url, "user_id": "probe"})])
        acked[url] = time.perf_counter()
        i += 1
        time.sleep(0.05)
    bus.close()
    return acked


def reset_state_topics(settings: Settings) -> None:
    """Fresh realtime, changelog and dead-letter topics, so drivers start from no state."""
    admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    companions = [t for t in topic_specs(settings.topic, PARTITIONS) if t != settings.topic]
    admin.delete_topics(companions)
    admin.close()
    time.sleep(2)
    ensure_bus_topics(settings)


def main() -> None:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # bench/speed.py shadows `speed`
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=500_000)
    n = parser.parse_args().events
    home = Path(tempfile.mkdtemp(prefix="lambdalake-bench-"))
    with KafkaBroker(heap="1g") as broker:
        settings = Settings(bus="kafka", kafka_bootstrap=broker.bootstrap, topic="bench.events",
                            partitions=PARTITIONS, home=home, store=(home / "lake").as_uri())
        env = dict(os.environ, LAMBDALAKE_BUS="kafka", LAMBDALAKE_HOME=str(home),
                   LAMBDALAKE_KAFKA_BOOTSTRAP=broker.bootstrap, LAMBDALAKE_TOPIC=settings.topic,
                   LAMBDALAKE_PARTITIONS=str(PARTITIONS), LAMBDALAKE_STORE=settings.store_url)
        ensure_bus_topics(settings)
        say(f"producing {n} events")
        produce(broker.bootstrap, settings.topic, n)
        raw = asyncio.run(raw_aiokafka(broker.bootstrap, settings.topic, n))
        say(f"raw aiokafka read + json: {raw:,.0f} events/s")
        quix = quix_eps(settings, n)
        say(f"quix driver: {quix:,.0f} events/s ({quix / raw:.2f} of raw)")
        reset_state_topics(settings)
        faust = faust_eps(settings, n, env)
        say(f"faust driver: {faust:,.0f} events/s ({faust / raw:.2f} of raw)")
        noop = noop_faust_eps(settings, n)
        say(f"faust agent that only counts: {noop:,.0f} events/s")
        fresh_settings = settings.model_copy(update={"topic": "bench.fresh"})
        ensure_bus_topics(fresh_settings)
        p50, p99 = freshness(fresh_settings)
        say(f"freshness at {FRESHNESS_RATE}/s ({DEFAULT_ENGINE}): p50 {p50:.0f} ms, "
            f"p99 {p99:.0f} ms")
    print(json.dumps({
        "raw_eps": round(raw), "default_engine": DEFAULT_ENGINE, "default_eps": round(quix),
        "default_ratio": round(quix / raw, 3), "faust_eps": round(faust),
        "faust_ratio_to_noop_faust": round(faust / noop, 3),
        "freshness_p50_ms": round(p50), "freshness_p99_ms": round(p99),
    }))


if __name__ == "__main__":
    main()
