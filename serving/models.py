"""The serving API's bodies, as they appear in its OpenAPI document."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from lambdalake.events import DecimalType, EventSchema
from lambdalake.views import View


class Problem(BaseModel):
    field: str = Field(description="The parameter, header or body field at fault.")
    error: str = Field(description="The rule it broke.")


class Errors(BaseModel):
    errors: list[Problem]


class Freshness(BaseModel):
    batch_version: str | None = Field(description="The batch version served; null before one.")
    cut: str | None = Field(description="Events that arrived before the cut are in the batch.")
    realtime_lag_ms: int | None = Field(
        description="Since the speed layer last reported being caught up; null if never."
    )
    stale: bool = Field(
        description="True when the real-time lag is past its bound (LAMBDALAKE_REALTIME_STALE_MS)"
        " or unknown: recent events may be missing from the answer."
    )


class ViewInfo(BaseModel):
    name: str
    event_type: str
    dimensions: list[str]
    bucket: str
    metrics: dict[str, str] = Field(description="Metric name -> monoid kind.")
    where: list[str]
    freshness: Freshness


class ViewList(BaseModel):
    views: list[ViewInfo]


class SqlRequest(BaseModel):
    sql: str = Field(min_length=1, max_length=100_000, description="One SELECT or WITH query.")


class SqlAnswer(BaseModel):
    columns: list[str]
    rows: list[list[Any]] = Field(
        description="Values as JSON; a DECIMAL (a decimal metric, a sum of one) is a string "
        'with exactly its scale, e.g. "203.86".'
    )
    truncated: bool = Field(description="True when more rows matched than were returned.")
    freshness: Freshness


class Health(BaseModel):
    status: str
    loops: dict[str, str] = Field(
        description="Each long-running loop: `ok`, or `retrying: <last error>` while its steps "
        "fail (it backs off and tries again)."
    )


class Readiness(BaseModel):
    status: str
    batch_version: str | None


class Range(BaseModel):
    """The buckets an answer covers: those starting in [from, to); null is unbounded."""

    model_config = ConfigDict(populate_by_name=True)

    start: str | None = Field(alias="from", examples=["2026-11-23T11:00:00Z"])
    end: str | None = Field(alias="to", examples=["2026-11-24T00:00:00Z"])


# How an answer shows each kind of metric: serving's table keyed by kind, as /sql's is.
_ANSWER_TYPES: dict[str, Callable[[Any], Any]] = {
    "count": lambda field: int,
    "sum": lambda field: field,
    "min": lambda field: field | None,
    "max": lambda field: field | None,
    "approx_distinct": lambda field: int,
    "quantiles": lambda field: dict[str, float] | None,
    "distinct_set": lambda field: int,
}
_FIELD_TYPES: dict[str, Any] = {"string": str, "int": int, "float": float, "bool": bool}
_DECIMAL_TEXT = ' (a decimal: a string with exactly its scale, e.g. "203.86")'


def _python_type(field_type: str) -> Any:
    """How an answer shows a field's values: a decimal as its exact text."""
    return str if DecimalType.named(field_type) else _FIELD_TYPES[field_type]


def row_model(schema: EventSchema, view: View) -> type[BaseModel]:
    """A view's answer row: bucket, its dimensions typed by the event schema, its metrics."""
    fields: dict[str, Any] = {"bucket": (str, Field(
        description="The bucket's start, ISO 8601 (UTC, or local time with its offset "
        "under tz); a total's is its `from`.", examples=["2026-11-23T10:00:00Z"]))}
    for key in view.keys:
        dimension_type = schema.fields[key]
        python = _python_type(dimension_type.rstrip("?"))
        fields[key] = (python | None if dimension_type.endswith("?") else python,
                       Field(None, description=f"Dimension {key} (absent when not grouped by)"))
    for name, metric in view.metrics.items():
        declared = schema.field_type(metric.field) if metric.field else None
        field_type = _python_type(declared) if declared else None
        decimal = declared is not None and DecimalType.named(declared) is not None
        described = metric.kind + (f" of {metric.field}" if metric.field else "")
        fields[name] = (_ANSWER_TYPES[metric.kind](field_type),
                        Field(description=described + (_DECIMAL_TEXT if decimal else "")))
    return create_model(f"{_camel(view.name)}Row", **fields)


def answer_model(schema: EventSchema, view: View) -> type[BaseModel]:
    """A view's answer: its typed rows, the range covered, the next page, freshness."""
    row = row_model(schema, view)
    layers = create_model(f"{_camel(view.name)}Layers", batch=(list[row], ...),  # type: ignore[valid-type]
                          realtime=(list[row], ...))  # type: ignore[valid-type]
    return create_model(
        f"{_camel(view.name)}Answer",
        view=(Literal[view.name], ...),
        rows=(list[row], ...),  # type: ignore[valid-type]
        range=(Range, ...),
        next_cursor=(str | None, Field(description="Send it as `cursor` (with the same "
                                       "parameters) for the next page; null on the last.")),
        truncated=(bool, Field(description="True when more rows follow this page.")),
        freshness=(Freshness, ...),
        layers=(layers | None, Field(None, description="With layers=1: the batch part "
                                     "and the real-time part the rows merge.")),
    )


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))
