"""The functions and their triggers, read from the AWS SAM template (`template.yaml`).

Read is what the local runtime acts on: each `AWS::Serverless::Function`'s handler, memory,
timeout and reserved concurrency (over `Globals.Function`, over SAM's defaults), and its
`HttpApi`, `SelfManagedKafka` / `MSK`, `Kinesis` and `Schedule` events. CloudFormation's short tags
(`!Ref`, `!Sub`, ...) load as their long form.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

STREAM_EVENTS = ("SelfManagedKafka", "MSK")


class _Spec(BaseModel):
    model_config = ConfigDict(populate_by_name=True, frozen=True)


class HttpRoute(_Spec):
    method: str = Field(alias="Method")
    path: str = Field(alias="Path")

    @property
    def key(self) -> str:
        return f"{self.method.upper()} {self.path}"


class Batching(_Spec):
    """What every stream event-source mapping does with batches (AWS's names)."""

    batch_size: int = Field(100, alias="BatchSize", ge=1, le=10_000)
    batching_window_seconds: float = Field(
        0.5, alias="MaximumBatchingWindowInSeconds", ge=0, le=300
    )
    max_retries: int = Field(-1, alias="MaximumRetryAttempts", ge=-1, description="-1: forever")
    bisect_on_error: bool = Field(False, alias="BisectBatchOnFunctionError")
    max_record_age_seconds: int = Field(
        -1, alias="MaximumRecordAgeInSeconds", ge=-1, le=604_800, description="-1: forever"
    )
    response_types: list[Literal["ReportBatchItemFailures"]] = Field(
        [], alias="FunctionResponseTypes"
    )

    @property
    def reports_item_failures(self) -> bool:
        return "ReportBatchItemFailures" in self.response_types


class StreamSource(Batching):
    topics: list[str] = Field(alias="Topics", min_length=1, max_length=1)
    consumer_group: str | None = Field(None, alias="ConsumerGroupId")

    @property
    def topic(self) -> str:
        return self.topics[0]


class KinesisSource(Batching):
    """A `Kinesis` event: the stream is the template's (an ARN, for AWS); here it is the
    settings' `kinesis_stream`."""

    stream: Any = Field(None, alias="Stream")
    starting_position: Literal["TRIM_HORIZON", "LATEST", "AT_TIMESTAMP"] = Field(
        alias="StartingPosition"
    )
    starting_timestamp: float | None = Field(None, alias="StartingPositionTimestamp")
    parallelization_factor: int = Field(1, alias="ParallelizationFactor", ge=1, le=1)


class Schedule(_Spec):
    expression: str = Field(alias="Schedule")


class FunctionSpec(_Spec):
    name: str
    handler: str = Field(alias="Handler", pattern=r"^[\w.]+\.\w+$")
    memory_mb: int = Field(128, alias="MemorySize", ge=128, le=10_240)
    timeout_seconds: float = Field(3, alias="Timeout", gt=0, le=900)
    reserved_concurrency: int | None = Field(None, alias="ReservedConcurrentExecutions", ge=0)
    routes: list[HttpRoute] = []
    streams: list[StreamSource] = []
    kinesis: list[KinesisSource] = []
    schedules: list[Schedule] = []


class Template(_Spec):
    functions: dict[str, FunctionSpec]


class _CloudFormationLoader(yaml.SafeLoader):
    """YAML with CloudFormation's short-form intrinsic functions."""


def _intrinsic(loader: yaml.SafeLoader, tag: str, node: yaml.Node) -> dict[str, Any]:
    if isinstance(node, yaml.ScalarNode):
        value: Any = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)  # type: ignore[arg-type]
    return {"Ref" if tag == "Ref" else f"Fn::{tag}": value}


_CloudFormationLoader.add_multi_constructor("!", _intrinsic)


def load_template(path: Path | None = None) -> Template:
    """The template at `path`; by default the one shipped with the package."""
    shipped = files("lambdalake.functions") / "template.yaml"
    text = (path or shipped).read_text()
    document = yaml.load(text, Loader=_CloudFormationLoader)
    defaults = document.get("Globals", {}).get("Function", {})
    functions = {
        name: function_spec(name, defaults | resource.get("Properties", {}))
        for name, resource in document.get("Resources", {}).items()
        if resource.get("Type") == "AWS::Serverless::Function"
    }
    return Template(functions=functions)


def function_spec(name: str, properties: dict[str, Any]) -> FunctionSpec:
    events = list(properties.get("Events", {}).values())

    def of(*types: str) -> list[dict[str, Any]]:
        return [e.get("Properties", {}) for e in events if e["Type"] in types]

    return FunctionSpec.model_validate(
        properties
        | {
            "name": name,
            "routes": of("HttpApi"),
            "streams": of(*STREAM_EVENTS),
            "kinesis": of("Kinesis"),
            "schedules": of("Schedule", "ScheduleV2"),
        }
    )
