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


# A value in an answer row. A decimal metric (sum, min or max of a `decimal(p,s)` field) is a
# string with exactly s decimals ("203.86"): exact, as a JSON number read as a float is not.
Cell = str | bool | int | float | dict[str, float] | None
_DECIMALS = ('A decimal metric (sum, min or max of a decimal(p,s) field) is a string with '
             'exactly s decimals, e.g. "203.86".')


class ViewAnswer(BaseModel):
    view: str
    rows: list[dict[str, Cell]] = Field(
        description="bucket (ISO 8601), dimensions, metrics. " + _DECIMALS,
        examples=[[{"bucket": "2024-05-01T00:00:00Z", "sku": "sku-1", "revenue": "203.86",
                    "orders": 7}]],
    )
    freshness: Freshness


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
