"""A view's answer as CSV or an Arrow IPC stream: one flat table, a column per dimension and
metric; a quantiles metric gives a column per rank asked (`duration_ms.0.9`)."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv

from lambdalake.events import epoch_ms


def flat_table(rows: list[dict[str, Any]], columns: list[str], ranks: tuple[float, ...],
               quantile_metrics: set[str], tz: str | None) -> pa.Table:
    """`rows` as a table, `bucket` a timestamp (in `tz` when given), every column present
    even when no row is."""
    names: list[str] = []
    for column in columns:
        names += [f"{column}.{rank}" for rank in ranks] if column in quantile_metrics else [column]
    data: dict[str, list[Any]] = {name: [] for name in names}
    for row in rows:
        for column in columns:
            value = row.get(column)
            if column in quantile_metrics:
                for rank in ranks:
                    data[f"{column}.{rank}"].append(value.get(str(rank)) if value else None)
            else:
                data[column].append(epoch_ms(value) if column == "bucket" else value)
    arrays = {name: pa.array(values) for name, values in data.items()}
    arrays["bucket"] = pa.array(data["bucket"], pa.timestamp("ms", tz=tz or "UTC"))
    return pa.table(arrays)


def arrow_stream(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def csv_text(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pa_csv.write_csv(table, sink)
    return sink.getvalue().to_pybytes()
