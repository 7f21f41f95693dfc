"""What keeping real-time slices for rollbacks costs: cells and bytes per kept batch version.

The speed layer and the serving layer keep every arrival slice down to the lowest cut of the
kept batch versions (`LAMBDALAKE_VERSIONS_KEPT`), so that a rollback is exact at once. Each
kept version beyond the serving one holds the slices between two consecutive cuts, about
`batch interval / slice` slices. This feeds the example project's synthetic stream at a
steady rate into the kernel's `ViewState` (the speed layer's cells: frozen values once their
slice is closed) and `RealtimeCells` (the serving layer's, frozen values), one simulated minute
a slice, and measures the cells each slice holds and the memory they free when dropped
(tracemalloc: the slices dropped are closed, so their sketches are Python bytes, not C++
working sketches tracemalloc would not see).

    .venv/bin/python bench/realtime_memory.py [--rate 1000] [--minutes 10]

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tracemalloc
from collections.abc import Callable

from lambdalake.events import Event, Validator
from lambdalake.example import project
from lambdalake.realtime import RealtimeCells
from lambdalake.settings import Settings
from lambdalake.synthetic import WebAnalyticsStream
from lambdalake.viewstate import ViewState

T0 = 1_800_000_000_000  # a slice boundary


def fill(rate: int, minutes: int, slice_ms: int) -> tuple[ViewState, RealtimeCells]:
    """Both layers' cells after `minutes` of the stream at `rate` events/s."""
    settings = Settings()
    state = ViewState(project, slice_ms, settings.dedup_window_ms)
    cells = RealtimeCells(project)
    validator = Validator(project.schemas, settings.max_future_seconds * 1000)
    stream = WebAnalyticsStream(seed=1)
    for second in range(minutes * slice_ms // 1000):
        arrival = T0 + second * 1000
        for _ in range(rate):
            event = validator.validate(stream.event(arrival), arrival)
            assert isinstance(event, Event)
            state.apply(event, arrival)
        cells.upsert(state.drain())
    return state, cells


def freed_bytes(drop: Callable[[], None]) -> int:
    """The memory `drop` frees (tracemalloc must be tracing)."""
    before = tracemalloc.get_traced_memory()[0]
    drop()
    return before - tracemalloc.get_traced_memory()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=int, default=1_000, help="events per second")
    parser.add_argument("--minutes", type=int, default=10, help="slices of one minute")
    args = parser.parse_args()
    settings = Settings()
    slice_ms = settings.slice_ms
    tracemalloc.start()
    state, cells = fill(args.rate, args.minutes, slice_ms)
    per_slice = [
        sum(1 for view in state.cells.values() for cell in view if cell[0] == T0 + i * slice_ms)
        for i in range(args.minutes)
    ]
    half = T0 + args.minutes // 2 * slice_ms
    dropped = sum(per_slice[: args.minutes // 2])
    speed_bytes = freed_bytes(lambda: state.drop_below(half))
    serving_bytes = freed_bytes(lambda: cells.drop_below(half))
    tracemalloc.stop()
    cells_per_slice = statistics.median(per_slice)
    slices_per_version = settings.batch_interval_seconds * 1000 / slice_ms
    per_cell = {"speed": speed_bytes / dropped, "serving": serving_bytes / dropped}
    per_version = cells_per_slice * slices_per_version
    figures = {
        "rate_eps": args.rate,
        "slice_seconds": slice_ms // 1000,
        "batch_interval_seconds": settings.batch_interval_seconds,
        "cells_per_slice": cells_per_slice,
        "cells_per_kept_version": per_version,
        "bytes_per_cell": {layer: round(b) for layer, b in per_cell.items()},
        "mib_per_kept_version": {
            layer: round(per_version * b / 2**20, 2) for layer, b in per_cell.items()
        },
    }
    print(f"{args.rate} events/s, {slice_ms // 1000} s slices, a batch run every "
          f"{settings.batch_interval_seconds} s: {cells_per_slice:.0f} cells a slice, "
          f"{per_version:.0f} cells per kept version, speed "
          f"{figures['mib_per_kept_version']['speed']} MiB and serving "
          f"{figures['mib_per_kept_version']['serving']} MiB per kept version")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
