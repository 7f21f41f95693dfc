"""Merged queries over a view: parameters checked, SQL planned, accumulators finalized.

Pure: the plan is SQL over a relation `merged` with a view's table columns (the batch view
rows unioned with the real-time cells); the serving layer runs it in DuckDB.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal

from lambdalake.events import INSTANT_RANGE, EventSchema, epoch_ms, iso
from lambdalake.monoids import DEFAULT_QUANTILES, Monoid
from lambdalake.views import BUCKET_MS, View

Granularity = Literal["minute", "hour", "day", "total"]
_ORDER = list(BUCKET_MS)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_RULES = {"int": f" between {INT64_MIN} and {INT64_MAX}"}
MAX_QUANTILES = 20
# How DuckDB merges accumulators, by kind (the serving layer's answers, incremental batch
# runs). A kind not listed (the sketches: DuckDB has no DataSketches here) is gathered into a
# list and merged by its own `merge_all`, which is right for every kind.
MERGE_SQL = {"count": "sum({})", "sum": "sum({})", "min": "min({})", "max": "max({})"}
GATHER_SQL = "list({})"


def merge_sql(metric: Monoid, column: str) -> str:
    """The SQL aggregate over a column of `metric`'s accumulators."""
    return MERGE_SQL.get(metric.kind, GATHER_SQL).format(column)


def gathered(metric: Monoid) -> bool:
    """Whether `merge_sql` returns a list of `metric`'s accumulators, for `merge_all`."""
    return metric.kind not in MERGE_SQL


def merged(metric: Monoid, value: Any) -> Any:
    """The merged accumulator from what `merge_sql` returned."""
    return metric.merge_all(value) if gathered(metric) else value


class QueryError(ValueError):
    def __init__(self, field: str, rule: str):
        super().__init__(f"{field}: {rule}")
        self.field, self.rule = field, rule


@dataclass(frozen=True)
class Query:
    start: int | None = None  # epoch ms, inclusive
    end: int | None = None  # epoch ms, exclusive
    bucket: Granularity | None = None  # None: the view's own bucket
    group_by: tuple[str, ...] | None = None  # None: every dimension
    filters: dict[str, Any] = field(default_factory=dict)
    order_by: str | None = None  # "metric" (descending) or "name:asc" / "name:desc"
    limit: int | None = None
    quantiles: tuple[float, ...] = DEFAULT_QUANTILES  # the ranks quantiles metrics answer


def parse(
    view: View,
    schema: EventSchema,
    *,
    start: str | None = None,
    end: str | None = None,
    bucket: str | None = None,
    group_by: str | None = None,
    filters: dict[str, str] | None = None,
    order_by: str | None = None,
    limit: int | None = None,
    quantiles: str | None = None,
) -> Query:
    """Check query parameters as they come over HTTP; errors name the parameter and rule."""
    granularity = bucket or view.bucket
    if granularity not in (*BUCKET_MS, "total"):
        raise QueryError("bucket", "must be one of minute, hour, day, total")
    if granularity != "total" and _ORDER.index(granularity) < _ORDER.index(view.bucket):
        raise QueryError("bucket", f"finer than the view's {view.bucket} bucket")
    bounds = [_instant(name, v, view) for name, v in (("from", start), ("to", end))]
    if None not in bounds and bounds[0] >= bounds[1]:  # type: ignore[operator]
        raise QueryError("to", "must be after from")
    dims = tuple(d for d in (group_by or "").split(",") if d) if group_by is not None else None
    for dim in dims or ():
        if dim not in view.keys:
            raise QueryError("group_by", f"{dim!r} is not a dimension of {view.name}")
    typed = {name: _typed(name, value, schema, view) for name, value in (filters or {}).items()}
    if order_by is not None:
        name, _, direction = order_by.partition(":")
        known = ("bucket", *view.keys, *view.metrics)
        if name not in known or direction not in ("", "asc", "desc"):
            raise QueryError("order_by", "must be a metric, dimension or bucket, optionally :asc")
        if name in view.metrics and not view.metrics[name].ordered:
            raise QueryError("order_by", f"{name} has several values per row: it does not sort")
    if limit is not None and not 1 <= limit <= 100_000:
        raise QueryError("limit", "must be between 1 and 100000")
    ranks = DEFAULT_QUANTILES if quantiles is None else _ranks(quantiles)
    return Query(bounds[0], bounds[1], granularity, dims, typed, order_by, limit, ranks)  # type: ignore[arg-type]


def _ranks(text: str) -> tuple[float, ...]:
    try:
        ranks = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise QueryError("quantiles", "must be numbers separated by commas") from None
    if not all(0 <= rank <= 1 for rank in ranks):
        raise QueryError("quantiles", "each must be between 0 and 1")
    if len(ranks) > MAX_QUANTILES:
        raise QueryError("quantiles", f"at most {MAX_QUANTILES}")
    return ranks


