"""The speed/serving merge is exact: batch(cut) ⊕ real-time cells ≥ cut == a recompute.

Pure, no services. A random stream of example-project events (late, out of order, retried with
the same event id, and events of another type reusing an earlier event's id) arrives on 2-3
partitions with non-decreasing arrival times. The speed side is the kernel's ViewState fed each
partition in order, the partitions interleaved at random, publishing into RealtimeCells; batch
runs at random cuts are modelled by an independent plain-Python recompute of the events with
arrival < cut, deduplicated by (type, event id), and published through the real catalog:
runs overlap, and rollbacks serve any kept version. Speed workers crash and restart from
checkpoints. Whenever the speed layer has caught up with what it had read before, every view
answer must equal a recompute over every event it covers, each (type, event id) counted once
(invariants 1, 2 and 6 of DESIGN.md).
"""

from __future__ import annotations

import os
import pickle
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from datasketches import hll_sketch, kll_doubles_sketch, tgt_hll_type, update_theta_sketch
from exact import exact_quantiles
from hypothesis import given, settings
from hypothesis import strategies as st

from lambdalake import catalog
from lambdalake.batch.run import prune_versions, rollback
from lambdalake.events import Event
from lambdalake.example import project
from lambdalake.project import Project
from lambdalake.realtime import RealtimeCells, decode_update, encode_update
from lambdalake.settings import Settings
from lambdalake.storage import FileStore, ObjectStore
from lambdalake.tables import table_schema
from lambdalake.viewstate import UnreadableSnapshot, ViewState

SLICE = 60_000
HOUR = 3_600_000
DAY = 24 * HOUR
T0 = 1_714_564_800_000  # 2024-05-01T12:00:00Z, a slice boundary
URLS = ["/", "/pricing", "/docs"]
USERS = [f"u{i}" for i in range(6)]
SKUS = ["sku-1", "sku-2"]

Record = tuple[Event, int]  # (event, arrival)
SETTINGS = Settings()


# --- the random world --------------------------------------------------------------------

# Strategies are built once (building them per draw costs more than the test itself).
lateness = st.one_of(st.integers(-SLICE, 10 * SLICE), st.integers(0, 2 * DAY))
pageview_fields = st.fixed_dictionaries({
    "url": st.sampled_from(URLS),
    "user_id": st.sampled_from(USERS),
    "referrer": st.none() | st.sampled_from(["https://a.example/", "direct"]),
    "duration_ms": st.none() | st.integers(0, 60_000),
})
purchase_fields = st.fixed_dictionaries({
    "user_id": st.sampled_from(USERS),
    "sku": st.sampled_from(SKUS),
    "amount": st.integers(1, 100_000).map(lambda cents: Decimal(cents).scaleb(-2)),
})
contents = st.one_of(  # 3 pageviews to 1 purchase
    *[st.tuples(st.just("pageview"), pageview_fields)] * 3,
    st.tuples(st.just("purchase"), purchase_fields),
)
steps = st.sampled_from([0, 0, 1, 5_000, 20_000, 45_000, 2 * SLICE])
draws = st.tuples(
    # a new event, a producer retry of an earlier one, or a new event under an earlier one's
    # id (of another type when its drawn contents are)
    st.sampled_from(["new", "new", "retry", "reused id"]),
    st.integers(0, 10**6),  # which earlier event, or which partition for a new one
    steps,  # arrival step on the partition
    lateness,  # event time before arrival
    contents,
)


