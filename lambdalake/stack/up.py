"""`lambdalake up`: every part wired together in one process (the Kafka speed worker in its own,
supervised), and the batch schedule. Parts are imported lazily, per command."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any

from rich.console import Console
from rich.progress import Progress

from lambdalake.catalog import Manifest
from lambdalake.kafka_security import kafka_security
from lambdalake.loops import Loop, Loops
from lambdalake.master import check_schemas
from lambdalake.project import Project, load_project
from lambdalake.realtime import RealtimeCells
from lambdalake.settings import Settings
from lambdalake.storage import ObjectStore, open_store
from lambdalake.viewstate import CellUpdate

log = logging.getLogger("lambdalake.stack")
SPEED_WORKERS = {"quix": "lambdalake.speed.quix", "faust": "lambdalake.speed.faust_app"}
KINESIS_SPEED_WORKER = "lambdalake.speed.kinesis"
_BATCH_RUN_BOUND_S = 3600.0  # a scheduled batch run taking longer is reported stuck
# What `up` runs; a deployment on Kafka runs each role in its own process (docker-compose.yml).
ROLES = ("functions", "serving", "speed", "scheduler")


def open_settings_store(settings: Settings) -> ObjectStore:
    return open_store(settings.store_url, settings.s3_endpoint_url)


def batch_once(
    settings: Settings,
    engine_name: str,
    *,
    master: str | None = None,
    incremental: bool = False,
    console: Console | None = None,
) -> Manifest:
    """One batch run; with a console, one progress bar per view (logs draw above them)."""
    from lambdalake.batch.run import run_from_settings

    if console is None or not console.is_terminal:  # bars are for people, not for pipes
        return run_from_settings(settings, engine_name, master=master, incremental=incremental)
    with Progress(console=console, transient=True) as progress:
        return run_from_settings(settings, engine_name, master=master, incremental=incremental,
                                 progress=progress)


class Stack:
    """Gateway, archiver, speed layer, serving API and batch schedule, in one process."""

    def __init__(self, settings: Settings, engine: str | None = None, produce_rate: float = 0,
                 roles: tuple[str, ...] = ROLES):
        self.settings, self.produce_rate, self.roles = settings, produce_rate, roles
        self.engine = engine or settings.batch_engine
        self.project: Project = load_project(settings.project)
        self.store = open_settings_store(settings)
        check_schemas(self.store, self.project)
        self.realtime = RealtimeCells(self.project)
        self.loops = Loops()
        self._stop = threading.Event()
        self._closers: list[Any] = []
        self.speed: Any = None  # the embedded speed layer, on the embedded bus

    def publish_realtime(self, updates: list[CellUpdate], caught_up_at: int) -> None:
        self.realtime.upsert(updates)
        if caught_up_at:
            self.realtime.caught_up_at = caught_up_at

    def __enter__(self) -> Stack:
        from lambdalake.functions import archive
        from lambdalake.functions.runtime.local import LocalRuntime

        # the gateway before the API: `up` is ready (readyz) only once it takes events too
        if "functions" in self.roles:
            runtime = LocalRuntime(self.settings, self._template(), loops=self.loops,
                                   on_drained=archive.ON_DRAINED, on_shard=archive.ON_SHARD)
            runtime.start()
        if "serving" in self.roles:
            self._serve()
        self._start_speed()
        if "functions" in self.roles:
            self._closers.append(runtime.stop)  # closed first: no events taken while stopping
        if "scheduler" in self.roles:
            self._schedule()
        if self.produce_rate:
            self._thread(self._produce, "producer")
        return self

    def _template(self) -> Any:
        """template.yaml, down to the functions the settings name (all when none)."""
        from lambdalake.functions.runtime.template import load_template

        template = load_template()
        wanted = self.settings.functions or list(template.functions)
        unknown = sorted(set(wanted) - set(template.functions))
        if unknown:
            raise ValueError(f"functions: {unknown[0]!r} is not in template.yaml; use "
                             f"{', '.join(template.functions)}")
        return template.model_copy(
            update={"functions": {n: template.functions[n] for n in wanted}})

    def _serve(self) -> None:
        from lambdalake.serving.server import ServerThread, build_server, start_postgres

        server = ServerThread(build_server(self.settings, self.project, self.store,
                                           self.realtime, loops=self.loops)).start()
        self._closers.append(server.stop)
        postgres = start_postgres(server.server)
        if postgres is not None:
            self._closers.append(postgres.stop)

    def _schedule(self) -> None:
        interval = self.settings.batch_interval_seconds
        batches = Loop("batch-schedule", self._batch_step, first_backoff_s=1.0,
                       max_backoff_s=min(30.0, interval), stuck_after_s=_BATCH_RUN_BOUND_S)
        self.loops.add(batches).start(first_wait_s=interval)
        self._closers.append(lambda: batches.stop(timeout_s=30))
        upkeep = Loop("maintenance", self._maintenance_step, first_backoff_s=1.0,
                      max_backoff_s=30.0, stuck_after_s=_BATCH_RUN_BOUND_S)
        self.loops.add(upkeep).start(first_wait_s=self.settings.compact_interval_seconds)
        self._closers.append(lambda: upkeep.stop(timeout_s=30))

    def _start_speed(self) -> None:
        """The speed layer of the settings' bus, as far as this process's roles go: in process
        on the embedded log, a supervised worker on Kafka (`_kafka_speed`) or Kinesis
        (`_kinesis_speed`), each with the serving layer following its output."""
        from lambdalake.bus import events_topic
        from lambdalake.speed.embedded import EmbeddedSpeed

        s = self.settings
        if s.bus == "kafka":
            self._kafka_speed()
        elif s.bus == "kinesis":
            self._kinesis_speed()
        elif "speed" in self.roles:
            speed = EmbeddedSpeed(s, self.project, events_topic(s), self.store,
                                  self.publish_realtime, loops=self.loops,
                                  restored=self.realtime.restored)
            speed.start()
            self._closers.append(speed.stop)
            self.speed = speed

    def _kafka_speed(self) -> None:
        """The bus's topics; the speed driver on Kafka (restarted if it exits), and the serving
        layer following its realtime topic."""
        from lambdalake.kafka_topics import ensure_bus_topics, retention_shortfall
        from lambdalake.serving.realtime_feed import RealtimeFeed

        ensure_bus_topics(self.settings)
        shortfall = retention_shortfall(self.settings)
        if shortfall:
            log.warning("bus retention too short", extra={"reason": shortfall})
        if "speed" in self.roles:
            self._supervised_speed(SPEED_WORKERS[self.settings.speed_engine])
        if "serving" in self.roles:
            feed = RealtimeFeed(self.settings.kafka_bootstrap, self.settings.topic,
                                self.realtime, self.loops, kafka_security(self.settings))
            feed.start()
            self._closers.append(feed.stop)

    def _kinesis_speed(self) -> None:
        """The Kinesis speed worker (restarted if it exits), and the serving layer following
        its shards' state in the object store."""
        from lambdalake.serving.realtime_feed import StoreFeed

        if "speed" in self.roles:
            self._supervised_speed(KINESIS_SPEED_WORKER)
        if "serving" in self.roles:
            feed = StoreFeed(self.store, self.settings.kinesis_stream, self.realtime, self.loops)
            feed.start()
            self._closers.append(feed.stop)

    def _supervised_speed(self, module: str) -> None:
        import sys

        from lambdalake.stack.supervisor import Supervised

        env = {f"LAMBDALAKE_{k.upper()}": str(v) for k, v in self._speed_env().items() if v}
        worker = Supervised("speed", [sys.executable, "-m", module], os.environ | env).start()
        self._closers.append(worker.stop)

    def _speed_env(self) -> dict[str, Any]:
        s = self.settings
        return {"bus": s.bus, "kafka_bootstrap": s.kafka_bootstrap, "topic": s.topic,
                "partitions": s.partitions, "replication_factor": s.replication_factor,
                "min_insync_replicas": s.min_insync_replicas, "home": s.home.resolve(),
                "store": s.store_url,
                "project": s.project, "s3_endpoint_url": s.s3_endpoint_url,
                "kinesis_stream": s.kinesis_stream,
                "kinesis_endpoint_url": s.kinesis_endpoint_url,
                "speed_metrics_host": s.speed_metrics_host,
                "speed_metrics_port": s.speed_metrics_port, "supervised": True,
                "kinesis_lease_table": s.kinesis_lease_table,
                "kinesis_lease_seconds": s.kinesis_lease_seconds,
                **self._kafka_security_env()}

    def _kafka_security_env(self) -> dict[str, Any]:
        s = self.settings
        password = s.kafka_password.get_secret_value() if s.kafka_password else None
        return {"kafka_security_protocol": s.kafka_security_protocol,
                "kafka_sasl_mechanism": s.kafka_sasl_mechanism,
                "kafka_username": s.kafka_username, "kafka_password": password,
                "kafka_secret_arn": s.kafka_secret_arn, "kafka_ca_file": s.kafka_ca_file}

    def _thread(self, target: Any, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._closers.append(lambda: thread.join(timeout=30))

    def _produce(self) -> None:
        from lambdalake.eventlog import now_ms
        from lambdalake.producer import produce
        from lambdalake.synthetic import WebAnalyticsStream

        url = f"http://{self.settings.gateway_host}:{self.settings.gateway_port}/events"
        batch = max(1, min(500, int(self.produce_rate // 5)))
        produce(url, WebAnalyticsStream().batches(batch, now_ms), self.produce_rate, None,
                stop=self._stop.is_set, api_key=self.settings.keyring.key_for("ingest"))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for close in reversed(self._closers):
            close()

    def wait(self) -> None:
        """Until Ctrl-C or SIGTERM (`docker stop`); then `__exit__` shuts down in order."""
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        try:
            while not self._stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass

    def _batch_step(self) -> float:
        """One scheduled batch run. A refusal (nothing new) waits for the next tick; a failure
        raises, to be retried with backoff, the old version serving meanwhile."""
        from lambdalake.batch.run import BatchRefused

        started = time.monotonic()
        try:
            manifest = batch_once(self.settings, self.engine, master=self.settings.spark_master)
        except BatchRefused as exc:
            log.info("no batch published", extra={"reason": str(exc)})
        else:
            log.info("batch published", extra={"version": manifest.version, "cut": manifest.cut,
                                                "seconds": round(time.monotonic() - started, 3)})
        return self.settings.batch_interval_seconds

    def _maintenance_step(self) -> float:
        """Compaction (skipped while a batch run holds the lease), then retention: the run
        history, dead letters and, on the embedded bus, the log's segments."""
        from lambdalake.batch.maintenance import compact, prune_history
        from lambdalake.batch.run import BatchError

        try:
            compact(self.settings, self.store)
        except BatchError as exc:
            log.info("compaction skipped", extra={"reason": str(exc)})
        pruned = prune_history(self.settings, self.store)
        if self.speed is not None:
            pruned["log_segments"] = self.retain_log()
        log.info("retention applied", extra=pruned)
        return self.settings.compact_interval_seconds

    def retain_log(self) -> int:
        """Delete the embedded log's segments every consumer has read (the archive's committed
        position, the speed layer's checkpoint) below the cut of the oldest kept version."""
        from lambdalake.bus import events_topic
        from lambdalake.catalog import KeptVersions
        from lambdalake.eventlog import now_ms

        oldest = KeptVersions(self.store, self.project).floor()
        if not oldest:  # no version kept yet: everything may still be needed
            return 0
        roll_before = now_ms() - self.settings.log_segment_seconds * 1000
        return events_topic(self.settings).retain(self.speed.checkpointed, oldest, roll_before)

    def banner(self) -> str:
        s = self.settings
        return (
            f"[bold]lambdalake is up[/bold] (bus {s.bus}, store {s.store_url})\n"
            f"  ingest:  curl -X POST http://{s.gateway_host}:{s.gateway_port}/events "
            "-d '{\"event_id\": \"e1\", \"type\": \"pageview\", \"ts\": \"2026-11-23T10:00:00Z\", "
            "\"url\": \"/home\", \"user_id\": \"u1\"}'\n"
            f"  query:   curl 'http://{s.api_host}:{s.api_port}/views/pageviews_by_url_hour"
            "?bucket=total&order_by=pageviews&limit=5'\n"
            f"  docs:    http://{s.api_host}:{s.api_port}/docs\n"
            + (f"  import:  drop .jsonl, .jsonl.gz or .parquet files of events in "
               f"{s.landing_store_url.removeprefix('file://')}/{s.landing_prefix}\n"
               if s.landing_store_url.startswith("file:") else "")
            + (f"  sql:     psql -h {s.pg_host} -p {s.pg_port} -U me lambdalake "
               "(password: a query key, if keys are set)\n" if s.pg_port else "") +
            f"  batch:   every {s.batch_interval_seconds} s; or `.venv/bin/lambdalake batch run`"
        )
