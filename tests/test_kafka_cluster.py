"""The bus on a 3-broker Kafka cluster (KRaft): topics replicated 3 times with
`min.insync.replicas` 2, producers with acks=all. One broker killed with -9 under load:
ingestion keeps acknowledging, the speed worker and the archiver keep going, every
acknowledged event is counted exactly once, and the broker rejoins every partition's ISR."""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from pathlib import Path

import pytest
from test_flow import Flow, batch_run, recompute, send

from lambdalake.eventlog import now_ms
from lambdalake.producer import ProduceStats
from lambdalake.synthetic import WebAnalyticsStream
from lambdalake.testing.kafka import KafkaCluster

pytestmark = [pytest.mark.kafka, pytest.mark.long,
              pytest.mark.skipif(not shutil.which("java"), reason="needs Java 17+")]


@pytest.fixture(scope="module")
def cluster():
    with KafkaCluster(3) as running:
        yield running


@pytest.fixture
def flow(tmp_path: Path, cluster: KafkaCluster):
    flow = Flow(tmp_path)
    flow.env |= {"LAMBDALAKE_TOPIC": f"cluster-{uuid.uuid4().hex[:10]}",
                 "LAMBDALAKE_REPLICATION_FACTOR": "3", "LAMBDALAKE_MIN_INSYNC_REPLICAS": "2"}
    flow.start("--bus", "kafka", "--bootstrap", cluster.bootstrap)
    yield flow
    flow.stop()


def steady(flow: Flow, events: list[dict], stats: ProduceStats, per_s: float) -> None:
    """Send `events` in batches of 100 at about `per_s` events a second."""
    for start in range(0, len(events), 100):
        began = time.monotonic()
        send(flow, events[start:start + 100], stats)
        time.sleep(max(0.0, 100 / per_s - (time.monotonic() - began)))


def test_a_broker_killed_under_load_loses_and_doubles_nothing(
    flow: Flow, cluster: KafkaCluster
) -> None:
    stream = WebAnalyticsStream(seed=31)
    events = [stream.event(now_ms()) for _ in range(6_000)]
    stats = ProduceStats()
    producer = threading.Thread(target=steady, args=(flow, events, stats, 300.0))
    producer.start()
    time.sleep(5)
    victim = cluster.brokers[1]
    killed_at = time.monotonic()
    victim.kill()
    retries_before_restart = stats.retries
    time.sleep(5)
    victim.restart()
    producer.join(300)
    assert not producer.is_alive()
    topic = flow.env["LAMBDALAKE_TOPIC"]
    deadline = time.monotonic() + 90
    while cluster.smallest_isr(topic) < 3:
        assert time.monotonic() < deadline, "the restarted broker did not rejoin the ISR"
        time.sleep(1)
    rejoined_s = time.monotonic() - killed_at
    print(f"acknowledged {len(stats.acknowledged_ids)} of {len(events)}; retries "
          f"{stats.retries} ({retries_before_restart} while the broker was down); "
          f"ISR whole {rejoined_s:.0f} s after the kill")
    assert sorted(stats.acknowledged_ids) == sorted(e["event_id"] for e in events)
    assert stats.retries == 0, "a request was refused while two replicas were in sync"

    pageviews, orders = recompute(events)
    assert flow.wait_for(dict(pageviews), "pageviews_by_url_hour", "url", "pageviews",
                         seconds=120) == pageviews
    time.sleep(1.5)  # let the archiver pass a slice boundary
    answer = batch_run(flow)
    assert {r["url"]: r["pageviews"] for r in answer["rows"]} == pageviews
    assert flow.wait_for(dict(orders), "revenue_by_sku_day", "sku", "orders") == orders