def build_stream(count: int, starts: list[int], records: list) -> list[list[Record]]:
    """Per partition, records in log order; an event under an earlier event's id goes to its
    partition, as the bus partitions by event id."""
    partitions: list[list[Record]] = [[] for _ in range(count)]
    clocks = [T0 + start for start in starts[:count]]
    originals: list[tuple[Event, int]] = []
    for number, (how, pick, step, late, (kind, fields)) in enumerate(records):
        earlier = originals[pick % len(originals)] if originals and how != "new" else None
        p = earlier[1] if earlier else pick % count
        clocks[p] += step
        if earlier and how == "retry":
            event = earlier[0]
        else:
            prefix = "pv" if kind == "pageview" else "buy"
            event_id = earlier[0].event_id if earlier else f"{prefix}-{number}"
            event = Event(event_id, kind, max(0, clocks[p] - late), fields)
            originals.append((event, p))
        partitions[p].append((event, clocks[p]))
    return partitions


streams = st.builds(
    build_stream,
    st.integers(2, 3),
    st.lists(st.integers(0, SLICE), min_size=3, max_size=3),
    st.integers(1, 60).flatmap(lambda n: st.lists(draws, min_size=n, max_size=n)),
)


# "batch": a run alone, served at once; "start" and "finish": runs that overlap.
CONTROL = ["flush", "flush", "batch", "batch", "start", "finish", "serve", "follow", "rollback",
           "rollback", "checkpoint", "crash"]
# Rounds of reads (partition numbers) each followed by one control op.
ops = st.lists(
    st.tuples(
        st.lists(st.integers(0, 2), max_size=10),
        st.sampled_from(CONTROL),
        st.integers(1, 4),
    ),
    min_size=2,
    max_size=25,
).map(lambda rounds: [op for steps, control, n in rounds
                      for op in [*(("step", p) for p in steps), (control, n)]])


# --- the independent model: batch views and the recompute --------------------------------


def dedup(records: list[Record]) -> dict[tuple[str, str], Event]:
    """Each (type, event id) once, the copy with the earliest arrival (as the batch keeps)."""
    first: dict[tuple[str, str], Record] = {}
    for event, arrival in records:
        identity = (event.type, event.event_id)
        if identity not in first or arrival < first[identity][1]:
            first[identity] = (event, arrival)
    return {identity: event for identity, (event, _) in first.items()}


def recompute(events: dict[tuple[str, str], Event]) -> dict[str, dict]:
    """Plain Python: per view, (bucket, key) -> count, sum of amount, set of users, durations."""
    answers: dict[str, dict] = {}
    for name, view in project.views.items():
        groups: dict = defaultdict(
            lambda: {"count": 0, "amount": Decimal(0), "users": set(), "durations": []}
        )
        for event in events.values():
            if event.type != view.event_type:
                continue
            bucket = event.ts - event.ts % view.bucket_ms
            group = groups[(bucket, tuple(event.fields[k] for k in view.keys))]
            group["count"] += 1
            group["amount"] += event.fields.get("amount") or 0
            group["users"].add(event.fields["user_id"])
            if event.fields.get("duration_ms") is not None:
                group["durations"].append(event.fields["duration_ms"])
        answers[name] = dict(groups)
    return answers


def sketch(users: set[str]) -> bytes:
    hll = hll_sketch(12, tgt_hll_type.HLL_8)
    for user in sorted(users):
        hll.update(user)
    return hll.serialize_compact()


def theta(users: set[str]) -> bytes:
    sketch = update_theta_sketch(12)
    for user in sorted(users):
        sketch.update(user)
    return sketch.compact().serialize()


def kll(values: list[int]) -> bytes:
    sketch = kll_doubles_sketch(200)
    for value in values:
        sketch.update(value)
    return sketch.serialize()


def batch_rows(records: list[Record], cut: int) -> dict[str, dict]:
    """The batch layer at `cut`: accumulators per (bucket, key) over arrival < cut, deduped."""
    groups = recompute(dedup([(e, a) for e, a in records if a < cut]))
    rows: dict[str, dict] = {}
    for name, view in project.views.items():
        rows[name] = {}
        for cell, group in groups[name].items():
            values = {
                "pageviews": group["count"],
                "visitors": sketch(group["users"]),
                "revenue": group["amount"],
                "orders": group["count"],
                "duration_ms": kll(group["durations"]),
                "viewers": theta(group["users"]),
                "buyers": theta(group["users"]),
            }
            rows[name][cell] = [values[metric] for metric in view.metrics]
    return rows


