"""The serving API's bodies, as they appear in its OpenAPI document."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


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


class ViewAnswer(BaseModel):
    view: str
    rows: list[dict[str, Any]] = Field(description="bucket (ISO 8601), dimensions, metrics.")
    freshness: Freshness


class SqlRequest(BaseModel):
    sql: str = Field(min_length=1, max_length=100_000, description="One SELECT or WITH query.")


class SqlAnswer(BaseModel):
    columns: list[str]
    rows: list[list[Any]]
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
