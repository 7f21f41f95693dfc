"""The functions and their triggers, read from the AWS SAM template (`template.yaml`).

Read is what the local runtime acts on: each `AWS::Serverless::Function`'s handler (an image
function's is its `ImageConfig.Command`), package type, memory,
timeout and reserved concurrency (over `Globals.Function`, over SAM's defaults), and its
`HttpApi`, `SelfManagedKafka` / `MSK`, `Kinesis`, `Schedule`, `S3`, `SQS` and `DynamoDB` events;
and the queues (`AWS::SQS::Queue`, with their redrive policy) and tables (`AWS::DynamoDB::Table`,
with their stream) those events name, which the local runtime creates on an AWS-compatible
endpoint. CloudFormation's short tags (`!Ref`, `!Sub`, ...) load as their long form.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

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


def logical_id(reference: Any) -> str:
    """The resource a `!Ref X`, `!GetAtt X.Arn` or `!GetAtt X.StreamArn` names."""
    if isinstance(reference, dict) and "Ref" in reference:
        return str(reference["Ref"])
    if isinstance(reference, dict) and "Fn::GetAtt" in reference:
        target = reference["Fn::GetAtt"]
        return str(target[0] if isinstance(target, list) else target.split(".")[0])
    raise ValueError(f"expected !Ref or !GetAtt of a resource of the template, not {reference!r}")


class _Reference(_Spec):
    @field_validator("resource", mode="before", check_fields=False)
    @classmethod
    def _resource(cls, value: Any) -> str:
        return logical_id(value)


class BucketSource(_Reference):
    """An `S3` event: objects created in a bucket, under a key prefix."""

    resource: str = Field(alias="Bucket")
    events: list[str] | str = Field(alias="Events")
    filter: dict[str, Any] = Field({}, alias="Filter")

    @property
    def prefix(self) -> str:
        rules = self.filter.get("S3Key", {}).get("Rules", [])
        return next((r["Value"] for r in rules if r.get("Name", "").lower() == "prefix"), "")


class QueueSource(_Reference):
    """An `SQS` event: batches of a queue's messages."""

    resource: str = Field(alias="Queue")
    batch_size: int = Field(10, alias="BatchSize", ge=1, le=10_000)
    batching_window_seconds: float = Field(0, alias="MaximumBatchingWindowInSeconds", ge=0,
                                           le=300)
    response_types: list[str] = Field([], alias="FunctionResponseTypes")

    @property
    def partial_failures(self) -> bool:
        return "ReportBatchItemFailures" in self.response_types


class TableStreamSource(Batching, _Reference):
    """A `DynamoDB` event: a table's stream, shard by shard."""

    resource: str = Field(alias="Stream")
    starting_position: str = Field("TRIM_HORIZON", alias="StartingPosition")
    batching_window_seconds: float = Field(0, alias="MaximumBatchingWindowInSeconds", ge=0,
                                           le=300)  # AWS's default for a DynamoDB stream


class Queue(_Spec):
    """An `AWS::SQS::Queue`: its visibility timeout and dead-letter queue."""

    name: str
    visibility_timeout_seconds: int = Field(30, alias="VisibilityTimeout", ge=0, le=43_200)
    redrive: dict[str, Any] | None = Field(None, alias="RedrivePolicy")

    @property
    def dead_letter_queue(self) -> str | None:
        return logical_id(self.redrive["deadLetterTargetArn"]) if self.redrive else None

    @property
    def max_receive_count(self) -> int | None:
        return int(self.redrive["maxReceiveCount"]) if self.redrive else None


class Table(_Spec):
    """An `AWS::DynamoDB::Table` with its stream."""

    name: str
    key_schema: list[dict[str, str]] = Field(alias="KeySchema")
    attributes: list[dict[str, str]] = Field(alias="AttributeDefinitions")
    stream: dict[str, str] = Field({}, alias="StreamSpecification")


class AsyncInvocation(_Spec):
    """`EventInvokeConfig`: how an asynchronous invocation (an S3 notification) is retried."""

    max_retries: int = Field(2, alias="MaximumRetryAttempts", ge=0, le=2)
    destinations: dict[str, Any] = Field({}, alias="DestinationConfig")

    @property
    def on_failure_queue(self) -> str | None:
        on_failure = self.destinations.get("OnFailure")
        return logical_id(on_failure["Destination"]) if on_failure else None


class FunctionSpec(_Spec):
    name: str
    handler: str = Field(alias="Handler", pattern=r"^[\w.]+\.\w+$")
    memory_mb: int = Field(128, alias="MemorySize", ge=128, le=10_240)
    timeout_seconds: float = Field(3, alias="Timeout", gt=0, le=900)
    reserved_concurrency: int | None = Field(None, alias="ReservedConcurrentExecutions", ge=0)
    package_type: Literal["Zip", "Image"] = Field("Zip", alias="PackageType")
    routes: list[HttpRoute] = []
    streams: list[StreamSource] = []
    kinesis: list[KinesisSource] = []
    schedules: list[Schedule] = []
    asynchronous: AsyncInvocation = Field(AsyncInvocation(), alias="EventInvokeConfig")
    buckets: list[BucketSource] = []
    queues: list[QueueSource] = []
    tables: list[TableStreamSource] = []


class Template(_Spec):
    functions: dict[str, FunctionSpec]
    queues: dict[str, Queue] = {}
    tables: dict[str, Table] = {}


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


def cloudformation(text: str) -> dict[str, Any]:
    """A CloudFormation template's document, its short tags in their long form."""
    return dict(yaml.load(text, Loader=_CloudFormationLoader))


def shipped_template() -> Path:
    return Path(str(files("lambdalake.functions") / "template.yaml"))


def load_template(path: Path | None = None) -> Template:
    """The template at `path`; by default the one shipped with the package."""
    document = cloudformation((path or shipped_template()).read_text())
    defaults = document.get("Globals", {}).get("Function", {})
    resources = document.get("Resources", {})

    def of_type(kind: str) -> dict[str, dict[str, Any]]:
        return {name: resource.get("Properties", {}) for name, resource in resources.items()
                if resource.get("Type") == kind}

    functions = {
        name: function_spec(name, defaults | properties)
        for name, properties in of_type("AWS::Serverless::Function").items()
    }
    queues = {name: Queue.model_validate(properties | {"name": name})
              for name, properties in of_type("AWS::SQS::Queue").items()}
    tables = {name: Table.model_validate(properties | {"name": name})
              for name, properties in of_type("AWS::DynamoDB::Table").items()}
    return Template(functions=functions, queues=queues, tables=tables)


def function_spec(name: str, properties: dict[str, Any]) -> FunctionSpec:
    events = list(properties.get("Events", {}).values())

    def of(*types: str) -> list[dict[str, Any]]:
        return [e.get("Properties", {}) for e in events if e["Type"] in types]

    # an image function names its handler as the image's command
    command = properties.get("ImageConfig", {}).get("Command") or [None]
    return FunctionSpec.model_validate(
        {"Handler": command[0]}
        | properties
        | {
            "name": name,
            "routes": of("HttpApi"),
            "streams": of(*STREAM_EVENTS),
            "kinesis": of("Kinesis"),
            "schedules": of("Schedule", "ScheduleV2"),
            "buckets": of("S3"),
            "queues": of("SQS"),
            "tables": of("DynamoDB"),
        }
    )
