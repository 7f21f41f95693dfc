"""The functions and their triggers, read from the AWS SAM template (`template.yaml`).

Read is what the local runtime acts on: each `AWS::Serverless::Function`'s handler (an image
function's is its `ImageConfig.Command`), package type, memory,
timeout and reserved concurrency (over `Globals.Function`, over SAM's defaults), and its
`HttpApi`, `SelfManagedKafka` / `MSK` and `Schedule` events. CloudFormation's short tags
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


class StreamSource(_Spec):
    topics: list[str] = Field(alias="Topics", min_length=1, max_length=1)
    batch_size: int = Field(100, alias="BatchSize", ge=1, le=10_000)
    batching_window_seconds: float = Field(
        0.5, alias="MaximumBatchingWindowInSeconds", ge=0, le=300
    )
    max_retries: int = Field(-1, alias="MaximumRetryAttempts", ge=-1, description="-1: forever")
    bisect_on_error: bool = Field(False, alias="BisectBatchOnFunctionError")
    consumer_group: str | None = Field(None, alias="ConsumerGroupId")

    @property
    def topic(self) -> str:
        return self.topics[0]


class Schedule(_Spec):
    expression: str = Field(alias="Schedule")


class FunctionSpec(_Spec):
    name: str
    handler: str = Field(alias="Handler", pattern=r"^[\w.]+\.\w+$")
    memory_mb: int = Field(128, alias="MemorySize", ge=128, le=10_240)
    timeout_seconds: float = Field(3, alias="Timeout", gt=0, le=900)
    reserved_concurrency: int | None = Field(None, alias="ReservedConcurrentExecutions", ge=0)
    package_type: Literal["Zip", "Image"] = Field("Zip", alias="PackageType")
    routes: list[HttpRoute] = []
    streams: list[StreamSource] = []
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

    # an image function names its handler as the image's command
    command = properties.get("ImageConfig", {}).get("Command") or [None]
    return FunctionSpec.model_validate(
        {"Handler": command[0]}
        | properties
        | {
            "name": name,
            "routes": of("HttpApi"),
            "streams": of(*STREAM_EVENTS),
            "schedules": of("Schedule", "ScheduleV2"),
        }
    )
