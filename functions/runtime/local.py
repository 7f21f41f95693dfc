"""The template's functions run here, on the embedded default: the gateway and the mappings.

The runtime binds its settings for the handlers it runs (`functions.environment`), so both
agree on the event log and the store; the template's `Environment` is for AWS only. Stream
mappings poll the embedded log, or the Kafka topic with the Kafka bus (`kafka_source`); with
the Kinesis bus the functions' `Kinesis` events poll the settings' stream (`kinesis_source`)
and their Kafka events are left out, as on AWS, where the template deploys one or the other.
`S3` events: a watched folder when the landing store is `file://` (`folder_watch`), else the
bucket's notifications through a queue. The queues, the notifications' queue and the tables'
streams are on `aws_endpoint_url` (moto here), and run only with one: there is nothing to
poll on the embedded default, nor on an S3-only endpoint such as MinIO. `rate(...)` schedules
run with `run_schedules` (`schedules`); `up` leaves it off: its batch and maintenance loops,
and the drain hook that is the watermark heartbeat here, do that work.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib.metadata import version
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlparse

from lambdalake.bus import embedded_log
from lambdalake.functions import environment
from lambdalake.functions.runtime.folder_watch import FolderWatch
from lambdalake.functions.runtime.function import LocalFunction
from lambdalake.functions.runtime.gateway import Gateway
from lambdalake.functions.runtime.kinesis_source import KinesisMapping, ShardHooks
from lambdalake.functions.runtime.mapping import DrainHook, StreamMapping, StreamTopic
from lambdalake.functions.runtime.openapi import ingest_openapi
from lambdalake.functions.runtime.polling import Polling
from lambdalake.functions.runtime.queues import (
    QueueMapping,
    Queues,
    notify_queue,
    s3_delivery,
    sqs_delivery,
)
from lambdalake.functions.runtime.schedules import ScheduleMapping, rate_seconds
from lambdalake.functions.runtime.table_streams import TableStreamMapping
from lambdalake.functions.runtime.template import StreamSource, Template, load_template
from lambdalake.functions.runtime.versions import FunctionVersions
from lambdalake.loops import Loops
from lambdalake.project import load_project
from lambdalake.settings import Settings


class LocalRuntime:
    def __init__(
        self,
        settings: Settings,
        template: Template | None = None,
        loops: Loops | None = None,
        on_drained: Mapping[str, DrainHook] = MappingProxyType({}),
        run_schedules: bool = False,
        on_shard: Mapping[str, tuple[Any, Any]] = MappingProxyType({}),
    ):
        """`on_drained`: by handler path, what hears that a partition is drained and sealed
        (the archiver advances an idle partition's watermark); `on_shard`, on Kinesis, that
        a shard is idle or finished (`kinesis_source.ShardHooks`' fields)."""
        self.settings = settings
        self.template = template or load_template()
        self.folder: Path = settings.home / "runtime"
        self.functions = {
            name: LocalFunction(spec, versions=FunctionVersions(self.versions_folder(settings),
                                                                name, spec.handler))
            for name, spec in self.template.functions.items()
        }
        self.gateway = Gateway(self.functions.values(), settings.gateway_host,
                               settings.gateway_port,
                               max_connections=settings.http_max_connections,
                               read_timeout_s=settings.http_read_timeout_seconds,
                               tls=settings.tls, openapi=self._openapi())
        self.loops = loops
        self.mappings: list[Polling] = []
        if settings.bus == "kinesis":
            self.mappings += self._kinesis_mappings(on_shard, loops)
        else:
            self.mappings += [
                StreamMapping(function, source, self._topic(source), self.folder,
                              on_drained.get(function.spec.handler), loops=loops)
                for function in self.functions.values()
                for source in function.spec.streams
            ]
        self.endpoint = settings.aws_endpoint_url
        self.mappings += self._landing()
        if self.endpoint:
            self.mappings += self._queues() + self._table_streams()
        if run_schedules:
            self.mappings += self._schedules()

    def _client(self, service: str) -> Any:
        import boto3

        return boto3.client(service, endpoint_url=self.endpoint)

    def _landing(self) -> list[Polling]:
        """A folder watch for a `file://` landing store, else the bucket's notifications
        through a queue (only with an endpoint to create it on)."""
        url = urlparse(self.settings.landing_store_url)
        sources = [(f, s) for f in self.functions.values() for s in f.spec.buckets]
        if url.scheme == "file":
            return [FolderWatch(f, s, Path(url.path), loops=self.loops) for f, s in sources]
        if not sources or not self.endpoint:
            return []
        failed = {f.spec.asynchronous.on_failure_queue for f, _ in sources}
        queues = Queues(self._client("sqs"), {name: queue for name, queue in
                                              self.template.queues.items() if name in failed})
        pollers: list[Polling] = []
        for function, source in sources:
            name = notify_queue(self._client("s3"), queues, function, source, url.netloc)
            pollers.append(QueueMapping(function, queues.client, queues.urls[name],
                                        queues.arns[name], 10, s3_delivery(function),
                                        loops=self.loops))
        return pollers

    def _queues(self) -> list[Polling]:
        sources = [(f, s) for f in self.functions.values() for s in f.spec.queues]
        if not sources:
            return []
        queues = Queues(self._client("sqs"), self.template.queues)
        return [QueueMapping(f, queues.client, queues.urls[s.resource], queues.arns[s.resource],
                             s.batch_size, sqs_delivery(f, s, queues.arns[s.resource]),
                             loops=self.loops)
                for f, s in sources]

    def _schedules(self) -> list[Polling]:
        periods = [(f, rate_seconds(s)) for f in self.functions.values() for s in f.spec.schedules]
        return [ScheduleMapping(f, period, loops=self.loops) for f, period in periods if period]

    def _table_streams(self) -> list[Polling]:
        return [TableStreamMapping(f, s, self.template.tables[s.resource],
                                   self._client("dynamodb"), self._client("dynamodbstreams"),
                                   self.folder, loops=self.loops)
                for f in self.functions.values() for s in f.spec.tables]

    def _kinesis_mappings(self, on_shard: Mapping[str, tuple[Any, Any]],
                          loops: Loops | None) -> list[KinesisMapping]:
        from lambdalake import kinesis

        settings, found = self.settings, []
        sources = [(f, s) for f in self.functions.values() for s in f.spec.kinesis]
        if sources:
            client = kinesis.client(settings.kinesis_endpoint_url)
            kinesis.ensure_stream(client, settings.kinesis_stream, settings.partitions)
        for function, source in sources:
            hooks = on_shard.get(function.spec.handler)
            found.append(KinesisMapping(function, source, client, settings.kinesis_stream,
                                        self.folder, ShardHooks(*hooks) if hooks else None,
                                        loops=loops))
        return found

    @staticmethod
    def versions_folder(settings: Settings) -> Path:
        """Where `lambdalake functions deploy` keeps the functions' versions and aliases."""
        return settings.home / "functions"

    def _openapi(self) -> dict[str, Any] | None:
        """The gateway's OpenAPI document, when a function takes `POST /events`."""
        if not any(route.key == "POST /events" for function in self.functions.values()
                   for route in function.spec.routes):
            return None
        return ingest_openapi(load_project(self.settings.project).schemas, version("lambdalake"))

    def _topic(self, source: StreamSource) -> StreamTopic:
        """The bus topic a stream source names: the template's is AWS's, here it's settings'."""
        if self.settings.bus == "kafka":  # kafka-python is the `kafka` extra: imported here
            from lambdalake.functions.runtime.kafka_source import KafkaTopic
            from lambdalake.kafka_security import kafka_security
            from lambdalake.kafka_topics import ensure_bus_topics

            ensure_bus_topics(self.settings)
            return KafkaTopic(self.settings.kafka_bootstrap, self.settings.topic,
                              security=kafka_security(self.settings))
        log = embedded_log(str(self.settings.home.resolve()))
        return log.topic(self.settings.topic, self.settings.partitions)

    def start(self) -> None:
        environment.bind(self.settings)
        self.gateway.start()
        for mapping in self.mappings:
            mapping.start()

    def stop(self) -> None:
        """Stop taking requests, finish the invocations under way, then stop the mappings."""
        self.gateway.stop()
        for mapping in self.mappings:
            mapping.stop()
        environment.bind(None)

    def __enter__(self) -> LocalRuntime:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
