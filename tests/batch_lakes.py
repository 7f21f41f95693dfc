"""Random bus histories archived in stages, for comparing batch engines and run modes.

A history is every record sent on a few partitions (arrival never decreasing within one), with
producer retries (the same event again, or another under its id, of its type or of another,
maybe on another partition) and event times unrelated to arrival. It is archived in stages:
stage k archives what arrived before its cut T_k, in one or two batches per partition,
sometimes with an archive batch retried over offsets an earlier stage already archived, then
moves every watermark to T_k, so the run after stage k has cut T_k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from datasketches import kll_doubles_sketch
from hypothesis import strategies as st

from lambdalake import master
from lambdalake.catalog import Manifest
from lambdalake.events import Event, EventSchema
from lambdalake.example import PAGEVIEW
from lambdalake.example import PURCHASE as EXAMPLE_PURCHASE
from lambdalake.example import project as example
from lambdalake.master import Archived
from lambdalake.monoids import ApproxDistinct, Count, DistinctSet, Max, Min, Quantiles, Sum
from lambdalake.project import Project
from lambdalake.settings import Settings
from lambdalake.storage import ObjectStore
from lambdalake.views import Condition, View

# Engine agreement over doubles and their sketches: `amount` as a float here (the example's is
# decimal(18,2), which tests/test_decimals.py covers in every engine).
PURCHASE = EventSchema("purchase", {**EXAMPLE_PURCHASE.fields, "amount": "float"})

DAY = 86_400_000
SLICE_MS = 1_000
URLS = ["/", "/a", "/b"]
USERS = [f"u{i}" for i in range(8)] + [""]
SKUS = ["s0", "s1", "it's \\ odd"]  # a quote and a backslash: the filter must match it as is

# The example views, and views reaching the rest of each engine's translation: filters on
# numbers and strings, min and max, nullable keys, two keys, minute buckets, and sketches of
# integers (nullable) and doubles besides strings.
PROJECT = Project.of(
    schemas=[PAGEVIEW, PURCHASE],
    views=[
        *example.views.values(),
        View(
            name="durations_by_referrer_minute",
            event_type="pageview",
            keys=("referrer",),
            bucket="minute",
            metrics={
                "total_ms": Sum("duration_ms"),
                "shortest": Min("duration_ms"),
                "longest": Max("duration_ms"),
                "views": Count(),
                "durations": ApproxDistinct("duration_ms"),
                "duration_set": DistinctSet("duration_ms"),
                "duration_quantiles": Quantiles("duration_ms"),
            },
            where=(Condition("duration_ms", ">=", 100),),
        ),
        View(
            name="purchases_by_user_day",
            event_type="purchase",
            keys=("user_id", "sku"),
            bucket="day",
            metrics={
                "spent": Sum("amount"),
                "smallest": Min("amount"),
                "largest": Max("amount"),
                "amounts": ApproxDistinct("amount"),
                "amount_set": DistinctSet("amount"),
                "amount_quantiles": Quantiles("amount"),
            },
            where=(Condition("amount", ">", 5.0), Condition("sku", "!=", SKUS[2])),
        ),
    ],
)


@dataclass(frozen=True)
class History:
    partitions: int
    records: list[Archived]
    cuts: list[int]
    stages: list[list[list[Archived]]]  # per stage, the archive batches it writes

    def settings(self, **overrides: Any) -> Settings:
        return Settings(partitions=self.partitions, slice_seconds=SLICE_MS // 1000, **overrides)

    def archive(self, store: ObjectStore, stage: int) -> None:
        """Write stage `stage`'s batches, then move every watermark to its cut."""
        for batch in self.stages[stage]:
            master.write_batch(store, PROJECT.schemas, batch[0].partition, batch)
        for partition in range(self.partitions):
            archived = sum(r.arrival < self.cuts[stage] for r in self.on(partition))
            master.write_watermark(store, partition, archived, self.cuts[stage])

    def on(self, partition: int) -> list[Archived]:
        return [r for r in self.records if r.partition == partition]


@st.composite
def events(draw: st.DrawFn, event_id: str, kind: str | None = None) -> Event:
    ts = draw(st.integers(0, 3 * DAY))
    if (kind or draw(st.sampled_from(["pageview", "purchase"]))) == "pageview":
        fields = {
            "url": draw(st.sampled_from(URLS)),
            "user_id": draw(st.sampled_from(USERS)),
            "referrer": draw(st.none() | st.sampled_from(["g", "t", ""])),
            "duration_ms": draw(st.none() | st.integers(0, 300)),
        }
        return Event(event_id, "pageview", ts, fields)
    amount = draw(st.floats(0, 50, allow_nan=False).map(lambda x: round(x, 2)))
    fields = {"user_id": draw(st.sampled_from(USERS)), "sku": draw(st.sampled_from(SKUS))}
    return Event(event_id, "purchase", ts, fields | {"amount": amount})


