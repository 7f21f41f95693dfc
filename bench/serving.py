"""Serving under load: dashboard queries and ingestion at once.

`lambdalake up`'s stack over a published batch version of `pageviews_by_url_hour` with 1M
rows (30 days of hourly buckets x 1,389 urls) and 100k real-time cells, served by
`--replicas` (default 2) `lambdalake serve` processes on a real Kafka broker (the cells on
the realtime topic, as the speed layer publishes them; `up` holds the gateway, the archiver,
the speed worker), or with `--replicas 0` by the API inside `up` on the embedded bus (one
process: gateway, embedded log, speed layer, API). Then, in one run:
- 8 query clients (processes, spread over the replicas) send the two typical dashboard
  queries, alternately, for a random url: 30 days of hourly buckets for one key, and the
  top 20 keys for a day; p50, p99 and queries/s, and the CPU time per query of the
  replicas (with `--replicas 0`, of the whole `up`) and of the clients (which share the
  cores with them);
- the same queries run directly in DuckDB on a pre-merged table (one row per bucket and url,
  the metrics final) by 8 threads: the reference for the overhead ratio (p50 over p50);
- while the API queries run, one producer process sends 2,000 events/s to the gateway in
  batches of 50: ingestion's p99 under query load.
Each side is measured warm, as a long-running deployment is: the runs follow `--warmup`
seconds of the same load, not counted (its figures are printed), and the reference's follow
as long a run of its own. Cold, the broker's JVM compiles its hot paths during the first
runs: in one measured run it took 0.7 of the two cores at first and 0.35 by the third.

    .venv/bin/python bench/serving.py [--seconds 15] [--runs 3] [--warmup 30] [--replicas 2]

Before the load, the API's answers to both queries are checked against the reference (the
pageviews of every row): the API serves the batch view and the real-time cells merged. Each
figure is the median of the runs (min and max printed beside); the last line printed is one
JSON object, its `runs` each run's own figures.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.client import HTTPConnection
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlencode, urlsplit

import duckdb
import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lambdalake import catalog
from lambdalake.eventlog import now_ms
from lambdalake.events import iso
from lambdalake.example import project
from lambdalake.sketch_arrays import build_sketch_array
from lambdalake.synthetic import WebAnalyticsStream
from lambdalake.tables import table_schema
from lambdalake.testing import free_ports
from lambdalake.viewstate import CellUpdate

HOUR, DAY = 3_600_000, 86_400_000
VIEW = project.views["pageviews_by_url_hour"]
URLS = 1_389  # x 720 hours = 1,000,080 batch rows
REALTIME_CELLS = 100_000
CLIENTS = 8
INGEST_RATE, INGEST_BATCH = 2_000, 50


def urls() -> list[str]:
    return [f"/page/{number}" for number in range(URLS)]


def batch_table(cut: int) -> pa.Table:
    """30 days of hourly rows for every url before `cut`; visitors are real HLL sketches."""
    rng = np.random.default_rng(1)
    hours = np.arange(cut // HOUR * HOUR - 30 * DAY, cut // HOUR * HOUR, HOUR)
    bucket = np.repeat(hours, URLS)
    url = np.tile(np.array(urls(), dtype=object), len(hours))
    pageviews = rng.integers(1, 50, len(bucket))
    # each row's sketch over 1-4 users out of 2,000: real sketches to merge, built in bulk
    users_per_row = rng.integers(1, 5, len(bucket))
    groups = np.repeat(np.arange(len(bucket)), users_per_row)
    users = rng.integers(0, 2_000, len(groups)).astype(str)
    visitors = build_sketch_array(groups, users, num_groups=len(bucket))
    columns = {"bucket": bucket, "url": url, "pageviews": pageviews, "visitors": visitors}
    return pa.Table.from_pydict(columns, schema=table_schema(project, VIEW))


def publish(store_root: Path, table: pa.Table, cut: int) -> None:
    from lambdalake.storage import open_store

    store = open_store(store_root.as_uri())
    version = "bench-1"
    key = catalog.data_key(VIEW.name, version)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    store.put(key, sink.getvalue().to_pybytes())
    # every view as defined now (fingerprints), or serving would take it as absent
    files = {name: catalog.ViewFiles(files=[key] if name == VIEW.name else [],
                                     rows=table.num_rows if name == VIEW.name else 0)
             for name in project.views}
    manifest = catalog.Manifest(version=version, cut=cut, created=iso(now_ms()), engine="bench",
                                rows_read=table.num_rows, views=files,
                                fingerprints=dict(project.fingerprints))
    catalog.write_manifest(store, manifest)
    catalog.publish(store, version)


def realtime_updates(cut: int) -> list[CellUpdate]:
    """100k cells in 1 s slices past the cut (72 of them), spread over the last hours and
    every url."""
    metric = VIEW.metrics["visitors"]
    sketches = [metric.lift(f"u{n}") for n in range(64)]
    rng = random.Random(2)
    names = urls()
    updates = []
    for number in range(REALTIME_CELLS):
        slice_start = cut + (number // URLS) * 1000
        bucket = (cut // HOUR - rng.randrange(3)) * HOUR
        values = (rng.randrange(1, 20), sketches[number % 64])
        updates.append(CellUpdate(VIEW.name, slice_start, bucket, (names[number % URLS],), values))
    return updates


def dashboard_queries(cut: int) -> list[tuple[str, dict[str, Any]]]:
    """The two queries, for a random url / day: 30 days hourly for one key; top 20 of a day."""
    end = (cut // HOUR + 1) * HOUR
    day = (cut // DAY - random.randrange(1, 29)) * DAY
    return [
        ("series", {"url": random.choice(urls()), "from": end - 30 * DAY, "to": end}),
        ("top", {"from": day, "to": day + DAY, "bucket": "total", "order_by": "pageviews",
                 "limit": 20}),
    ]


def started_together(ready: Any, go: Any, seconds: float) -> float:
    """Say ready, wait for every other process; the wall-clock time to stop at."""
    ready.put(os.getpid())
    go.wait()
    return time.time() + seconds


def api_client(api: str, cut: int, seconds: float, sync: tuple[Any, Any, Any]) -> None:
    """One query client: the two dashboard queries in turn for `seconds`, on a kept-alive
    connection of the standard library's HTTP/1.1 client (about 4x less CPU per request than
    httpx: the clients share the cores with the replicas they measure); with its CPU time."""
    ready, go, out = sync
    latencies: list[float] = []
    address = urlsplit(api)
    connection = HTTPConnection(address.hostname or "127.0.0.1", address.port, timeout=60)
    until = started_together(ready, go, seconds)
    cpu = time.process_time()
    while time.time() < until:
        for _, params in dashboard_queries(cut):
            started = time.perf_counter()
            connection.request("GET", f"/views/{VIEW.name}?{urlencode(params)}")
            reply = connection.getresponse()
            body = reply.read()
            latencies.append(time.perf_counter() - started)
            assert reply.status == 200, body
    out.put(("query", latencies, time.process_time() - cpu))
    connection.close()


def ingest_client(gateway: str, seconds: float, sync: tuple[Any, Any, Any]) -> None:
    """2,000 events/s in batches of 50, one request every 25 ms on its schedule."""
    ready, go, out = sync
    stream, latencies = WebAnalyticsStream(seed=5), []
    interval = INGEST_BATCH / INGEST_RATE
    with httpx.Client(timeout=60) as client:
        until = started_together(ready, go, seconds)
        next_at = time.perf_counter()
        while time.time() < until:
            batch = [stream.event(now_ms()) for _ in range(INGEST_BATCH)]
            started = time.perf_counter()
            reply = client.post(gateway, json={"events": batch})
            latencies.append(time.perf_counter() - started)
            assert reply.status_code == 202, reply.text
            next_at += interval
            time.sleep(max(0.0, next_at - time.perf_counter()))
    out.put(("ingest", latencies, 0.0))


class Load(NamedTuple):
    queries: list[float]  # latencies, s
    ingest: list[float]
    clients_cpu: float  # s, the query clients'
    replicas_cpu: float  # s, the serving replicas'


def cpu_seconds(pids: list[int]) -> float:
    """The user and system CPU time these processes have used (Linux's /proc)."""
    ticks = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def under_load(apis: list[str], replicas: list[int], gateway: str, cut: int,
               seconds: float) -> Load:
    """The query clients, spread over the serving replicas `apis` (processes `replicas`),
    and the producer."""
    context = multiprocessing.get_context("spawn")
    sync = (ready, go, out) = (context.Queue(), context.Event(), context.Queue())
    ingest = context.Process(target=ingest_client, args=(gateway, seconds, sync))
    clients = [context.Process(target=api_client, args=(apis[n % len(apis)], cut, seconds, sync))
               for n in range(CLIENTS)]
    for process in [ingest, *clients]:
        process.start()
    for _ in range(CLIENTS + 1):
        ready.get()
    replicas_cpu = cpu_seconds(replicas)
    go.set()
    results: dict[str, list[float]] = {"query": [], "ingest": []}
    clients_cpu = 0.0
    for _ in range(CLIENTS + 1):
        kind, latencies, cpu = out.get()
        results[kind] += latencies
        clients_cpu += cpu
    replicas_cpu = cpu_seconds(replicas) - replicas_cpu
    for process in [ingest, *clients]:
        process.join()
    return Load(results["query"], results["ingest"], clients_cpu, replicas_cpu)


def premerged(table: pa.Table, updates: list[CellUpdate]) -> duckdb.DuckDBPyConnection:
    """The reference: one row per bucket and url, the metrics final (visitors as estimates)."""
    metric = VIEW.metrics["visitors"]
    realtime = pa.Table.from_pydict({
        "bucket": [u.bucket for u in updates], "url": [u.key[0] for u in updates],
        "pageviews": [u.values[0] for u in updates],
        "visitors": [metric.result(u.values[1]) for u in updates],
    })
    batch = table.set_column(3, "visitors", pa.array(
        [metric.result(s) for s in table.column("visitors").to_pylist()], pa.int64()))
    connection = duckdb.connect()
    connection.register("batch_part", batch)
    connection.register("realtime_part", realtime)
    connection.execute(
        "CREATE TABLE merged AS SELECT make_timestamp(bucket * 1000) AS bucket, url, "
        "sum(pageviews) AS pageviews, max(visitors) AS visitors FROM (SELECT * FROM batch_part "
        "UNION ALL SELECT * FROM realtime_part) GROUP BY ALL")
    return connection


DIRECT_SQL = {
    "series": "SELECT bucket, pageviews, visitors FROM merged WHERE url = ? AND bucket >= "
              "make_timestamp(? * 1000) AND bucket < make_timestamp(? * 1000) ORDER BY bucket",
    "top": "SELECT url, sum(pageviews) AS pageviews, max(visitors) AS visitors FROM merged "
           "WHERE bucket >= make_timestamp(? * 1000) AND bucket < make_timestamp(? * 1000) "
           "GROUP BY url ORDER BY pageviews DESC LIMIT 20",
}


def direct(connection: duckdb.DuckDBPyConnection, cut: int, seconds: float) -> list[float]:
    latencies: list[float] = []
    until = time.time() + seconds

    def client() -> None:
        cursor = connection.cursor()
        while time.time() < until:
            for name, params in dashboard_queries(cut):
                args = ([params["url"]] if name == "series" else []) + [params["from"],
                                                                        params["to"]]
                started = time.perf_counter()
                cursor.execute(DIRECT_SQL[name], args).fetchall()
                latencies.append(time.perf_counter() - started)

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies


def summary(latencies: list[float], seconds: float) -> dict[str, float]:
    ms = sorted(x * 1000 for x in latencies)
    return {"p50_ms": round(statistics.median(ms), 2),
            "p99_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 2),
            "qps": round(len(ms) / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="per run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=30.0,
                        help="seconds of the same load before the runs, not counted")
    parser.add_argument("--replicas", type=int, default=2,
                        help="`lambdalake serve` processes on Kafka answering the queries; 0: "
                             "the API inside `up` on the embedded bus")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lambdalake-bench-serving-") as home:
        run(Path(home), args.seconds, args.runs, args.warmup, args.replicas)


def check_answers(api: str, reference: duckdb.DuckDBPyConnection, cut: int) -> None:
    """The API's pageviews equal the pre-merged table's, row by row, for both queries."""
    cursor = reference.cursor()
    for name, params in dashboard_queries(cut):
        reply = httpx.get(f"{api}/views/{VIEW.name}", params=params, timeout=60)
        reply.raise_for_status()
        served = [row["pageviews"] for row in reply.json()["rows"]]
        args = ([params["url"]] if name == "series" else []) + [params["from"], params["to"]]
        expected = [row[1] for row in cursor.execute(DIRECT_SQL[name], args).fetchall()]
        if name == "top":  # ties may be listed in any order
            served, expected = sorted(served), sorted(expected)
        assert served == expected, f"{name}: the API answers {served[:5]}..., not {expected[:5]}"


def run(home: Path, seconds: float, runs: int, warmup: float, replicas: int) -> None:
    gateway_port, api_port, metrics_port = free_ports(3)
    os.environ.update({"LAMBDALAKE_HOME": str(home), "LAMBDALAKE_GATEWAY_PORT": str(gateway_port),
                       "LAMBDALAKE_API_PORT": str(api_port), "LAMBDALAKE_PG_PORT": "0",
                       "LAMBDALAKE_SPEED_METRICS_PORT": str(metrics_port),
                       "LAMBDALAKE_BATCH_INTERVAL_SECONDS": "3600"})
    if not replicas:
        measure(home, seconds, runs, warmup, [])
        return
    from lambdalake.testing.kafka import KafkaBroker

    with KafkaBroker() as broker:
        os.environ.update({"LAMBDALAKE_BUS": "kafka", "LAMBDALAKE_TOPIC": "bench.serving",
                           "LAMBDALAKE_KAFKA_BOOTSTRAP": broker.bootstrap})
        measure(home, seconds, runs, warmup, free_ports(replicas))


def publish_cells(settings: Any, updates: list[CellUpdate]) -> None:
    """The real-time cells on the compacted realtime topic, as the speed layer publishes them
    (one source partition per cell), for the replicas' feeds to read."""
    from confluent_kafka import Producer

    from lambdalake.kafka_topics import ensure_bus_topics, realtime_topic
    from lambdalake.realtime import encode_update
    from lambdalake.speed.kafka_common import cell_key

    ensure_bus_topics(settings)
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "linger.ms": 50})
    topic = realtime_topic(settings.topic)
    for number, u in enumerate(updates):
        partition = number % settings.partitions
        producer.produce(topic, encode_update(u, project), partition=partition,
                         key=cell_key(partition, u.view, (u.slice, u.bucket, u.key)))
        if number % 10_000 == 0:
            producer.flush()
    producer.flush()


