"""Ingestion through the functions beside the bus alone: the gateway's cost, measured.

On a real Kafka broker (KRaft, started here), in one run:
- gateway: clients POST the events in batches of 500 (`{"events": [...]}`) to the local
  HTTP gateway, which invokes the template's `Ingest` function (API Gateway event, parse,
  validate, publish with acks=all, 202 once durable); 4 requests in flight at a time. The
  gateway runs in a process of its own, as a server does; the clients in this one.
- raw: the same events written straight to the bus by the fastest plain client,
  confluent-kafka (librdkafka), with the bus's guarantees (idempotent, so acks=all): every
  event produced, then flushed, in a process of its own too.
Each is run 3 times, alternately, on fresh topics; each figure is the median over the runs,
with its min and max beside it. The target: gateway / raw >= 0.5. Beside the rates, the CPU
time per event of each process while it works (the gateway's, the clients', the raw
producer's: what each costs whatever the load) and the load average.

    .venv/bin/python bench/functions.py [--events 20000] [--runs 3]

The last line printed is one JSON object: {"gateway_eps", "raw_eps", "ratio", "runs", ...}.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPConnection
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from lambdalake.eventlog import now_ms
from lambdalake.kafka_topics import ensure_topics
from lambdalake.testing.kafka import KafkaBroker

BATCH, IN_FLIGHT, PARTITIONS = 500, 4, 4


def events(count: int, run: str) -> list[dict[str, Any]]:
    ts = now_ms()
    return [{"event_id": f"{run}-{n}", "type": "pageview", "ts": ts, "url": f"/page/{n % 97}",
             "user_id": f"u{n % 1013}", "referrer": "https://example.com/",
             "duration_ms": n % 5000} for n in range(count)]


def serve_gateway(bootstrap: str, topic: str, home: str, control: Any) -> None:
    """The template's Ingest function behind the gateway (a child process): it sends its URL,
    then its CPU time whenever asked, until told to stop."""
    from lambdalake.functions import environment
    from lambdalake.functions.runtime.function import LocalFunction
    from lambdalake.functions.runtime.gateway import Gateway
    from lambdalake.functions.runtime.template import load_template
    from lambdalake.settings import Settings

    settings = Settings(bus="kafka", kafka_bootstrap=bootstrap, topic=topic, home=Path(home),
                        partitions=PARTITIONS)
    environment.bind(settings)
    gateway = Gateway([LocalFunction(load_template().functions["Ingest"])], "127.0.0.1", 0)
    gateway.start()
    control.send(gateway.url)
    while control.recv() == "cpu":
        control.send(time.process_time())
    gateway.stop()


class Rate(NamedTuple):
    eps: float
    cpu_us: float  # CPU time per event of the process measured


def gateway_eps(url: str, batch_events: list[dict[str, Any]]) -> Rate:
    """The rate of the gateway, and the clients' own CPU time per event. The clients are
    the standard library's HTTP/1.1 client, one kept-alive connection per request in
    flight: about 4x less CPU per request than httpx, so the load they put on the shared
    cores is small beside the gateway's."""
    bodies = [json.dumps({"events": batch_events[i:i + BATCH]}).encode()
              for i in range(0, len(batch_events), BATCH)]
    address = urlsplit(url)
    connections: queue.SimpleQueue[HTTPConnection] = queue.SimpleQueue()
    for _ in range(IN_FLIGHT):
        connections.put(HTTPConnection(address.hostname, address.port, timeout=60))

    def post(body: bytes) -> int:
        connection = connections.get()
        try:
            connection.request("POST", "/events", body, {"content-type": "application/json"})
            reply = connection.getresponse()
            answer = reply.read()
        finally:
            connections.put(connection)
        assert reply.status == 202, answer
        return int(json.loads(answer)["accepted"])

    started, cpu = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(IN_FLIGHT) as pool:
        accepted = sum(pool.map(post, bodies))
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    while not connections.empty():
        connections.get().close()
    assert accepted == len(batch_events), accepted
    return Rate(accepted / elapsed, cpu / accepted * 1e6)


