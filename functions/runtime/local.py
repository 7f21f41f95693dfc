"""The template's functions run here, on the embedded default: the gateway and the mappings.

The runtime binds its settings for the handlers it runs (`functions.environment`), so both
agree on the event log and the store; the template's `Environment` is for AWS only. Stream
mappings poll the embedded log, or the Kafka topic with the Kafka bus (`kafka_source`); with
the Kinesis bus the functions' `Kinesis` events poll the settings' stream (`kinesis_source`)
and their Kafka events are left out, as on AWS, where the template deploys one or the other.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from lambdalake.bus import embedded_log
from lambdalake.eventlog import Topic
from lambdalake.functions import environment
from lambdalake.functions.runtime.function import LocalFunction
from lambdalake.functions.runtime.gateway import Gateway
from lambdalake.functions.runtime.kinesis_source import KinesisMapping, ShardHooks
from lambdalake.functions.runtime.mapping import DrainHook, StreamMapping
from lambdalake.functions.runtime.template import StreamSource, Template, load_template
from lambdalake.loops import Loops
from lambdalake.settings import Settings


class LocalRuntime:
    def __init__(
        self,
        settings: Settings,
        template: Template | None = None,
        loops: Loops | None = None,
        on_drained: Mapping[str, DrainHook] = MappingProxyType({}),
        on_shard: Mapping[str, tuple[Any, Any]] = MappingProxyType({}),
    ):
        """`on_drained`: by handler path, what hears that a partition is drained and sealed
        (the archiver advances an idle partition's watermark); `on_shard`, on Kinesis, that
        a shard is idle or finished (`kinesis_source.ShardHooks`' fields)."""
        self.settings = settings
        self.template = template or load_template()
        self.folder: Path = settings.home / "runtime"
        self.functions = {n: LocalFunction(spec) for n, spec in self.template.functions.items()}
        self.gateway = Gateway(self.functions.values(), settings.gateway_host,
                               settings.gateway_port,
                               max_connections=settings.http_max_connections,
                               read_timeout_s=settings.http_read_timeout_seconds,
                               tls=settings.tls)
        self.mappings: list[StreamMapping | KinesisMapping] = []
        if settings.bus == "kinesis":
            self.mappings += self._kinesis_mappings(on_shard, loops)
        else:
            self.mappings += [
                StreamMapping(function, source, self._topic(source), self.folder,
                              on_drained.get(function.spec.handler), loops=loops)
                for function in self.functions.values()
                for source in function.spec.streams
            ]

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

    def _topic(self, source: StreamSource) -> Topic:
        """The bus topic a stream source names: the template's is AWS's, here it's settings'."""
        if self.settings.bus == "kafka":  # kafka-python is the `kafka` extra: imported here
            from lambdalake.functions.runtime.kafka_source import KafkaTopic
            from lambdalake.kafka_topics import ensure_bus_topics

            ensure_bus_topics(self.settings)
            return KafkaTopic(self.settings.kafka_bootstrap, self.settings.topic)
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