def serve(batch: dict[str, dict], realtime: RealtimeCells, cut: int) -> dict[str, dict]:
    """The serving merge: batch rows ⊕ real-time rows at or past the cut, with the monoids."""
    answers = {}
    for name, view in project.views.items():
        merged = {cell: list(accs) for cell, accs in batch.get(name, {}).items()}
        table = realtime.table(view, table_schema(project, view), cut)
        for row in table.to_pylist():
            cell = (row["bucket"], tuple(row[k] for k in view.keys))
            accs = merged.setdefault(cell, [m.zero() for m in view.metrics.values()])
            for i, (metric_name, metric) in enumerate(view.metrics.items()):
                accs[i] = metric.merge(accs[i], row[metric_name])
        answers[name] = {
            cell: {n: m.result(a) for (n, m), a in zip(view.metrics.items(), accs, strict=True)}
            for cell, accs in merged.items()
        }
    return answers


def assert_exact(answers: dict[str, dict], expected: dict[str, dict]) -> None:
    pageviews, revenue = answers["pageviews_by_url_hour"], answers["revenue_by_sku_day"]
    want_pv, want_rev = expected["pageviews_by_url_hour"], expected["revenue_by_sku_day"]
    assert set(pageviews) == set(want_pv)
    for cell, group in want_pv.items():
        assert pageviews[cell]["pageviews"] == group["count"], cell
        assert pageviews[cell]["visitors"] == len(group["users"]), cell
    assert set(revenue) == set(want_rev)
    for cell, group in want_rev.items():
        assert revenue[cell]["orders"] == group["count"], cell
        assert revenue[cell]["revenue"] == group["amount"], cell  # exact: Decimal, no tolerance
    durations, buyers = answers["durations_by_url_hour"], answers["buyers_by_sku_day"]
    assert set(durations) == set(want_pv) and set(buyers) == set(want_rev)
    for cell, group in want_pv.items():  # KLL is exact up to k values; theta up to 4096
        assert durations[cell]["duration_ms"] == exact_quantiles(group["durations"]), cell
        assert durations[cell]["viewers"] == len(group["users"]), cell
    for cell, group in want_rev.items():
        assert buyers[cell]["buyers"] == len(group["users"]), cell


# --- the system under test, driven by the ops ---------------------------------------------