@st.composite
def histories(draw: st.DrawFn, stages: int = 3, max_events: int = 30) -> History:
    partitions = draw(st.integers(1, 3))
    originals = [draw(events(f"e{i}")) for i in range(draw(st.integers(0, max_events)))]
    repeated = draw(st.lists(st.sampled_from(originals), max_size=8)) if originals else []
    retries = [draw(st.just(e) | events(e.event_id, e.type) | events(e.event_id)) for e in repeated]
    arrival = {p: draw(st.integers(SLICE_MS, 3 * SLICE_MS)) for p in range(partitions)}
    records, offsets = [], dict.fromkeys(range(partitions), 0)
    for event in draw(st.permutations(originals + retries)):
        partition = draw(st.integers(0, partitions - 1))
        arrival[partition] += draw(st.integers(0, 1_500))
        records.append(Archived(event, partition, offsets[partition], arrival[partition]))
        offsets[partition] += 1
    slices = range(1, max(arrival.values()) // SLICE_MS + 3)
    cuts = draw(st.lists(st.sampled_from(slices), min_size=stages, max_size=stages, unique=True))
    cuts = [c * SLICE_MS for c in sorted(cuts)]
    history = History(partitions, records, cuts, [])
    done = dict.fromkeys(range(partitions), 0)
    for cut in cuts:
        history.stages.append(draw(stage_batches(history, done, cut)))
    return history


@st.composite
def stage_batches(draw: st.DrawFn, history: History, done: dict[int, int], cut: int):
    """Each partition's records arriving before `cut` not archived yet; maybe a retried batch
    reaching back into offsets archived before."""
    batches = []
    for partition in range(history.partitions):
        records = history.on(partition)
        upto = sum(r.arrival < cut for r in records)
        start = draw(st.integers(0, done[partition])) if draw(st.booleans()) else done[partition]
        if upto > start:
            split = draw(st.integers(start + 1, upto))
            batches += [b for b in (records[start:split], records[split:upto]) if b]
        done[partition] = max(done[partition], upto)
    return batches


# -- comparing published or computed tables ------------------------------------------------


def published(store: ObjectStore, manifest: Manifest) -> dict[str, pa.Table]:
    return {
        name: pa.concat_tables(pq.read_table(pa.BufferReader(store.get(k))) for k in files.files)
        for name, files in manifest.views.items()
    }


def assert_same_view(view: View, left: pa.Table, right: pa.Table) -> None:
    """Same rows in the same order; metrics give equal answers (float sums to rounding;
    sketches by what they answer, with the one estimator every engine's sketch is read with;
    KLL sketches, whose answers depend on the order values came once a group has more values
    than k, within their rank error: `assert_same_quantiles`)."""
    assert left.schema.remove_metadata() == right.schema.remove_metadata(), view.name
    groups = ["bucket", *view.keys]
    assert left.select(groups).to_pylist() == right.select(groups).to_pylist(), view.name
    for name, metric in view.metrics.items():
        if isinstance(metric, Quantiles):
            for x, y in zip(left[name].to_pylist(), right[name].to_pylist(), strict=True):
                assert_same_quantiles(metric, x, y, f"{view.name}.{name}")
            continue
        a = [metric.result(x) for x in left[name].to_pylist()]
        b = [metric.result(x) for x in right[name].to_pylist()]
        if pa.types.is_floating(left.schema.field(name).type) and metric.kind == "sum":
            pairs = zip(a, b, strict=True)
            assert all(math.isclose(x, y, rel_tol=1e-12, abs_tol=1e-9) for x, y in pairs), name
        else:
            assert a == b, f"{view.name}.{name}: {a} != {b}"


def assert_same_quantiles(metric: Quantiles, left: bytes | None, right: bytes | None,
                          name: str) -> None:
    """Two KLL sketches of the same values: the same count, minimum and maximum (exact in any
    sketch); equal answers while neither has compacted (each then holds every value); else
    each answer's rank in the other sketch within the two sketches' rank errors."""
    a, b = (None if acc is None else kll_doubles_sketch.deserialize(acc) for acc in (left, right))
    if a is None or b is None or a.is_empty() or b.is_empty():
        assert metric.result(left) == metric.result(right), name
        return
    assert (a.n, a.get_min_value(), a.get_max_value()) == (
        b.n, b.get_min_value(), b.get_max_value()), name
    if not (a.is_estimation_mode() or b.is_estimation_mode()):
        assert metric.result(left) == metric.result(right), name
        return
    error = a.normalized_rank_error(False) + b.normalized_rank_error(False)
    for acc, other in ((left, b), (right, a)):
        for rank_text, value in (metric.result(acc) or {}).items():
            rank = float(rank_text)
            below, through = other.get_rank(value, inclusive=False), other.get_rank(value)
            assert below - error <= rank <= through + error, (
                f"{name}: the {rank} quantile {value} has rank {below}..{through} in the "
                f"other sketch, beyond its error {error}")


class FaultyStore(ObjectStore):
    """A real store with a fault hook: `before_change(op, key)` runs before every put, create,
    replace and delete, and may raise as a failing disk or a killed process would."""

    def __init__(self, inner: ObjectStore):
        self.inner, self.url = inner, inner.url

    def before_change(self, op: str, key: str) -> None:
        raise NotImplementedError

    def put(self, key: str, data: bytes) -> None:
        self.before_change("put", key)
        self.inner.put(key, data)

    def create(self, key: str, data: bytes) -> str:
        self.before_change("create", key)
        return self.inner.create(key, data)

    def replace(self, key: str, data: bytes, tag: str) -> str:
        self.before_change("replace", key)
        return self.inner.replace(key, data, tag)

    def delete(self, key: str) -> None:
        self.before_change("delete", key)
        self.inner.delete(key)

    def get(self, key: str) -> bytes:
        return self.inner.get(key)

    def get_tagged(self, key: str) -> tuple[bytes, str]:
        return self.inner.get_tagged(key)

    def list(self, prefix: str) -> list[str]:
        return self.inner.list(prefix)

    def arrow(self) -> Any:
        return self.inner.arrow()
