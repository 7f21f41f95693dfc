"""The serving feed's cells against a recompute: whatever polls the realtime records of several
partitions come in, every cell holds the merge of each partition's latest value."""

from __future__ import annotations

from typing import Any

import orjson
from datasketches import kll_doubles_sketch
from hypothesis import given, settings
from hypothesis import strategies as st

from lambdalake.event_columns import BatchDecoder
from lambdalake.events import Validator
from lambdalake.example import project
from lambdalake.monoids import merge_all
from lambdalake.realtime import RealtimeCells
from lambdalake.serving.realtime_feed import FeedRecords
from lambdalake.settings import Settings
from lambdalake.speed.kafka_common import PartitionState, Record
from lambdalake.synthetic import WebAnalyticsStream

PARTITIONS = 3
T0 = 1_796_227_200_000


def transactions(count: int, events: int) -> tuple[list[Record], list[PartitionState]]:
    """The realtime records of `count` transactions of every partition, each partition folding
    `events` events a transaction; and the partitions' states after them."""
    parts = [PartitionState(p, project, Settings()) for p in range(PARTITIONS)]
    checks = Validator(project.schemas, 10**12), BatchDecoder(project.schemas, 10**12)
    stream, records = WebAnalyticsStream(seed=7), []
    for t in range(count):
        for part in parts:
            now = T0 + t * 60_000
            values = [orjson.dumps(stream.event(now)) for _ in range(events)]
            assert not part.take_all(values, [now] * events, checks[1], checks[0])
            records += part.realtime_records()
    return records, parts


RECORDS, PARTS = transactions(4, 40)


def comparable(view: str, values: tuple[Any, ...]) -> tuple[Any, ...]:
    """Exact metrics as they are; sketches as their estimates; KLL's (randomized) as its n."""
    metrics = project.views[view].metrics.values()
    return tuple(kll_doubles_sketch.deserialize(v).n if m.kind == "quantiles"
                 else m.result(v) for m, v in zip(metrics, values, strict=True))


def recompute() -> dict[tuple[str, Any], tuple[Any, ...]]:
    """Each cell: the merge of every partition's final value of it."""
    by_cell: dict[tuple[str, Any], list[tuple[Any, ...]]] = {}
    for part in PARTS:
        for u in part.view.everything():
            by_cell.setdefault((u.view, (u.slice, u.bucket, u.key)), []).append(u.values)
    merged = {}
    for (view, cell), values in by_cell.items():
        metrics = project.views[view].metrics.values()
        merged[view, cell] = comparable(view, tuple(
            merge_all(m, [v[i] for v in values]) for i, m in enumerate(metrics)))
    return merged


def served(cells: RealtimeCells) -> dict[tuple[str, Any], tuple[Any, ...]]:
    return {(view, (start, bucket, key)): comparable(view, values)
            for view, slices in cells._cells.items() for start, held in slices.items()
            for (bucket, key), values in held.items()}


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(0, len(RECORDS)), max_size=12))
def test_cells_merge_every_partitions_latest_value_whatever_the_polls(cuts: list[int]) -> None:
    cells = RealtimeCells(project)
    feed = FeedRecords(cells)
    bounds = [0, *sorted(cuts), len(RECORDS)]
    for start, end in zip(bounds, bounds[1:], strict=False):
        cells.upsert(feed.read(RECORDS[start:end], PARTITIONS))
    assert served(cells) == recompute()


def test_a_cell_several_partitions_change_in_one_poll_is_upserted_once() -> None:
    feed = FeedRecords(RealtimeCells(project))
    updates = feed.read(RECORDS, PARTITIONS)
    cells = [(u.view, u.slice, u.bucket, u.key) for u in updates]
    assert len(cells) == len(set(cells)) == len(recompute())