@dataclass
class World:
    """The speed layer (ViewState), the serving layer's real-time cells, and batch runs
    published through the real catalog (`catalog.publish`, `rollback`, `prune_versions`):
    runs overlap (each picks its cut when it starts, publishes when it finishes, refused
    when superseded), rollbacks go to any kept version, and the serving and speed layers
    learn of each at their own pace."""

    partitions: list[list[Record]]
    store: ObjectStore
    versions_kept: int = 5
    dedup_window_ms: int = DAY
    state: ViewState = field(init=False)
    realtime: RealtimeCells = field(init=False)
    kept: catalog.KeptVersions = field(init=False)
    positions: list[int] = field(init=False)
    high_water: list[int] = field(init=False)
    cut: int = 0  # the serving version's
    floor: int = 0  # the serving layer's: it keeps real-time cells at or past it
    batch: dict = field(default_factory=dict)  # the serving version's rows
    runs: list[tuple[str, int]] = field(default_factory=list)  # started: (version, cut)
    started: int = 0
    rows: dict[str, dict] = field(default_factory=dict)  # version -> its batch rows
    checkpoint: tuple[bytes, list[int]] | None = None
    checks: int = 0

    def __post_init__(self) -> None:
        self.state = ViewState(project, SLICE, self.dedup_window_ms)
        self.realtime = RealtimeCells(project)
        self.kept = catalog.KeptVersions(self.store)
        self.positions = [0] * len(self.partitions)
        self.high_water = [0] * len(self.partitions)

    @property
    def records(self) -> list[Record]:
        return [record for partition in self.partitions for record in partition]

    def step(self, p: int) -> None:
        p %= len(self.partitions)
        if self.positions[p] < len(self.partitions[p]):
            event, arrival = self.partitions[p][self.positions[p]]
            self.state.apply(event, arrival)
            self.positions[p] += 1
            self.high_water[p] = max(self.high_water[p], self.positions[p])

    def flush(self) -> None:
        self.realtime.upsert(self.state.drain())
        if self.positions == self.high_water:
            self.check()

    def start_run(self, slices: int) -> tuple[str, int] | None:
        """A batch run picks its cut at a slice boundary past the published one, if any."""
        top = max(a for _, a in self.records)
        ceiling = top - top % SLICE + SLICE
        published = catalog.current(self.store)
        published_cut = published.cut if published else 0
        cut = min(max(published_cut, T0) + slices * SLICE, ceiling)
        if cut <= published_cut:
            return None
        self.started += 1
        self.runs.append((f"v{self.started:04d}", cut))
        return self.runs[-1]

    def finish_run(self, which: int) -> None:
        if self.runs:
            self.finish(self.runs.pop(which % len(self.runs)))

    def finish(self, run: tuple[str, int]) -> None:
        """Publish by compare-and-swap (refused once superseded), then keep the newest
        versions, as `batch.run` does."""
        version, cut = run
        self.rows[version] = batch_rows(self.records, cut)
        manifest = catalog.Manifest(version=version, cut=cut, created="", engine="model",
                                    rows_read=0, views={})
        catalog.write_manifest(self.store, manifest)
        try:
            catalog.publish(self.store, version)
        except catalog.Superseded:
            self.store.delete(f"{catalog.VERSIONS}/{version}.json")
            return
        prune_versions(self.store, self.versions_kept, [])

    def roll_back(self, which: int) -> None:
        kept = catalog.versions(self.store)
        if kept:
            rollback(SETTINGS, self.store, kept[which % len(kept)])

    def serve(self) -> None:
        """The serving layer follows the published version, as `BatchViews.refresh` does."""
        published = catalog.current(self.store)
        if published is not None:
            self.cut, self.batch = published.cut, self.rows[published.version]
        self.floor = min(self.kept.floor(), self.cut)
        self.realtime.drop_below(self.floor)

    def run_batch(self, slices: int) -> None:
        """A batch run on its own, served at once."""
        run = self.start_run(slices)
        if run:
            self.runs.remove(run)
            self.finish(run)
        self.serve()

    def follow(self) -> None:
        """The speed layer drops the slices below the lowest kept cut, some time after the
        serving layer did."""
        self.state.drop_below(self.floor)

    def save(self) -> None:
        self.checkpoint = (self.state.snapshot(), list(self.positions))

    def crash(self) -> None:
        """Kill the speed worker; a new one restores the checkpoint (or starts from scratch)."""
        self.state = ViewState(project, SLICE, self.dedup_window_ms)
        if self.checkpoint:
            snapshot, positions = self.checkpoint
            self.state.restore(snapshot)
            self.positions = list(positions)
        else:
            self.positions = [0] * len(self.partitions)
        self.realtime.upsert(self.state.everything())

    def covered(self) -> list[Record]:
        """Every record the merged answer covers: the batch's and what the speed layer read."""
        read = [r for p, part in enumerate(self.partitions) for r in part[: self.positions[p]]]
        return [r for r in self.records if r[1] < self.cut] + read

    def check(self) -> None:
        self.checks += 1
        answers = serve(self.batch, self.realtime, self.cut)
        assert_exact(answers, recompute(dedup(self.covered())))

    def run(self, script) -> None:
        actions = {
            "step": self.step, "flush": lambda _: self.flush(), "batch": self.run_batch,
            "start": self.start_run,
            "finish": self.finish_run, "serve": lambda _: self.serve(),
            "rollback": self.roll_back, "follow": lambda _: self.follow(),
            "checkpoint": lambda _: self.save(), "crash": lambda _: self.crash(),
        }
        for op, arg in script:
            actions[op](arg)
        for p, partition in enumerate(self.partitions):  # catch up
            while self.positions[p] < len(partition):
                self.step(p)
        self.flush()
        assert self.positions == [len(p) for p in self.partitions]