def raw_producer(bootstrap: str, topic: str, batch_events: list[dict[str, Any]],
                 answer: Any) -> None:
    """librdkafka with the bus's guarantees, no gateway (a child process)."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True,
                         "linger.ms": 2})
    records = [(e["event_id"].encode(), json.dumps(e).encode()) for e in batch_events]
    failed: list[Any] = []
    producer.list_topics(topic, timeout=30)  # metadata first: time only the writes
    started, cpu = time.perf_counter(), time.process_time()
    for key, value in records:
        while True:
            try:
                producer.produce(topic, key=key, value=value,
                                 on_delivery=lambda error, _: error and failed.append(error))
                break
            except BufferError:  # the local queue is full: serve delivery reports, retry
                producer.poll(0.05)
        producer.poll(0)
    unsent = producer.flush(120)
    assert unsent == 0 and not failed, f"{unsent} unsent, {len(failed)} failed: {failed[:1]}"
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    answer.send(Rate(len(records) / elapsed, cpu / len(records) * 1e6))


def run_raw(bootstrap: str, topic: str, batch_events: list[dict[str, Any]]) -> Rate:
    receive, send = multiprocessing.Pipe(duplex=False)
    child = multiprocessing.Process(target=raw_producer,
                                    args=(bootstrap, topic, batch_events, send))
    child.start()
    rate = Rate(*receive.recv())
    child.join()
    return rate


def run_gateway(bootstrap: str, topic: str,
                batch_events: list[dict[str, Any]]) -> tuple[Rate, float]:
    """The gateway's rate with the clients' CPU time per event, and the gateway's."""
    control, theirs = multiprocessing.Pipe()
    with tempfile.TemporaryDirectory() as home:
        child = multiprocessing.Process(target=serve_gateway,
                                        args=(bootstrap, topic, home, theirs))
        child.start()
        url = control.recv()
        gateway_eps(url, batch_events[:BATCH])  # warm: the function's cold start, the producer
        try:
            control.send("cpu")
            cpu = control.recv()
            rate = gateway_eps(url, batch_events[BATCH:])
            control.send("cpu")
            cpu = control.recv() - cpu
            return rate, cpu / (len(batch_events) - BATCH) * 1e6
        finally:
            control.send("stop")
            child.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    multiprocessing.set_start_method("spawn")
    runs = []
    with KafkaBroker(partitions=PARTITIONS) as broker:
        for run in range(args.runs):
            gateway_topic, raw_topic = f"bench.gateway.{run}", f"bench.raw.{run}"
            for topic in (gateway_topic, raw_topic):
                ensure_topics(broker.bootstrap, topic, PARTITIONS)
            batch = events(args.events + BATCH, f"r{run}")
            gateway, server_cpu = run_gateway(broker.bootstrap, gateway_topic, batch)
            raw = run_raw(broker.bootstrap, raw_topic, batch[BATCH:])
            runs.append({"gateway_eps": round(gateway.eps), "raw_eps": round(raw.eps),
                         "ratio": round(gateway.eps / raw.eps, 3),
                         "gateway_cpu_us": round(server_cpu, 2),
                         "client_cpu_us": round(gateway.cpu_us, 2),
                         "raw_cpu_us": round(raw.cpu_us, 2),
                         "load": round(os.getloadavg()[0], 2)})
            print(f"run {run + 1}: gateway {gateway.eps:,.0f} events/s, raw producer "
                  f"{raw.eps:,.0f} events/s, ratio {gateway.eps / raw.eps:.2f}; CPU per event: "
                  f"gateway {server_cpu:.2f} us, its clients {gateway.cpu_us:.2f} us, raw "
                  f"{raw.cpu_us:.2f} us; load {os.getloadavg()[0]:.2f}",
                  file=sys.stderr, flush=True)
    print(json.dumps(summary(runs, args.events)))


def summary(runs: list[dict[str, Any]], events: int) -> dict[str, Any]:
    """Each figure's median over the runs, with its min and max."""
    keys = ("gateway_eps", "raw_eps", "ratio", "gateway_cpu_us", "client_cpu_us", "raw_cpu_us",
            "load")
    figures = {key: statistics.median(r[key] for r in runs) for key in keys}
    spread = {f"{key}_{edge}": fold(r[key] for r in runs)
              for key in keys for edge, fold in (("min", min), ("max", max))}
    return {**figures, **spread, "events": events, "batch": BATCH, "runs": runs}


if __name__ == "__main__":
    main()
