"""Ingestion while the Kafka broker is briefly unavailable (frozen with SIGSTOP, then resumed).

Invariant 4: an event answered 202 is on the bus; while the broker does not answer, a request
is refused with 503 and a reason to retry before its invocation times out (never a 504 or a
silent drop), and ingestion recovers by itself once the broker is back.
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from lambdalake.functions import archive
from lambdalake.functions.runtime.local import LocalRuntime
from lambdalake.functions.runtime.template import Template, load_template
from lambdalake.settings import Settings
from lambdalake.testing import free_port
from lambdalake.testing.kafka import KafkaBroker, read_topic

pytestmark = pytest.mark.kafka
INGEST_TIMEOUT_S = 3.0  # the function's timeout here, so the pause outlasts a request
PAUSE_S = 6.0


def pageviews(batch: str, n: int = 20) -> list[dict[str, Any]]:
    now = int(time.time() * 1000)
    return [{"event_id": f"{batch}-{i}", "type": "pageview", "ts": now, "url": "/outage",
             "user_id": f"u{i}"} for i in range(n)]


def test_a_broker_pause_is_503_never_a_lost_event(
    kafka_broker: KafkaBroker, tmp_path: Path
) -> None:
    settings = Settings(home=tmp_path, bus="kafka", kafka_bootstrap=kafka_broker.bootstrap,
                        topic=f"outage-{uuid.uuid4().hex[:10]}", partitions=2,
                        gateway_port=free_port())
    ingest = load_template().functions["Ingest"]
    template = Template(functions={"Ingest": ingest.model_copy(
        update={"timeout_seconds": INGEST_TIMEOUT_S})})
    url = f"http://127.0.0.1:{settings.gateway_port}/events"
    answers: list[tuple[str, int, dict[str, Any]]] = []
    stop = threading.Event()

    def keep_sending() -> None:
        while not stop.is_set():
            batch = f"b{len(answers)}"
            reply = httpx.post(url, json={"events": pageviews(batch)}, timeout=30)
            answers.append((batch, reply.status_code, reply.json()))

    with LocalRuntime(settings, template, on_drained=archive.ON_DRAINED):
        assert httpx.post(url, json={"events": pageviews("warm")}).status_code == 202
        sender = threading.Thread(target=keep_sending)
        sender.start()
        time.sleep(1)
        with kafka_broker.paused():
            time.sleep(PAUSE_S)
        deadline = time.monotonic() + 60
        while not (answers and answers[-1][1] == 202) and time.monotonic() < deadline:
            time.sleep(0.2)  # back to 202 by itself once the broker answers
        time.sleep(1)
        stop.set()
        sender.join(60)

    statuses = [status for _, status, _ in answers]
    assert set(statuses) == {202, 503}, statuses
    assert statuses[-1] == 202, "ingestion did not recover after the pause"
    for _, status, body in answers:
        if status == 503:
            assert body["accepted"] == 0
            assert body["error"].startswith("event bus unavailable, nothing accepted; retry")
    acknowledged = {f"{b}-{i}" for b, status, _ in answers if status == 202 for i in range(20)}
    on_topic = {m.key().decode() for m in read_topic(settings.kafka_bootstrap, settings.topic)}
    assert acknowledged <= on_topic
