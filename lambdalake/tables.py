"""A view's table in Arrow: the columns batch views and real-time cells share. Apart from
`lambdalake.project`, so that loading a project (ingestion does) needs no pyarrow."""

from __future__ import annotations

import pyarrow as pa

from lambdalake.events import ARROW_TYPES
from lambdalake.project import Project
from lambdalake.views import View


def table_schema(project: Project, view: View) -> pa.Schema:
    """Columns of a view's table, shared by batch views and real-time cells."""
    schema = project.schemas[view.event_type]
    fields = [pa.field("bucket", pa.int64(), nullable=False)]
    fields += [pa.field(k, ARROW_TYPES[schema.field_type(k)]) for k in view.keys]
    for name, metric in view.metrics.items():
        field_type = ARROW_TYPES[schema.field_type(metric.field)] if metric.field else None
        fields.append(pa.field(name, metric.arrow_type(field_type)))
    return pa.schema(fields)