@contextmanager
def world_of(partitions: list[list[Record]], **options: Any) -> Iterator[World]:
    """A World whose catalog is a store in a fresh folder (on tmpfs when there is one)."""
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(dir=shm if shm.is_dir() else None) as folder:
        yield World(partitions, FileStore(Path(folder)), **options)


@settings(max_examples=200, deadline=None)
@given(streams, ops, st.integers(1, 3))
def test_merged_answers_equal_a_recompute_of_every_event(partitions, script, versions_kept):
    """Whatever runs overlap, whatever kept version a rollback serves, whenever the serving
    and speed layers learn of either: exact at every check."""
    with world_of(partitions, versions_kept=versions_kept) as world:
        world.run(script)
        # Caught up: every event ever ingested, each event id once, whatever the cuts.
        world.serve()
        final = serve(world.batch, world.realtime, world.cut)
        assert_exact(final, recompute(dedup(world.records)))
        # And once more after a last batch run that covers everything.
        world.run_batch(10**6)
        world.follow()
        world.flush()
        assert not world.realtime.table(
            project.views["pageviews_by_url_hour"],
            table_schema(project, project.views["pageviews_by_url_hour"]),
            world.cut,
        ).num_rows


# --- targeted cases ----------------------------------------------------------------------


def pageview(number: int, ts: int, user: str = "u1", url: str = "/") -> Event:
    fields = {"url": url, "user_id": user, "referrer": None, "duration_ms": None}
    return Event(f"pv-{number}", "pageview", ts, fields)


def test_a_retry_straddling_the_cut_is_counted_once():
    first, retry = (pageview(1, T0 - HOUR), T0 + 10_000), (pageview(1, T0 - HOUR), T0 + 70_000)
    other = (pageview(2, T0 - HOUR, user="u2"), T0 + 80_000)
    with world_of([[first, retry, other]]) as world:
        world.run([("step", 0), ("step", 0), ("step", 0), ("flush", 0)])
        world.run_batch(1)  # cut at T0 + 60 s: the first copy is in the batch, the retry is not
        assert world.cut == T0 + SLICE
        world.follow()
        world.flush()
        answers = serve(world.batch, world.realtime, world.cut)["pageviews_by_url_hour"]
    assert answers == {(T0 - HOUR, ("/",)): {"pageviews": 2, "visitors": 2}}


def test_apply_reports_duplicates_and_events_below_the_cut():
    state = ViewState(project, SLICE, DAY)
    assert state.apply(pageview(1, T0), T0 + 5)
    assert not state.apply(pageview(1, T0), T0 + 6)  # retry
    state.drop_below(T0 + SLICE)
    assert not state.apply(pageview(2, T0), T0 + 7)  # covered by the batch
    assert not state.apply(pageview(2, T0), T0 + SLICE + 1)  # its retry: seen, not counted
    assert state.apply(pageview(3, T0), T0 + SLICE + 2)
    assert state.everything()[0].values[0] == 1
    assert state.drain() and not state.drain()


def purchase(event_id: str, ts: int, amount: Decimal = Decimal("9.50")) -> Event:
    return Event(event_id, "purchase", ts, {"user_id": "u1", "sku": "sku-1", "amount": amount})