def serve_replicas(home: Path, ports: list[int]) -> list[subprocess.Popen[bytes]]:
    command = [sys.executable, "-c", "from lambdalake.stack.cli import main; main()", "serve",
               "--pg-port", "0", "--port"]
    return [subprocess.Popen([*command, str(port)], env=os.environ, cwd=home,
                             stdout=subprocess.DEVNULL,
                             stderr=open(home / f"serve-{port}.log", "wb"))
            for port in ports]


def wait_ready(api: str) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{api}/readyz", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{api} did not become ready")


def measure(home: Path, seconds: float, runs: int, warmup: float,
            replica_ports: list[int]) -> None:
    from lambdalake.settings import Settings
    from lambdalake.stack.up import Stack

    settings = Settings()
    api_port = settings.api_port
    gateway_port = settings.gateway_port
    # the real-time cells' arrival slices (72 s of them past the cut) all lie in the past, as
    # a speed layer's do: a slice past now would be one that new events change
    cut = now_ms() - 120_000
    print(f"building 1M batch rows and {REALTIME_CELLS:,} real-time cells ...", flush=True)
    table = batch_table(cut)
    publish(Path(settings.store_url.removeprefix("file://")), table, cut)
    updates = realtime_updates(cut)
    reference = premerged(table, updates)
    gateway = f"http://127.0.0.1:{gateway_port}/events"
    apis = [f"http://127.0.0.1:{port}" for port in replica_ports or [api_port]]
    if replica_ports:
        publish_cells(settings, updates)
    with Stack(settings) as stack:
        replicas = serve_replicas(home, replica_ports)
        try:
            if not replica_ports:
                stack.realtime.upsert(updates)
            for api in apis:
                wait_ready(api)
                check_answers(api, reference, cut)
            where = (f"{len(apis)} `lambdalake serve` replicas on Kafka" if replica_ports
                     else "the API inside `up`, on the embedded bus")
            print(f"served by {where}: {table.num_rows:,} batch rows, {REALTIME_CELLS:,} "
                  f"real-time cells (answers checked); {CLIENTS} query clients + ingestion at "
                  f"{INGEST_RATE:,} events/s, {runs} runs of {seconds:.0f} s", flush=True)
            pids = [replica.pid for replica in replicas] or [os.getpid()]
            if warmup:
                warm = under_load(apis, pids, gateway, cut, warmup)
                print(f"warm-up, not counted: {json.dumps(summary(warm.queries, warmup))}",
                      flush=True)
            loaded = [under_load(apis, pids, gateway, cut, seconds) for _ in range(runs)]
        finally:
            for replica in replicas:
                replica.terminate()
                replica.wait(60)
    if warmup:
        direct(reference, cut, warmup)
    results = []
    for number, load in enumerate(loaded, 1):
        served, ingested = summary(load.queries, seconds), summary(load.ingest, seconds)
        direct_ = summary(direct(reference, cut, seconds), seconds)
        per_query = 1000 / len(load.queries)
        results.append({**served, "overhead_ratio": round(served["p50_ms"] / direct_["p50_ms"], 2),
                        "ingest_p99_ms_under_query_load": ingested["p99_ms"],
                        "reference_p50_ms": direct_["p50_ms"],
                        "reference_p99_ms": direct_["p99_ms"],
                        "replicas_cpu_ms_per_query": round(load.replicas_cpu * per_query, 2),
                        "clients_cpu_ms_per_query": round(load.clients_cpu * per_query, 2)})
        print(f"run {number}: {json.dumps(results[-1])}", flush=True)
    median = {name: round(statistics.median(r[name] for r in results), 2) for name in results[0]}
    spread = {name: (min(r[name] for r in results), max(r[name] for r in results))
              for name in results[0]}

    def line(label: str, name: str, unit: str = " ms") -> str:
        low, high = spread[name]
        return f"{label}: {median[name]}{unit} (min {low}, max {high})"

    print(f"API, {CLIENTS} clients (median of {runs}):")
    print("  " + line("p50", "p50_ms") + "; " + line("p99", "p99_ms") + "; "
          + line("queries/s", "qps", ""))
    print("  CPU per query: " + line("replicas", "replicas_cpu_ms_per_query") + "; "
          + line("clients", "clients_cpu_ms_per_query"))
    print(f"DuckDB on a pre-merged table, {CLIENTS} threads (reference):")
    print("  " + line("p50", "reference_p50_ms") + "; " + line("p99", "reference_p99_ms"))
    print(line("overhead ratio, p50 over p50 (target <= 2)", "overhead_ratio", ""))
    print(line(f"ingestion p99 under query load, batches of {INGEST_BATCH} at "
               f"{INGEST_RATE:,} events/s (target < 1,000 ms)", "ingest_p99_ms_under_query_load"))
    print(json.dumps({**{name: median[name] for name in ("p50_ms", "p99_ms", "qps",
                                                        "overhead_ratio",
                                                        "ingest_p99_ms_under_query_load")},
                      "runs": results}))


if __name__ == "__main__":
    main()
