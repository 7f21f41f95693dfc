"""PostgreSQL's text format for DuckDB answers: type OIDs, values as text, DataRow messages.

The sandbox worker encodes a wire-protocol answer with these, so the server only splices
bytes. Every value travels in the text format (format code 0), as PostgreSQL writes it, so
that drivers parse it with their ordinary loaders.
"""

from __future__ import annotations

import json
import math
import struct
from datetime import date, datetime
from datetime import time as time_of_day
from decimal import Decimal
from functools import singledispatch
from typing import Any

import pyarrow as pa

TEXT_OID = 25
# DuckDB's type names (as str(DuckDBPyType) writes them) -> PostgreSQL type OIDs
_OIDS = {
    "BOOLEAN": 16, "TINYINT": 21, "SMALLINT": 21, "UTINYINT": 21, "INTEGER": 23,
    "USMALLINT": 23, "BIGINT": 20, "UINTEGER": 20, "UBIGINT": 1700, "HUGEINT": 1700,
    "UHUGEINT": 1700, "FLOAT": 700, "DOUBLE": 701, "VARCHAR": TEXT_OID, "BLOB": 17,
    "DATE": 1082, "TIME": 1083, "TIMESTAMP": 1114, "TIMESTAMP_MS": 1114, "TIMESTAMP_S": 1114,
    "TIMESTAMP_NS": 1114, "TIMESTAMP WITH TIME ZONE": 1184, "INTERVAL": 1186, "UUID": 2950,
    "JSON": 114,
}
_ARRAY_OIDS = {16: 1000, 17: 1001, 21: 1005, 23: 1007, 20: 1016, 25: 1009, 700: 1021,
               701: 1022, 1082: 1182, 1114: 1115, 1184: 1185, 1700: 1231}
_JSON_OID = 114
_NULL = struct.pack("!i", -1)


def type_oid(duckdb_type: str) -> int:
    """The OID a DuckDB type is shown as: its PostgreSQL twin, an array of it, JSON for
    structs and maps, else text."""
    if duckdb_type.endswith("[]"):
        return _ARRAY_OIDS.get(type_oid(duckdb_type[:-2]), 1009)
    if duckdb_type.startswith("DECIMAL"):
        return 1700
    if duckdb_type.startswith(("STRUCT", "MAP", "UNION")):
        return _JSON_OID
    return _OIDS.get(duckdb_type, TEXT_OID)


def data_row(values: tuple) -> bytes:
    """A DataRow message: each value in the text format, NULL as length -1."""
    fields = [struct.pack("!h", len(values))]
    for value in values:
        if value is None:
            fields.append(_NULL)
        else:
            encoded = pg_text(value).encode()
            fields += [struct.pack("!i", len(encoded)), encoded]
    body = b"".join(fields)
    return b"D" + struct.pack("!i", len(body) + 4) + body


@singledispatch
def pg_text(value: Any) -> str:
    """A value as PostgreSQL's text format writes it."""
    return str(value)


@pg_text.register
def _(value: bool) -> str:
    return "t" if value else "f"


@pg_text.register
def _(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return repr(value)


@pg_text.register
def _(value: datetime) -> str:
    return value.isoformat(sep=" ")


@pg_text.register(date)
@pg_text.register(time_of_day)
def _(value: date | time_of_day) -> str:
    return value.isoformat()


@pg_text.register
def _(value: Decimal) -> str:
    return format(value, "f")


@pg_text.register
def _(value: bytes) -> str:
    return "\\x" + value.hex()


@pg_text.register
def _(value: pa.MonthDayNano) -> str:
    seconds, nanoseconds = divmod(value.nanoseconds, 10**9)
    hours, rest = divmod(seconds, 3600)
    clock = f"{hours:02d}:{rest // 60:02d}:{rest % 60:02d}.{nanoseconds // 1000:06d}"
    return f"{value.months} mons {value.days} days {clock}"


@pg_text.register(list)
@pg_text.register(tuple)
def _(value: list | tuple) -> str:
    return "{" + ",".join(_array_item(item) for item in value) + "}"


@pg_text.register
def _(value: dict) -> str:
    return json.dumps(value, default=str)


def _array_item(item: Any) -> str:
    if item is None:
        return "NULL"
    text = pg_text(item)
    if isinstance(item, list | tuple):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
