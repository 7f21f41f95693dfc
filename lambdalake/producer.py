"""Send events to the ingestion gateway at a steady rate, retrying with the same event ids.

A batch is acknowledged only by a 202; on a connection error or a 5xx it is resent as it
was (same event ids), so the system sees producer retries exactly as it would in the field.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from lambdalake.auth import KEY_HEADER


@dataclass
class ProduceStats:
    sent: int = 0
    accepted: int = 0
    rejected: int = 0
    retries: int = 0
    acknowledged_ids: list[str] = field(default_factory=list)


def send_batch(
    client: httpx.Client,
    url: str,
    batch: list[dict[str, Any]],
    stats: ProduceStats,
    attempts: int = 30,
) -> None:
    for attempt in range(attempts):
        try:
            reply = client.post(url, json={"events": batch})
        except httpx.TransportError:
            reply = None
        if reply is not None and reply.status_code in (202, 400):
            body = reply.json()
            rejected = {r["index"] for r in body.get("rejected", [])}
            stats.sent += len(batch)
            stats.accepted += body.get("accepted", 0)
            stats.rejected += len(rejected)
            stats.acknowledged_ids += [
                e["event_id"] for i, e in enumerate(batch) if i not in rejected
            ]
            return
        if reply is not None and reply.status_code < 500 and reply.status_code != 429:
            raise RuntimeError(f"gateway answered {reply.status_code}: {reply.text[:200]}")
        stats.retries += 1
        time.sleep(min(0.05 * 2**attempt, 2.0))
    raise RuntimeError(f"gateway at {url} did not acknowledge after {attempts} attempts")


def produce(
    url: str,
    batches: Iterator[list[dict[str, Any]]],
    rate: float,
    total: int | None,
    on_progress: Callable[[ProduceStats], None] = lambda stats: None,
    stop: Callable[[], bool] = lambda: False,
    api_key: str | None = None,
) -> ProduceStats:
    """Send `total` events (forever if None) at about `rate` events per second."""
    stats = ProduceStats()
    started = time.monotonic()
    headers = {KEY_HEADER: api_key} if api_key else {}
    with httpx.Client(timeout=30, headers=headers) as client:
        for batch in batches:
            if total is not None:
                batch = batch[: total - stats.sent]
            if not batch or stop():
                break
            send_batch(client, url, batch, stats)
            on_progress(stats)
            ahead = stats.sent / rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
    return stats