def test_an_event_id_is_unique_within_its_type_only():
    """A purchase under a pageview's id is another event: counted at once, as the batch does;
    its own retry is still a duplicate."""
    state = ViewState(project, SLICE, DAY)
    assert state.apply(pageview(7, T0), T0 + 1)
    assert state.apply(purchase("pv-7", T0), T0 + 2)
    assert not state.apply(purchase("pv-7", T0), T0 + 3)
    assert not state.apply(pageview(7, T0), T0 + 4)
    assert state.tracked_ids == 2
    revenue = [u for u in state.everything() if u.view == "revenue_by_sku_day"]
    assert [u.values for u in revenue] == [(Decimal("9.50"), 1)]


def test_untyped_ids_restore_for_every_type():
    """A Kafka changelog written when dedup was by id alone holds (id, arrival) pairs: each is
    held for every type, the old rule, so no copy it had skipped is counted after the upgrade."""
    state = ViewState(project, SLICE, DAY)
    state.load(0, T0 + 5, [], [("pv-1", T0 + 5)])
    assert not state.apply(pageview(1, T0), T0 + 6)
    assert not state.apply(purchase("pv-1", T0), T0 + 6)
    assert state.apply(purchase("pv-2", T0), T0 + 7)
    again = ViewState(project, SLICE, DAY)
    again.restore(state.snapshot())
    assert again.held_ids() == state.held_ids() == [
        ("pageview", "pv-1", T0 + 5), ("purchase", "pv-1", T0 + 5), ("purchase", "pv-2", T0 + 7)
    ]


def test_a_pickled_snapshot_of_earlier_versions_is_refused_not_misread():
    old = pickle.dumps((0, T0 + 5, [], [("pv-1", T0 + 5)]), protocol=5)
    with pytest.raises(UnreadableSnapshot):
        ViewState(project, SLICE, DAY).restore(old)


def test_snapshot_restore_round_trip_mid_stream():
    events = [(pageview(i % 40, T0 - i * 60_000, user=f"u{i % 7}", url=URLS[i % 3]),
               T0 + i * 15_000) for i in range(80)]
    straight = ViewState(project, SLICE, DAY)
    straight.apply_all(events)
    straight.drop_below(T0 + 5 * SLICE)

    first = ViewState(project, SLICE, DAY)
    first.apply_all(events[:30])
    first.drop_below(T0 + 2 * SLICE)
    restarted = ViewState(project, SLICE, DAY)
    restarted.restore(first.snapshot())
    assert restarted.tracked_ids == first.tracked_ids
    assert restarted.cut == first.cut
    assert restarted.drain() == []  # restored cells are published with everything()
    assert sorted(map(repr, restarted.everything())) == sorted(map(repr, first.everything()))
    restarted.apply_all(events[30:])
    restarted.drop_below(T0 + 5 * SLICE)

    def answers(state: ViewState) -> dict:
        realtime = RealtimeCells(project)
        realtime.upsert(state.everything())
        return serve({}, realtime, state.cut)

    assert answers(restarted) == answers(straight)
    assert answers(restarted)["pageviews_by_url_hour"]


def test_dedup_memory_is_bounded_by_the_window():
    window = 60_000
    state = ViewState(project, SLICE, window)
    arrivals: list[int] = []
    for i in range(3_600):  # an hour of events, one a second
        arrival = T0 + i * 1_000
        state.apply(pageview(i, arrival), arrival)
        arrivals.append(arrival)
        recent = sum(1 for a in arrivals if a >= arrival - window)
        assert state.tracked_ids <= recent
    assert state.tracked_ids <= 61
    # Within the window a retry is caught; after it, the id is forgotten.
    assert not state.apply(pageview(3_599 - 30, T0), T0 + 3_600_000)
    assert state.apply(pageview(5, T0), T0 + 3_600_000)


