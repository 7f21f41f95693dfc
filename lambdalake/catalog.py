"""Published batch views: versions, manifests and the atomic pointer to the serving one.

Layout under the store root:
  views/<view>/v=<version>/part-0.parquet   written first
  views/_versions/<version>.json            the manifest, written after every data file
  views/_current.json                       {"version": ...}, written last: the publish
Readers follow `_current.json` to a manifest and read only the files it lists, so they
never see a half-written version; a failed run never moves the pointer.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel

from lambdalake.storage import NotFound, ObjectStore

PREFIX = "views"
CURRENT = f"{PREFIX}/_current.json"
VERSIONS = f"{PREFIX}/_versions"
RUNS = f"{PREFIX}/_runs"


class ViewFiles(BaseModel):
    files: list[str]
    rows: int


class Manifest(BaseModel):
    version: str
    cut: int
    created: str
    engine: str
    rows_read: int
    views: dict[str, ViewFiles]
    base_version: str | None = None  # set by incremental runs


def new_version(now: datetime | None = None) -> str:
    return (now or datetime.now(UTC)).strftime("v%Y%m%dT%H%M%S%fZ")


def data_key(view: str, version: str, part: int = 0) -> str:
    return f"{PREFIX}/{view}/v={version}/part-{part}.parquet"


def write_manifest(store: ObjectStore, manifest: Manifest) -> None:
    store.put(f"{VERSIONS}/{manifest.version}.json", manifest.model_dump_json().encode())


def publish(store: ObjectStore, version: str) -> None:
    read_manifest(store, version)  # refuse to point at a version that does not exist
    store.put(CURRENT, json.dumps({"version": version}).encode())


def read_manifest(store: ObjectStore, version: str) -> Manifest:
    try:
        return Manifest.model_validate_json(store.get(f"{VERSIONS}/{version}.json"))
    except NotFound:
        raise LookupError(f"no published batch version {version!r}") from None


def current(store: ObjectStore) -> Manifest | None:
    try:
        version = json.loads(store.get(CURRENT))["version"]
    except NotFound:
        return None
    return read_manifest(store, version)


def versions(store: ObjectStore) -> list[str]:
    return [k.rsplit("/", 1)[1].removesuffix(".json") for k in store.list(f"{VERSIONS}/")]


def record_run(store: ObjectStore, run: dict[str, Any]) -> None:
    store.put(f"{RUNS}/{run['version']}.json", json.dumps(run).encode())


def runs(store: ObjectStore) -> list[dict[str, Any]]:
    return [json.loads(store.get(k)) for k in store.list(f"{RUNS}/")]
