"""The view DSL: one declaration, computed by every engine and merged by the serving layer.

A view reads one event type, keys by dimensions, buckets by event time, optionally
filters, and keeps monoid metrics. Pure: no I/O.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from lambdalake.events import Event
from lambdalake.monoids import Monoid

Bucket = Literal["minute", "hour", "day"]
BUCKET_MS: dict[str, int] = {"minute": 60_000, "hour": 3_600_000, "day": 86_400_000}
_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")
# The filter operators, once: Python values and Spark columns compare through them alike.
OPERATORS: dict[str, Callable[[Any, Any], Any]] = {
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


@dataclass(frozen=True)
class Condition:
    """`field op value`: one conjunct of a view's filter. Rows with the field null never match."""

    field: str
    op: str
    value: str | int | float | bool

    def __post_init__(self) -> None:
        if self.op not in OPERATORS:
            raise ValueError(f"unknown operator {self.op!r}; use one of {', '.join(OPERATORS)}")

    def compare(self, left: Any, right: Any) -> Any:
        """`left op right` for anything with comparison operators (values, Spark columns)."""
        return OPERATORS[self.op](left, right)

    def matches(self, value: Any) -> bool:
        return value is not None and self.compare(value, self.value)

    def sql(self) -> str:
        op = "=" if self.op == "==" else self.op
        return f'"{self.field}" {op} {sql_literal(self.value)}'


def sql_literal(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int | float):
        return repr(value)
    return "'" + value.replace("'", "''") + "'"


@dataclass(frozen=True)
class View:
    name: str
    event_type: str
    keys: tuple[str, ...]
    bucket: Bucket
    metrics: Mapping[str, Monoid]
    where: tuple[Condition, ...] = field(default=())

    def __post_init__(self) -> None:
        for name in (self.name, *self.keys, *self.metrics):
            if not _NAME.match(name):
                raise ValueError(f"{name!r}: names are lowercase letters, digits and _")
        if self.bucket not in BUCKET_MS:
            raise ValueError(f"{self.name}: bucket must be one of {', '.join(BUCKET_MS)}")
        clash = {"bucket", *self.keys} & set(self.metrics)
        if clash or len(set(self.keys)) != len(self.keys):
            raise ValueError(f"{self.name}: a metric or key name is used twice")

    @property
    def bucket_ms(self) -> int:
        return BUCKET_MS[self.bucket]

    def bucket_of(self, ts: int) -> int:
        return ts - ts % self.bucket_ms

    def fields_read(self) -> set[str]:
        fields = set(self.keys) | {c.field for c in self.where}
        return fields | {m.field for m in self.metrics.values() if m.field}

    def accepts(self, event: Event) -> bool:
        return event.type == self.event_type and all(
            c.matches(event.fields.get(c.field)) for c in self.where
        )

    def key_of(self, event: Event) -> tuple[Any, ...]:
        fields = event.fields
        return tuple([fields.get(k) for k in self.keys])

    def where_sql(self) -> str:
        return " AND ".join(c.sql() for c in self.where) or "TRUE"

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "event_type": self.event_type,
            "dimensions": list(self.keys),
            "bucket": self.bucket,
            "metrics": {name: m.kind for name, m in self.metrics.items()},
            "where": [f"{c.field} {c.op} {c.value!r}" for c in self.where],
        }