def test_dedup_memory_is_bounded_with_interleaved_partitions():
    """Partitions read in turns (up to `skew` apart in arrival) keep at most the ids of the
    window plus the skew."""
    window, skew = 60_000, 20_000
    state = ViewState(project, SLICE, window)
    seen: list[int] = []
    for i in range(1_800):
        # partition 0 is read in bursts of 20 records, then partition 1's same 20 seconds
        burst, offset = divmod(i, 40)
        partition, k = divmod(offset, 20)
        arrival = T0 + (burst * 20 + k) * 1_000
        state.apply(pageview(i, arrival, url=URLS[partition]), arrival)
        seen.append(arrival)
        newest = max(seen)
        assert state.tracked_ids <= sum(1 for a in seen if a >= newest - window - skew)
    assert state.tracked_ids <= 2 * (window + skew) // 1_000 + 2


def test_dedup_memory_is_capped_under_a_flood():
    """More distinct ids inside the window than `max_ids`: the oldest are forgotten early,
    counted, and the newest `max_ids` still catch their retries."""
    state = ViewState(project, SLICE, DAY, max_ids=1_000)
    for i in range(5_000):  # ten a second: all well inside the day's window
        arrival = T0 + i * 100
        assert state.apply(pageview(i, arrival), arrival)
        assert state.tracked_ids <= 1_000
    assert (state.tracked_ids, state.forgotten_early) == (1_000, 4_000)
    assert state.dedup_horizon == T0 + 3_999 * 100  # the newest arrival forgotten
    late = T0 + 5_000 * 100
    assert not state.apply(pageview(4_000, T0), late)  # held: a retry is caught
    assert state.apply(pageview(3_999, T0), late)  # forgotten early: counted again

    smaller = ViewState(project, SLICE, DAY, max_ids=300)
    smaller.restore(state.snapshot())  # a restart with a lower cap keeps the newest ids
    assert smaller.tracked_ids == 300
    assert not smaller.apply(pageview(4_999, T0), late)
    assert smaller.apply(pageview(4_000, T0), late)


def test_merge_without_duplicates_is_exact_for_many_distinct_users():
    """Invariant 1 at a larger scale: 3 partitions, 3,000 events, several cuts."""
    partitions: list[list[Record]] = [[], [], []]
    for i in range(3_000):
        arrival = T0 + i * 700
        event = pageview(i, arrival - (i * 7_919) % (3 * HOUR), user=f"u{i % 250}",
                         url=URLS[i % 3])
        partitions[i % 3].append((event, arrival))
    script = []
    for i in range(3_000):
        script.append(("step", (i * 2) % 3 if i % 5 else 1))
        if i % 400 == 399:
            script += [("flush", 0), ("batch", 3), ("follow", 0)]
    script.append(("rollback", 1))  # 7 runs, 5 kept: back to the second oldest kept, 4 back
    with world_of(partitions) as world:
        world.run(script)
        world.serve()
        assert world.checks >= 1 and world.cut == T0 + 12 * SLICE
        final = serve(world.batch, world.realtime, world.cut)
    assert_exact(final, recompute(dedup(world.records)))


def test_a_restore_keeps_unchanged_views_and_names_the_changed_and_added_ones():
    """A snapshot restored under another project: a removed view's cells are dropped (no
    KeyError), a changed or added view is returned to be rebuilt, the rest is restored."""
    events = [(pageview(i, T0 + i * 1_000, user=f"u{i % 3}", url=URLS[i % 3]), T0 + i)
              for i in range(20)] + [(purchase(f"p{i}", T0), T0 + 30 + i) for i in range(3)]
    before = ViewState(project, SLICE, DAY)
    before.apply_all(events)
    pageviews, revenue, *rest = project.views.values()
    changed = replace(pageviews, keys=("url", "user_id"))
    added = replace(revenue, name="revenue_by_sku_hour", bucket="hour")
    after_project = Project.of(project.schemas.values(), [changed, added, *rest])
    after = ViewState(after_project, SLICE, DAY)
    assert after.restore(before.snapshot()) == {changed.name, added.name}
    kept = {u for u in before.everything() if u.view in {v.name for v in rest}}
    assert set(map(repr, after.everything())) == set(map(repr, kept))
    rebuilt = after.for_views({changed.name, added.name}, 0)
    rebuilt.apply_all(events)
    after.adopt(rebuilt)
    straight = ViewState(after_project, SLICE, DAY)
    straight.apply_all(events)
    assert sorted(map(repr, after.drain())) == sorted(
        map(repr, (u for u in straight.everything() if u.view in rebuilt.cells)))
    assert sorted(map(repr, after.everything())) == sorted(map(repr, straight.everything()))


