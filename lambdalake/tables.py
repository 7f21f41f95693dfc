"""A view's table in Arrow: the columns batch views and real-time cells share. Apart from
`lambdalake.project`, so that loading a project (ingestion does) needs no pyarrow."""

from __future__ import annotations

import pyarrow as pa

from lambdalake.events import DecimalType, arrow_type_name
from lambdalake.project import Project
from lambdalake.views import View


def arrow_type(name: str) -> pa.DataType:
    """The Arrow type a kernel type name names: an alias pyarrow knows (`int64`, `binary`),
    or `decimal128(p,s)`, which it has no alias for."""
    decimal = DecimalType.named(name)
    if decimal:
        return pa.decimal128(decimal.precision, decimal.scale)
    return pa.type_for_alias(name)


def field_arrow_type(field_type: str) -> pa.DataType:
    """The Arrow type of a declared field type (`int`, `decimal(18,2)`)."""
    return arrow_type(arrow_type_name(field_type))


def table_schema(project: Project, view: View) -> pa.Schema:
    """Columns of a view's table, shared by batch views and real-time cells."""
    schema = project.schemas[view.event_type]
    fields = [pa.field("bucket", pa.int64(), nullable=False)]
    fields += [pa.field(k, field_arrow_type(schema.field_type(k))) for k in view.keys]
    for name, metric in view.metrics.items():
        field_type = arrow_type_name(schema.field_type(metric.field)) if metric.field else None
        fields.append(pa.field(name, arrow_type(metric.arrow_type(field_type))))
    return pa.schema(fields)