def _instant(name: str, value: str | None, view: View) -> int | None:
    if value is None:
        return None
    try:
        ms = epoch_ms(_epoch_or_iso(value))
    except ValueError as exc:
        raise QueryError(name, str(exc)) from None
    if ms % view.bucket_ms:
        raise QueryError(name, f"must fall on a {view.bucket} boundary of {view.name}")
    return ms


def _epoch_or_iso(value: str) -> int | str:
    """Epoch ms from ASCII digits (no longer than int64's), else the text for ISO 8601."""
    if not (value.isascii() and value.isdigit()):
        return value
    if len(value) > len(str(INT64_MAX)):
        raise ValueError(INSTANT_RANGE)
    return int(value)


def _typed(name: str, value: str, schema: EventSchema, view: View) -> Any:
    if name not in view.keys:
        raise QueryError(name, f"not a dimension of {view.name}")
    kind = schema.field_type(name)
    try:
        parse: dict[str, Callable[[str], Any]] = {
            "int": _int64, "float": float, "bool": _bool, "string": str}
        return parse[kind](value)
    except ValueError:
        raise QueryError(name, f"must be a {kind}{_RULES.get(kind, '')}") from None


def _int64(value: str) -> int:
    number = int(value)  # ValueError past 4,300 digits too
    if not INT64_MIN <= number <= INT64_MAX:
        raise ValueError(value)
    return number


def _bool(value: str) -> bool:
    if value not in ("true", "false"):
        raise ValueError(value)
    return value == "true"


def plan(view: View, query: Query) -> tuple[str, list[Any]]:
    """SQL over `merged` and its parameters."""
    dims = list(view.keys if query.group_by is None else query.group_by)
    total = query.bucket == "total"
    width = None if total else BUCKET_MS[query.bucket or view.bucket]
    bucket = "min(bucket)" if total else f"bucket - bucket % {width}"
    select = [f"{bucket} AS bucket", *(f'"{d}"' for d in dims)]
    select += [f"{merge_sql(m, _q(n))} AS {_q(n)}" for n, m in view.metrics.items()]
    where, params = ["TRUE"], []
    if query.start is not None:
        where.append("bucket >= ?")
        params.append(query.start)
    if query.end is not None:
        where.append("bucket < ?")
        params.append(query.end)
    for name, value in query.filters.items():
        where.append(f"{_q(name)} = ?")
        params.append(value)
    group = [] if total else ["1"]
    group += [str(i + 2) for i in range(len(dims))]
    sql = f"SELECT {', '.join(select)} FROM merged WHERE {' AND '.join(where)}"
    if group:
        sql += f" GROUP BY {', '.join(group)}"
    sql += f" ORDER BY {', '.join(str(i + 1) for i in range(len(dims) + 1))}"
    return sql, params


def merged_records(view: View, query: Query, columns: list[str], rows: list[tuple]) -> list[dict]:
    """The rows of `plan`'s SQL as records of merged accumulators, bucket in epoch ms."""
    records = []
    for row in rows:
        record = dict(zip(columns, row, strict=True))
        if record["bucket"] is None:
            continue  # `total` over no rows at all
        if query.bucket == "total" and query.start is not None:
            record["bucket"] = query.start
        for name, metric in view.metrics.items():
            record[name] = merged(metric, record[name])
        records.append(record)
    return records


def finalize(view: View, query: Query, columns: list[str], rows: list[tuple]) -> list[dict]:
    """Turn merged accumulators into answers; order and limit (sketches are only known here)."""
    answers = merged_records(view, query, columns, rows)
    for record in answers:
        record["bucket"] = iso(record["bucket"])
        for name, metric in view.metrics.items():
            record[name] = metric.result(record[name], query.quantiles)
    if query.order_by:
        name, _, direction = query.order_by.partition(":")
        descending = direction == "desc" or (not direction and name in view.metrics)
        present = [r for r in answers if r[name] is not None]
        present.sort(key=lambda r: r[name], reverse=descending)
        answers = present + [r for r in answers if r[name] is None]  # nulls last, either way
    answers = answers[: query.limit] if query.limit else answers
    for record in answers:
        for name in view.metrics:
            if isinstance(record[name], Decimal):
                record[name] = decimal_text(record[name])
    return answers


def decimal_text(value: Decimal) -> str:
    """A decimal answer as sent in JSON: a string with exactly its scale (`"203.86"`)."""
    return format(value, "f")


def _q(name: str) -> str:
    return f'"{name}"'
