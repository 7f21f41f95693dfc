"""Published batch views: versions, manifests and the atomic pointer to the serving one.

Layout under the store root:
  views/<view>/v=<version>/part-0.parquet   written first
  views/_versions/<version>.json            the manifest, written after every data file
  views/_current.json                       {"version": ...}, written last: the publish
  views/_lease.json                         who runs the batch now (`lambdalake.lease`)
Readers follow `_current.json` to a manifest and read only the files it lists, so they
never see a half-written version; a failed run never moves the pointer.

A manifest names each view's definition fingerprint (`Project.fingerprints`). A version
covers a view only under the definition it was computed with: a view changed or added since
is absent from it (`view_cuts`), answered from the real-time layer alone, which holds it
from the start of the bus until a version computed with the new definition is published.

The pointer moves by compare-and-swap (a write conditional on the pointer read), so two
publishers never overwrite each other unseen: `publish` moves it only past the serving cut,
`point_at` (a rollback) only from the version it was asked to replace.

A rollback can serve any kept version, so the real-time layers keep every slice at or past
the lowest cut of the kept versions (`KeptVersions.floor`), not only those past the serving
cut: a rollback is then exact at once.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel

from lambdalake.events import iso
from lambdalake.project import Project
from lambdalake.storage import NotFound, ObjectStore, PreconditionFailed

PREFIX = "views"
CURRENT = f"{PREFIX}/_current.json"
VERSIONS = f"{PREFIX}/_versions"
RUNS = f"{PREFIX}/_runs"
LEASE = f"{PREFIX}/_lease.json"


class Superseded(RuntimeError):
    """A version not published: the serving one's cut is at or past its cut."""


class PointerMoved(RuntimeError):
    """The serving version changed since it was read: nothing was written."""


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
    # view -> `Project.fingerprints` when computed; a view without one is covered by nothing
    fingerprints: dict[str, str] = {}

    def covers(self, project: Project, view: str) -> bool:
        """Whether this version holds `view` as the project defines it now."""
        fingerprint = self.fingerprints.get(view)
        return view in self.views and fingerprint == project.fingerprints[view]


def view_cuts(manifest: Manifest | None, project: Project) -> dict[str, int]:
    """Per view, the arrival below which the batch version answers it: its cut when the
    version covers the view, else 0 (the real-time layer answers it all)."""
    return {
        name: manifest.cut if manifest and manifest.covers(project, name) else 0
        for name in project.views
    }


def realtime_floor(manifest: Manifest | None, project: Project) -> int:
    """The lowest arrival slice the real-time layer must keep to answer every view."""
    return min(view_cuts(manifest, project).values(), default=manifest.cut if manifest else 0)


def new_version(now: datetime | None = None) -> str:
    return (now or datetime.now(UTC)).strftime("v%Y%m%dT%H%M%S%fZ")


def data_key(view: str, version: str, part: int = 0) -> str:
    return f"{PREFIX}/{view}/v={version}/part-{part}.parquet"


def write_manifest(store: ObjectStore, manifest: Manifest) -> None:
    store.put(f"{VERSIONS}/{manifest.version}.json", manifest.model_dump_json().encode())


def publish(store: ObjectStore, version: str, *, at_serving_cut: bool = False) -> None:
    """Serve `version` if its cut is past the serving one's (`at_serving_cut`: or equal to
    it, for a recompute of a master dataset rewritten below the cut); else `Superseded`.

    The check and the write are one compare-and-swap: when another publisher moves the
    pointer in between, the write fails and the check is made again against its version.
    """
    manifest = read_manifest(store, version)  # refuse to point at a version that does not exist
    while True:
        pointed, tag = _pointer(store)
        serving = _manifest_if_any(store, pointed)  # a pointer ahead of its data serves nothing
        if serving is not None and not _passes(manifest.cut, serving.cut, at_serving_cut):
            raise Superseded(
                f"{serving.version} (cut {iso(serving.cut)}) is serving, at or past the cut "
                f"of {version} ({iso(manifest.cut)})"
            )
        try:
            _point(store, version, tag)
        except PreconditionFailed:
            continue
        return


def _passes(cut: int, serving_cut: int, at_serving_cut: bool) -> bool:
    return cut > serving_cut or (at_serving_cut and cut == serving_cut)


def point_at(store: ObjectStore, version: str, tag: str | None) -> None:
    """Serve `version` if the pointer still has `tag` (None: no pointer yet), whatever the
    cuts; else raise `PointerMoved`."""
    read_manifest(store, version)
    try:
        _point(store, version, tag)
    except PreconditionFailed:
        raise PointerMoved(f"the serving version changed meanwhile; {version} not served") from None


def _point(store: ObjectStore, version: str, tag: str | None) -> None:
    body = json.dumps({"version": version}).encode()
    if tag is None:
        store.create(CURRENT, body)
    else:
        store.replace(CURRENT, body, tag)


def read_manifest(store: ObjectStore, version: str) -> Manifest:
    try:
        return Manifest.model_validate_json(store.get(f"{VERSIONS}/{version}.json"))
    except NotFound:
        raise LookupError(f"no published batch version {version!r}") from None


def current(store: ObjectStore) -> Manifest | None:
    return current_tagged(store)[0]


def current_tagged(store: ObjectStore) -> tuple[Manifest | None, str | None]:
    """The serving version's manifest and the pointer's tag (None, None: nothing published)."""
    version, tag = _pointer(store)
    return (None, None) if version is None else (read_manifest(store, version), tag)


def _pointer(store: ObjectStore) -> tuple[str | None, str | None]:
    """The version `_current.json` names, and its tag (None, None: none)."""
    try:
        data, tag = store.get_tagged(CURRENT)
    except NotFound:
        return None, None
    return json.loads(data)["version"], tag


def _manifest_if_any(store: ObjectStore, version: str | None) -> Manifest | None:
    try:
        return None if version is None else read_manifest(store, version)
    except LookupError:
        return None


def versions(store: ObjectStore) -> list[str]:
    return [k.rsplit("/", 1)[1].removesuffix(".json") for k in store.list(f"{VERSIONS}/")]


class KeptVersions:
    """The kept versions' cuts, read again on each call (a manifest, immutable once written,
    is read once)."""

    def __init__(self, store: ObjectStore, project: Project | None = None):
        self.store, self.project = store, project
        self._cuts: dict[str, int] = {}

    def floor(self) -> int:
        """The real-time floor: the lowest cut of a kept version (0: none; no rollback goes
        back further) and, given the project, of the serving version for each view
        (`realtime_floor`: 0 for a view it does not cover). Slices below it may be dropped."""
        cuts = {}
        for version in versions(self.store):
            cut = self._cuts.get(version)
            if cut is None:
                manifest = _manifest_if_any(self.store, version)
                if manifest is None:
                    continue  # deleted since listed
                cut = manifest.cut
            cuts[version] = cut
        self._cuts = cuts
        lowest = min(cuts.values(), default=0)
        if self.project is None:
            return lowest
        return min(lowest, realtime_floor(current(self.store), self.project))


def record_run(store: ObjectStore, run: dict[str, Any]) -> None:
    store.put(f"{RUNS}/{run['version']}.json", json.dumps(run).encode())


def runs(store: ObjectStore) -> list[dict[str, Any]]:
    return [json.loads(store.get(k)) for k in store.list(f"{RUNS}/")]
