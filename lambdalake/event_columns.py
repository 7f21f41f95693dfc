"""Many events at once, column-wise: decode a batch of JSON records with `pyarrow.json` against
the declared schemas and check them with vectorized rules, the rules of `events.Validator`.

`decode_batch` answers a table of the whole batch only when it is sure that every record is
one the Validator accepts, with the same values; otherwise None, and the caller validates
record by record (which also names what is wrong with each bad record). It refuses a batch,
never a record: a record that is bad, or merely unusual, sends its whole batch down the
per-record path, so the order of the records, and with it dedup, is always kept.

What it is sure of, per rule of `lambdalake.events`:
- one JSON object per record, no newline inside (pyarrow reads a line per row), at most
  `MAX_EVENT_BYTES`; valid UTF-8; no control
  character in the bytes but tab, nor an escape that decodes to one (`\\b`, `\\f`, `\\u`):
  so no string holds one but tab, LF and CR;
- `type` one of the schemas; the envelope present; `ts` an epoch-ms integer in range and not
  too far past the record's arrival (an ISO string sends the batch down the per-record path);
- declared fields of the record's type only: pyarrow refuses names no schema declares, and a
  name declared only by other types must not appear in the record at all (`"sku": null` is
  an extra field of a pageview). A batch with a `\\u` escape is not decoded here, so every
  name pyarrow saw is in the bytes literally;
- types as pydantic's strict mode checks them: pyarrow refuses a float for an int, a
  number out of int64, a string for a number, anything but true/false for a bool; floats
  must be finite (pyarrow reads `NaN`);
- a `decimal(p,s)` as the bus writes it, a string of digits with an optional `-` and `.`,
  cast to Arrow's decimal128(p,s) only when no digit is lost and at most p remain (a JSON
  number there, which the Validator reads from its text, sends the batch down);
- required fields not null; strings within `MAX_STRING_CHARS` characters; `event_id` 1 to
  256 characters.
A schema whose field name is declared with two different types sends every batch down the
per-record path (one column cannot hold both).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import compress

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj

from lambdalake.events import (
    MAX_EVENT_BYTES,
    MAX_MS,
    MAX_STRING_CHARS,
    DecimalType,
    EventSchema,
    arrow_type_name,
)

ARRIVAL = "__arrival"  # the column decode_batch adds: each record's arrival
_CONTROL_BYTES = bytes(b for b in range(0x20) if b != ord("\t"))
# A partition's share of a micro-batch is one block or two: parsed in the calling thread, as
# handing them to Arrow's thread pool costs a wake-up per batch (milliseconds when the cores
# are busy) for no parallelism.
_BLOCK = 1 << 20
_MAX_EVENT_ID = 256
# `events._DECIMAL_TEXT` in RE2, whose `$` is the very end (Python's also takes a final "\n")
_DECIMAL_TEXT = r"^-?[0-9]+(\.[0-9]+)?$"


class BatchDecoder:
    """Decodes batches of event records for one set of schemas."""

    def __init__(self, schemas: Mapping[str, EventSchema], max_future_ms: int):
        self.max_future_ms = max_future_ms
        self.schemas = dict(schemas)
        declared: dict[str, str] = {}
        conflict = False
        for schema in schemas.values():
            for field in schema.fields:
                arrow = arrow_type_name(schema.field_type(field))
                conflict |= declared.setdefault(field, arrow) != arrow
        self.usable = not conflict
        # a decimal is read as its text, then made exact by its own rule (`_exact_decimals`)
        self._decimals = {field: pa.decimal128(d.precision, d.scale) for field, arrow in
                          declared.items() if (d := DecimalType.named(arrow))}
        columns = [("event_id", pa.string()), ("type", pa.string()), ("ts", pa.int64())]
        columns += [(name, pa.string() if name in self._decimals else pa.type_for_alias(arrow))
                    for name, arrow in declared.items()]
        self._options = pj.ParseOptions(
            explicit_schema=pa.schema(columns), unexpected_field_behavior="error",
            newlines_in_values=False,
        )
        # per type: the names only other types declare (must not appear), its required fields
        self._foreign = {
            name: [f for f in declared if f not in schema.fields] for name, schema in
            schemas.items()
        }
        self._required = {
            name: [f for f, t in schema.fields.items() if not t.endswith("?")]
            for name, schema in schemas.items()
        }
        self._quoted = {field: f'"{field}"'.encode() for field in declared}  # a name in JSON
        self._strings = ["event_id", "type"] + [
            f for f, arrow in declared.items() if arrow == "string"
        ]
        self._floats = [f for f, arrow in declared.items() if arrow == "float64"]

    def decode_batch(self, values: Sequence[bytes | None], arrivals: np.ndarray) -> pa.Table | None:
        """The batch as a table (with its arrivals in `ARRIVAL`), or None when any record needs
        the per-record validation."""
        if not self.usable or not values:
            return None
        try:
            data = b"\n".join(values)  # type: ignore[arg-type]
        except TypeError:  # a record without a value
            return None
        if not _plain(data, len(values)) or max(map(len, values)) > MAX_EVENT_BYTES:  # type: ignore[arg-type]
            return None
        try:
            table = pj.read_json(pa.py_buffer(data), parse_options=self._options,
                                 read_options=pj.ReadOptions(block_size=_BLOCK, use_threads=False))
        except pa.ArrowInvalid:
            return None
        if table.num_rows != len(values):  # two objects on one line
            return None
        table = table.append_column(ARRIVAL, pa.array(arrivals, pa.int64()))
        if not self._valid(table, data, values):
            return None
        return self._exact_decimals(table)

    def _exact_decimals(self, table: pa.Table) -> pa.Table | None:
        """Each decimal field's text as its exact value (Arrow's decimal128: a scaled
        integer), or None when any text is not a value `DecimalType.exact` reads. A JSON
        number there never gets this far: pyarrow refuses a number in a string column."""
        for field, decimal in self._decimals.items():
            text = table[field]
            if pc.all(pc.match_substring_regex(text, _DECIMAL_TEXT)).as_py() is False:
                return None
            try:  # refuses more decimals than the scale (but zeros) or digits than the precision
                exact = pc.cast(text, decimal)
            except pa.ArrowInvalid:
                return None
            table = table.set_column(table.schema.get_field_index(field), field, exact)
        return table

    def _valid(self, table: pa.Table, data: bytes, values: Sequence[bytes | None]) -> bool:
        checked = list(self.schemas)
        known = pc.is_in(table["type"], value_set=pa.array(checked, pa.string()))
        if not pc.all(known.fill_null(False)).as_py():
            return False
        if table["event_id"].null_count or table["ts"].null_count:
            return False
        ids = pc.utf8_length(table["event_id"])
        if pc.min(ids).as_py() < 1 or pc.max(ids).as_py() > _MAX_EVENT_ID:
            return False
        return (
            self._times_valid(table)
            and self._strings_short(table, data)
            and self._floats_finite(table)
            and all(self._fields_valid(table, data, values, name) for name in checked)
        )

    def _times_valid(self, table: pa.Table) -> bool:
        ts, arrival = table["ts"], table[ARRIVAL]
        latest = pc.add(arrival, self.max_future_ms)
        ok = pc.and_(pc.and_(pc.greater_equal(ts, 0), pc.less_equal(ts, MAX_MS)),
                     pc.less_equal(ts, latest))
        return bool(pc.all(ok).as_py())

    def _strings_short(self, table: pa.Table, data: bytes) -> bool:
        """No string longer than `MAX_STRING_CHARS` (none can be in a shorter batch)."""
        if len(data) <= MAX_STRING_CHARS:
            return True
        return all(
            (pc.max(pc.utf8_length(table[name])).as_py() or 0) <= MAX_STRING_CHARS
            for name in self._strings
        )

    def _floats_finite(self, table: pa.Table) -> bool:
        return all(
            pc.all(pc.is_finite(table[name])).as_py() in (True, None) for name in self._floats
        )

    def _fields_valid(
        self, table: pa.Table, data: bytes, values: Sequence[bytes | None], name: str
    ) -> bool:
        """The records of type `name` hold their required fields and no field of another
        type, not even as null: such a field's name is not in their bytes (nor, when they
        are most of the batch, in the batch more often than the field has values)."""
        rows = pc.equal(table["type"], name)
        present = pc.sum(rows).as_py()
        if not present:
            return True
        for field in self._required[name]:
            if pc.any(pc.and_(rows, pc.is_null(table[field]))).as_py():
                return False
        for field in self._foreign[name]:
            if pc.any(pc.and_(rows, pc.is_valid(table[field]))).as_py():
                return False
        unsure = self._foreign[name]
        if 2 * present > len(values):  # cheaper than joining most of the records again
            unsure = [field for field in unsure if not self._named_per_value(table, data, field)]
        if not unsure:
            return True
        records = data if present == len(values) else b"\n".join(
            compress(values, rows.to_numpy()))  # type: ignore[arg-type]
        return not any(self._quoted[field] in records for field in unsure)

    def _named_per_value(self, table: pa.Table, data: bytes, field: str) -> bool:
        """Whether the field's name is in the bytes only as often as the field has values: then
        no record names it with null."""
        column = table[field]
        return data.count(self._quoted[field]) == len(column) - column.null_count


def _plain(data: bytes, records: int) -> bool:
    """Valid UTF-8; no control character in the bytes but tab and the newlines between the
    records; no escape that decodes to a control character or could spell a field name."""
    if len(data) - len(data.translate(None, _CONTROL_BYTES)) != records - 1:
        return False
    if not data.isascii():
        try:  # pyarrow.json does not check that strings are UTF-8
            data.decode()
        except UnicodeDecodeError:
            return False
    return b"\\" not in data or not any(e in data for e in (b"\\u", b"\\b", b"\\f"))
