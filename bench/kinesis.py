"""Speed-layer throughput and freshness on Kinesis (a moto server started here, in its own
process, serving Kinesis, DynamoDB and S3; its Kinesis as the tests', keeping every record it
acknowledges: `lambdalake.testing.moto_kinesis`).

One stream of N events (the example project's synthetic stream, 4 shards), read by:
- the reference: a plain boto3 loop per shard, the shards side by side in threads, GetRecords
  10,000 at a time and every record's data decoded with orjson, nothing else;
- the Kinesis speed driver (speed/kinesis.py) folding the whole example project (counts, sums,
  HLL, KLL and Theta sketches), its shard leases in DynamoDB and its state written to S3,
  timed from its leases taken to every shard read and its state written;
each as events/s, and their ratio; and how fast a plain boto3 PutRecords loop (500 records a
call, one thread) put the N events (`put_eps`), beside the load the gateway took
(`freshness_load_eps`). Then freshness as a user sees it: `lambdalake up --bus
kinesis` on that server, a steady 2,000 events/s sent to the gateway over HTTP and a probe
event every 50 ms, from the gateway's 202 for `POST /events` to the first
`GET /views/pageviews_by_url_hour` answer that counts it (Kinesis's polling delay is part of
it). A probe never counted within 10 s is a miss (an infinite delay in the percentiles).

Every figure is the median of 3 runs (`--runs`), with min and max under `runs`.

    .venv/bin/python bench/kinesis.py [--events 200000] [--runs 3]

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
import httpx
import orjson

from lambdalake import kinesis as streams
from lambdalake.example import project
from lambdalake.settings import Settings
from lambdalake.storage import open_store
from lambdalake.synthetic import WebAnalyticsStream
from lambdalake.testing.moto_server import MotoServer

SHARDS = 4
FRESHNESS_RATE = 2_000
HERE = Path(__file__).resolve().parent


def _kafka_bench() -> Any:
    """bench/speed.py, for what both benchmarks measure alike (probes, load, spreads)."""
    spec = importlib.util.spec_from_file_location("speed_bench", HERE / "speed.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


common = _kafka_bench()
say, free_port, spread, rounded, measured = (
    common.say, common.free_port, common.spread, common.rounded, common.measured)


def put_events(kinesis: Any, stream: str, n: int) -> int:
    """Put n events (1% are producer retries); how many distinct ones."""
    events = WebAnalyticsStream(seed=1)
    now = int(time.time() * 1000)
    distinct: set[tuple[str, str]] = set()
    for at in range(0, n, 500):
        batch = [events.event(now) for _ in range(min(500, n - at))]
        distinct.update((e["type"], e["event_id"]) for e in batch)
        entries = [{"PartitionKey": e["event_id"], "Data": orjson.dumps(e)} for e in batch]
        while entries:
            reply = kinesis.put_records(StreamName=stream, Records=entries)
            entries = [e for e, out in zip(entries, reply["Records"], strict=True)
                       if "ErrorCode" in out]
    return len(distinct)


# -- the reference: read and decode, nothing else ---------------------------------------------


def raw_eps(kinesis: Any, stream: str, n: int) -> float:
    """The shards read side by side, a thread each, as the driver reads them."""
    shards = streams.list_shards(kinesis, stream)
    started = time.perf_counter()
    with ThreadPoolExecutor(len(shards)) as pool:
        read = sum(pool.map(lambda shard: read_shard(kinesis, stream, shard.shard_id), shards))
    assert read == n, f"the reference read {read} of {n} events"
    return n / (time.perf_counter() - started)


def read_shard(kinesis: Any, stream: str, shard_id: str) -> int:
    iterator = kinesis.get_shard_iterator(StreamName=stream, ShardId=shard_id,
                                          ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
    read = 0
    while True:
        answer = kinesis.get_records(ShardIterator=iterator, Limit=10_000)
        for record in answer["Records"]:
            orjson.loads(record["Data"])
        read += len(answer["Records"])
        iterator = answer["NextShardIterator"]
        if not answer["Records"] and answer["MillisBehindLatest"] == 0:
            return read


# -- the driver -------------------------------------------------------------------------------


def driver_eps(settings: Settings, n: int, distinct: int, run: int) -> float:
    """The driver from its leases taken to every shard read and its state written."""
    from lambdalake.speed.kinesis import KinesisSpeed

    s = settings.model_copy(update={"kinesis_lease_table": f"bench-leases-{run}",
                                    "store": f"{settings.store}/run-{run}"})
    store = open_store(s.store_url, s.s3_endpoint_url)
    speed = KinesisSpeed(s, project, store, f"bench-{run}")
    speed.leases.ensure()
    speed.balance()
    assert len(speed.held) == SHARDS, "the driver holds every shard"
    started = time.perf_counter()
    while True:
        speed.step()
        caught_up = all(h.reader.millis_behind == 0 and h.polled_at for h in speed.held.values())
        if caught_up:
            break
    speed.write_all()
    seconds = time.perf_counter() - started
    folded = sum(h.state.part.view.tracked_ids for h in speed.held.values())
    assert folded == distinct, f"the driver holds {folded} of {distinct} distinct events"
    speed.close()
    return n / seconds


# -- freshness: `lambdalake up --bus kinesis` ---------------------------------------------------


class Lambdalake:
    """`lambdalake up --bus kinesis` in its own process: gateway, Kinesis speed worker, API."""

    def __init__(self, moto: MotoServer, home: Path):
        self.gateway, self.api = free_port(), free_port()
        name = uuid.uuid4().hex[:8]
        boto3.client("s3", endpoint_url=moto.url).create_bucket(Bucket=f"fresh-{name}")
        env = dict(os.environ, LAMBDALAKE_HOME=str(home), LAMBDALAKE_BUS="kinesis",
                   LAMBDALAKE_KINESIS_STREAM=f"fresh-{name}", LAMBDALAKE_PARTITIONS=str(SHARDS),
                   LAMBDALAKE_KINESIS_ENDPOINT_URL=moto.url, LAMBDALAKE_S3_ENDPOINT_URL=moto.url,
                   LAMBDALAKE_STORE=f"s3://fresh-{name}/lake", LAMBDALAKE_PG_PORT="0",
                   LAMBDALAKE_GATEWAY_PORT=str(self.gateway), LAMBDALAKE_API_PORT=str(self.api))
        home.mkdir(parents=True)
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from lambdalake.stack.cli import main; main()", "up",
             "--batch-every", "86400"],
            env=env, cwd=home, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
            stderr=open(home / "up.log", "wb"),
        )

    def __enter__(self) -> Lambdalake:
        """Once the API is ready and the gateway listens: on Kinesis the API is ready as soon
        as it starts (no shard has state yet), possibly before the gateway."""
        common.Lambdalake.__enter__(self)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                httpx.get(self.url(self.gateway, "/"), timeout=2)
                return self
            except httpx.TransportError:
                time.sleep(0.5)
        raise RuntimeError("the gateway of lambdalake up did not listen in 120 s")

    __exit__ = common.Lambdalake.__exit__
    url = staticmethod(common.Lambdalake.url)


def freshness(moto: MotoServer, home: Path, runs: int) -> tuple[list[dict[str, float]], float]:
    """Freshness runs on one running stack under the steady load; the load achieved (events/s)."""
    with Lambdalake(moto, home) as stack:
        stop, sent, visible = threading.Event(), [0] * common.LOAD_SENDERS, dict[str, float]()
        load = threading.Thread(target=common.steady_load, args=(
            stack.url(stack.gateway, "/events"), stop, sent, FRESHNESS_RATE))
        watcher = threading.Thread(target=common.watch, args=(
            stack.url(stack.api, f"/views/{common.PROBED_VIEW}"), stop, visible))
        started = time.perf_counter()
        load.start()
        time.sleep(5)  # the speed worker takes its leases and the load settles
        watcher.start()
        results = [common.freshness_run(stack, run, visible, {}) for run in range(runs)]
        stop.set()
        load.join()
        watcher.join()
        return results, sum(sent) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    n, runs = args.events, args.runs
    home = Path(tempfile.mkdtemp(prefix="lambdalake-bench-kinesis-"))
    say(f"load before: {os.getloadavg()}")
    with MotoServer(home) as moto:
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
        os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        boto3.client("s3", endpoint_url=moto.url).create_bucket(Bucket="bench")
        settings = Settings(bus="kinesis", kinesis_stream="bench-events",
                            kinesis_endpoint_url=moto.url, s3_endpoint_url=moto.url,
                            store="s3://bench/lake", partitions=SHARDS, home=home)
        kinesis = streams.client(moto.url)
        streams.ensure_stream(kinesis, settings.kinesis_stream, SHARDS)
        say(f"putting {n} events")
        started = time.perf_counter()
        distinct = put_events(kinesis, settings.kinesis_stream, n)
        put_eps = n / (time.perf_counter() - started)
        say(f"plain boto3 PutRecords loop (500 a call, one thread): {put_eps:,.0f} events/s")
        figures = {
            "raw_eps": measured("raw boto3 GetRecords + orjson", runs,
                                lambda _: raw_eps(kinesis, settings.kinesis_stream, n)),
            "kinesis_eps": measured("kinesis driver", runs,
                                    lambda run: driver_eps(settings, n, distinct, run)),
        }
        fresh, load_eps = freshness(moto, home / "fresh", runs)
    say(f"load after: {os.getloadavg()}")
    print(json.dumps(report(figures, fresh, load_eps, runs) | {"put_eps": round(put_eps)}))


def report(figures: dict[str, list[float]], fresh: list[dict[str, float]], load_eps: float,
           runs: int) -> dict[str, Any]:
    raw, driver = (statistics.median(figures[k]) for k in ("raw_eps", "kinesis_eps"))
    return {
        "raw_eps": round(raw), "kinesis_eps": round(driver),
        "kinesis_ratio": round(driver / raw, 3),
        **common.freshness_figures(fresh, load_eps, figures, runs),
    }


if __name__ == "__main__":
    main()
