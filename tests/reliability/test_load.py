"""Load: a steady stream from several producers (5,000 events/s for 10 minutes under
`make test-reliability`, 1,000/s for 15 s in `make test`), with a batch run every 30 s as
a deployment's scheduler starts them. The memory of every process stays bounded (no growth
from the first half of the run to the second: the speed layer holds only the slices the
kept batch versions do not cover yet), and the real-time lag recovers once the stream
stops; then the reconciliation."""

from __future__ import annotations

import time

import pytest
from harness import FULL, Lake, Traffic, reconcile

pytestmark = pytest.mark.kafka
RATE = 5_000.0 if FULL else 1_000.0
SECONDS = 600.0 if FULL else 15.0
PRODUCERS = 4
GROWTH_MB = 150.0  # a process may grow this much past its first half's peak (caches, JIT)
BATCH_EVERY_S = 30.0  # (one at a time: under load a run takes longer than that here)


@pytest.mark.long
@pytest.mark.timeout(SECONDS + 600)
def test_a_steady_load_keeps_memory_bounded_and_the_lag_recovers(
    lake: Lake, runs: list[Traffic]
) -> None:
    producers = [Traffic(lake, RATE / PRODUCERS, seed=80 + n, batch=250).start()
                 for n in range(PRODUCERS)]
    runs.extend(producers)
    samples: list[dict[str, float]] = []
    started = time.monotonic()
    batch, batched = lake.cli("batch", "run"), started
    while time.monotonic() - started < SECONDS:
        samples.append(lake.memory_mb())
        if batch.poll() is not None and time.monotonic() - batched >= BATCH_EVERY_S:
            batch, batched = lake.cli("batch", "run"), time.monotonic()
        time.sleep(1.0)
    for producer in producers:
        producer.stop()
    batch.communicate(timeout=600)
    stopped = time.monotonic()
    acknowledged = sum(len(p.acknowledged) for p in producers)
    half = len(samples) // 2
    peaks = {name: (max(s.get(name, 0) for s in samples[:half]),
                    max(s.get(name, 0) for s in samples[half:])) for name in samples[0]}
    print(f"load: {acknowledged / (stopped - started):.0f} events/s acknowledged "
          f"(target {RATE:.0f}); memory MB first half -> second half: {peaks}")
    merged = Traffic(lake, RATE)  # one row in the table for the four producers
    for producer in producers:
        merged.events |= producer.events
        merged.acknowledged |= producer.acknowledged
        merged.resent |= producer.resent
        merged.five_xx += producer.five_xx
        merged.last_ack_ms = max(merged.last_ack_ms, producer.last_ack_ms)
    merged.first_ack_ms = min(p.first_ack_ms for p in producers)
    figures = reconcile(lake, [*runs, merged], f"load {RATE:.0f}/s x {SECONDS:.0f} s", stopped,
                        max_rss_mb=max(max(s.values()) for s in samples))
    assert figures.recovery_s < 120, "the real-time lag did not recover within 2 minutes"
    for name, (first, second) in peaks.items():
        assert second <= first + GROWTH_MB, f"{name} grew from {first:.0f} to {second:.0f} MB"