def test_decimal_sums_survive_a_snapshot_and_the_realtime_feed_exactly():
    """A decimal accumulator travels as its exact text: the checkpoint and the realtime
    topic's records (both JSON) once refused it, and the speed loop failed on every step."""
    state = ViewState(project, SLICE, DAY)
    amounts = [Decimal("0.10"), Decimal("0.20"), Decimal("203.56")]
    for i, amount in enumerate(amounts):
        state.apply(purchase(f"d{i}", T0, amount), T0 + i)
    restored = ViewState(project, SLICE, DAY)
    restored.restore(state.snapshot())
    revenue = [u for u in restored.everything() if u.view == "revenue_by_sku_day"]
    assert [u.values[0] for u in revenue] == [Decimal("203.86")]
    realtime = RealtimeCells(project)
    for update in revenue:
        realtime.upsert([decode_update(encode_update(update, project), project)])
    assert serve({}, realtime, 0)["revenue_by_sku_day"][(T0 - T0 % 86_400_000, ("sku-1",))][
        "revenue"] == Decimal("203.86")


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_closed_slices_hold_what_they_published_not_working_sketches():
    """A slice no event arrives at any more holds each cell as its last update published:
    working sketches hold far more (a KLL sketch allocates its k items at once), so these
    40,000 cells of closed slices, held working, grew the process by 87 MB; frozen, 28 MB
    with the test's own copy of the updates (the speed drivers grew under a steady load
    while the batch floor lagged)."""
    state = ViewState(project, 1_000, SETTINGS.dedup_window_ms)
    published: dict[tuple[str, int, int, tuple[Any, ...]], tuple[Any, ...]] = {}
    before = rss_mb()
    for second in range(200):  # a commit a slice, as the Kafka drivers do
        arrival = T0 + second * 1_000
        for url in range(100):
            event = pageview(second * 100 + url, arrival, url=f"/{url}")
            event.fields["duration_ms"] = url
            state.apply(event, arrival)
        published |= {(u.view, u.slice, u.bucket, u.key): u.values for u in state.drain()}
    grown = rss_mb() - before
    assert len(published) == 2 * 200 * 100
    assert {(u.view, u.slice, u.bucket, u.key): u.values for u in state.everything()} \
        == published
    assert grown < 45, f"40,000 closed cells took {grown:.0f} MB"


def test_an_event_arriving_in_a_closed_slice_is_folded_into_its_frozen_cell():
    """A state read from interleaved partitions (the embedded driver's) may take an arrival
    in a slice it holds frozen already: the cell is thawed and the event counted."""
    state = ViewState(project, SLICE, SETTINGS.dedup_window_ms)
    for number, (arrival, duration) in enumerate([(T0, 10), (T0 + SLICE, 20), (T0 + 5, 30)]):
        event = pageview(number, T0, user=f"u{number}")
        event.fields["duration_ms"] = duration
        assert state.apply(event, arrival)
        state.drain()
    cell = {u.view: u.values for u in state.everything() if u.slice == T0}
    assert cell["pageviews_by_url_hour"][0] == 2
    durations = kll_doubles_sketch.deserialize(cell["durations_by_url_hour"][0])
    assert (durations.n, durations.get_min_value(), durations.get_max_value()) == (2, 10, 30)
