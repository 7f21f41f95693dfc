"""The speed layer's Prometheus metrics, the same for every driver."""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge

from lambdalake.viewstate import ViewState

log = logging.getLogger("lambdalake.speed")

APPLIED = Counter("lambdalake_speed_events_total", "Events read by the speed layer", ["outcome"])
DEAD_LETTERS = Counter(
    "lambdalake_speed_dead_letters_total",
    "Records sent to the dead-letter topic by the speed layer",
    ["kind"],
)
DEDUP_IDS = Gauge("lambdalake_speed_dedup_ids", "Event ids held for dedup", ["partition"])
FORGOTTEN_EARLY = Counter(
    "lambdalake_speed_dedup_forgotten_early_total",
    "Event ids forgotten inside the dedup window, to stay within LAMBDALAKE_DEDUP_MAX_IDS",
    ["partition"],
)


class DedupGauges:
    """Publishes one view state's dedup figures; warns once when its cap starts forgetting."""

    def __init__(self, partition: str):
        self.partition = partition
        self._forgotten = 0

    def report(self, state: ViewState) -> None:
        DEDUP_IDS.labels(self.partition).set(state.tracked_ids)
        fresh = state.forgotten_early - self._forgotten
        if fresh <= 0:
            return
        if not self._forgotten:
            log.warning("dedup window shortened: the id cap is reached",
                        extra={"partition": self.partition, "max_ids": state.max_ids})
        FORGOTTEN_EARLY.labels(self.partition).inc(fresh)
        self._forgotten = state.forgotten_early
