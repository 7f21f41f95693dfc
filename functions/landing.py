"""Bulk import: S3 ObjectCreated events in, the landed files' events on the bus.

A partner drops `.jsonl`, `.jsonl.gz` or `.parquet` files of events under the landing prefix
(`landing_prefix`, `landing/`) of the landing store (`landing_url`: the landing bucket on AWS,
a watched folder here). Each line (a Parquet row) is validated as HTTP ingestion validates an
event, and the valid events are published to the bus with their own `event_id`.

Once: after a file's events are durable on the bus, its content digest is recorded in the
lake store (`landing/_imported/<sha256>.json`), so a notification delivered again, or the same
file uploaded again under any key, publishes nothing. A file changed and uploaded again
publishes its events again, each with its `event_id`: (type, `event_id`) is the dedup rule of
every layer, so they count once.

Rejects: every line refused, and a whole file that cannot be read (a key outside the landing
prefix, an unknown format, a gzip or Parquet file that does not decode), is written, naming
the file, the line, the field and the rule, to `landing/_rejects/<key>.jsonl` in the lake
store: counted, never blocking the good lines. The handler raises only when the store or the
bus fails, so a retried invocation is one that can succeed.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import unquote_plus

from aws_lambda_powertools.utilities.data_classes import S3Event
from prometheus_client import Counter

from lambdalake.eventlog import now_ms
from lambdalake.events import Event, Problem, Validator, iso
from lambdalake.functions.environment import PerColdStart, current_settings
from lambdalake.functions.ingest import bus, bus_sized, validator
from lambdalake.settings import Settings
from lambdalake.storage import NotFound, ObjectStore, open_store

FORMATS = (".jsonl.gz", ".jsonl", ".parquet")
IMPORTED = "landing/_imported"
REJECTS = "landing/_rejects"
PUBLISH_CHUNK = 5_000  # events per publish: bounds what one bus call holds
_QUOTED_LINE_CHARS = 1_000

LINES = Counter("lambdalake_landing_lines_total", "Landed lines, by outcome", ["outcome"])

log = logging.getLogger("lambdalake.functions.landing")


@dataclass(frozen=True, slots=True)
class Reject:
    """A line refused (line None: the whole file), the field and the rule it broke."""

    line: int | None
    field: str
    rule: str
    text: str | None = None


class Unreadable(Exception):
    """The file as a whole cannot be read as events: one reject, no line."""

    def __init__(self, field: str, rule: str):
        super().__init__(rule)
        self.reject = Reject(None, field, rule)


@dataclass(frozen=True)
class Stores:
    landing: ObjectStore
    lake: ObjectStore
    landing_url: str


def _stores(settings: Settings) -> Stores:
    url = settings.landing_store_url
    return Stores(open_store(url, settings.s3_endpoint_url),
                  open_store(settings.store_url, settings.s3_endpoint_url), url.rstrip("/"))


stores = PerColdStart(_stores)


def handler(event: dict[str, Any], context: object) -> dict[str, Any]:
    files = [import_file(bucket, key) for bucket, key in landed_objects(event)]
    return {"files": files}


def landed_objects(event: Any) -> list[tuple[str, str]]:
    """The (bucket, key) of each object an S3 notification names; ValueError for another
    shape of event, naming what is missing."""
    try:
        records = list(S3Event(event).records)
        return [(r.s3.bucket.name, unquote_plus(r.s3.get_object.key)) for r in records]
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"landing takes an S3 event notification (Records[].s3.bucket.name, "
                         f"Records[].s3.object.key): {exc!r} is missing") from None


def import_file(bucket: str, key: str) -> dict[str, Any]:
    """Import one landed object; what it published and rejected."""
    where = stores()
    name = f"{where.landing_url}/{key}" if where.landing_url.startswith("file:") else (
        f"s3://{bucket}/{key}")
    try:
        data = read_landed(where, bucket, key)
    except Unreadable as unreadable:
        return finish(name, key, 0, [unreadable.reject])
    except NotFound:
        return finish(name, key, 0, [Reject(None, "key", "no such object (deleted since?)")])
    marker = f"{IMPORTED}/{hashlib.sha256(data).hexdigest()}.json"
    if where.lake.exists(marker):
        log.info("landed file already imported", extra={"file": name, "marker": marker})
        return {"file": name, "published": 0, "rejected": 0, "already_imported": True}
    try:
        published, rejects = publish_lines(key, data)
    except Unreadable as unreadable:
        return finish(name, key, 0, [unreadable.reject])
    summary = finish(name, key, published, rejects)
    where.lake.put(marker, json.dumps(summary | {"imported_at": iso(now_ms())}).encode())
    return summary


def read_landed(where: Stores, bucket: str, key: str) -> bytes:
    settings = current_settings()
    if not key.startswith(settings.landing_prefix):
        raise Unreadable("key", f"not under the landing prefix {settings.landing_prefix!r}")
    landing_bucket = where.landing_url.removeprefix("s3://").split("/")[0]
    if where.landing_url.startswith("s3://") and bucket != landing_bucket:
        raise Unreadable("bucket", f"{bucket!r} is not the landing bucket {landing_bucket!r}")
    if not key.endswith(FORMATS):
        raise Unreadable("key", "unknown format: a landed file ends in .jsonl, .jsonl.gz or "
                                ".parquet")
    return where.landing.get(key)


def publish_lines(key: str, data: bytes) -> tuple[int, list[Reject]]:
    """Validate every line, publish the valid events in chunks; the count and the rejects."""
    check, now = validator(), now_ms()
    rejects: list[Reject] = []
    valid: list[Event] = []
    published = 0
    for line, result, text in checked_lines(check, key, data, now):
        if isinstance(result, Event):
            valid.append(result)
        else:
            rejects += [Reject(line, p.field, p.error, text) for p in result]
        if len(valid) >= PUBLISH_CHUNK:
            bus().publish(valid)
            published, valid = published + len(valid), []
    if valid:
        bus().publish(valid)
        published += len(valid)
    return published, rejects


Checked = tuple[int, Event | list[Problem], str | None]


def checked_lines(check: Validator, key: str, data: bytes, now: int) -> Iterator[Checked]:
    if key.endswith(".parquet"):
        for line, row in parquet_rows(data):
            yield line, bus_sized(check.validate(row, now)), None
        return
    if key.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise Unreadable("$", f"not a gzip file: {exc}") from None
    for line, text in enumerate(data.split(b"\n"), start=1):
        if text.strip():
            quoted = text[:_QUOTED_LINE_CHARS].decode(errors="replace")
            yield line, bus_sized(check.validate_json(text.rstrip(b"\r"), now)), quoted


def parquet_rows(data: bytes) -> Iterator[tuple[int, dict[str, Any]]]:
    """The rows of a Parquet file as events (numbered from 1); a column without a value in a
    row is left out of it, as a JSON line would leave it out."""
    import pyarrow as pa  # only a Parquet file needs it
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(io.BytesIO(data)).iter_batches(batch_size=10_000)
        line = 0
        for batch in batches:
            for row in batch.to_pylist():
                line += 1
                yield line, {k: _json_value(v) for k, v in row.items() if v is not None}
    except (pa.ArrowException, OSError) as exc:
        raise Unreadable("$", f"not a readable Parquet file: {exc}") from None


def _json_value(value: Any) -> Any:
    """A Parquet value as JSON would carry it: instants as ISO 8601, decimals as text."""
    if isinstance(value, datetime | date):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, Decimal):
        return str(value)
    return value


def finish(name: str, key: str, published: int, rejects: list[Reject]) -> dict[str, Any]:
    """Write the file's rejects (if any); its summary."""
    summary: dict[str, Any] = {"file": name, "published": published, "rejected": len(rejects)}
    if rejects:
        lines = [json.dumps({"file": name, "line": r.line, "field": r.field, "rule": r.rule,
                             "text": r.text}) + "\n" for r in rejects]
        summary["rejects"] = f"{REJECTS}/{key}.jsonl"
        stores().lake.put(summary["rejects"], "".join(lines).encode())
        log.warning("landed lines rejected", extra=summary)
    LINES.labels("published").inc(published)
    LINES.labels("rejected").inc(len(rejects))
    return summary
