"""Numbered versions of a function's code behind its `live` alias, as AWS Lambda keeps them.

Under `<home>/functions/<Name>/`: `versions/<n>/` holds version n's code (the handler's
module, as its file path in a package: `lambdalake/functions/ingest.py`) and `version.json`
(its handler, the code's sha256, when published); `alias-live.json` is the alias: the
version it points at and, while a deployment shifts traffic, one additional version with
its weight (AWS's `RoutingConfig.AdditionalVersionWeights`). Publishing the code of the
newest version again publishes nothing (as `PublishVersion` does).

The local runtime routes each invocation by the alias's weights and runs the chosen
version's handler module, loaded from its folder under a name of its own. A local version
pins the handler's module; what that module imports is the installed package. A function
never deployed runs `$LATEST`, the installed handler.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import threading
import zipfile
from dataclasses import asdict, dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from lambdalake.eventlog import now_ms
from lambdalake.events import iso

ALIAS = "live"


class VersionError(ValueError):
    """A deploy, shift or rollback that cannot be done as asked."""


@dataclass(frozen=True)
class Alias:
    version: int
    additional: int | None = None
    weight: float = 0.0  # of the additional version

    def pick(self, draw: float) -> int:
        """The version an invocation runs, for a uniform `draw` in [0, 1)."""
        return self.additional if self.additional is not None and draw < self.weight \
            else self.version

    def describe(self) -> str:
        if self.additional is None:
            return f"{ALIAS} -> version {self.version}"
        return (f"{ALIAS} -> version {self.version} ({1 - self.weight:.0%}), "
                f"version {self.additional} ({self.weight:.0%})")


def module_path(handler: str) -> Path:
    """Where a package keeps the handler's module: `a.b.handler` -> `a/b.py`."""
    return Path(*handler.rpartition(".")[0].split(".")).with_suffix(".py")


def read_code(handler: str, code: Path | None) -> bytes:
    """The handler's module from `code` (a folder or a zip laid out as a package, e.g. what
    `lambdalake functions package` built), or, without it, the installed module."""
    inside = module_path(handler)
    if code is None:
        spec = find_spec(handler.rpartition(".")[0])
        assert spec is not None and spec.origin is not None
        return Path(spec.origin).read_bytes()
    try:
        if zipfile.is_zipfile(code):
            with zipfile.ZipFile(code) as archive:
                return archive.read(inside.as_posix())
        return (code / inside).read_bytes()
    except (KeyError, OSError):
        raise VersionError(f"{code} holds no {inside} (the module of {handler})") from None


class FunctionVersions:
    def __init__(self, folder: Path, function: str, handler: str):
        self.folder, self.function, self.handler_path = folder / function, function, handler
        self._lock = threading.Lock()
        self._alias: tuple[tuple[int, int], Alias] | None = None  # ((inode, mtime), alias)
        self._handlers: dict[int, Any] = {}

    # ---------------------------------------------------------------- versions

    def numbers(self) -> list[int]:
        versions = self.folder / "versions"
        return sorted(int(p.name) for p in versions.iterdir()) if versions.exists() else []

    def described(self, number: int) -> dict[str, Any]:
        return json.loads((self.folder / "versions" / str(number) / "version.json").read_text())

    def publish(self, code: bytes) -> int:
        """A new version of `code`; the newest one when it holds the same code."""
        digest = hashlib.sha256(code).hexdigest()
        numbers = self.numbers()
        if numbers and self.described(numbers[-1])["sha256"] == digest:
            return numbers[-1]
        number = (numbers[-1] if numbers else 0) + 1
        folder = self.folder / "versions" / str(number)
        (folder / module_path(self.handler_path)).parent.mkdir(parents=True)
        (folder / module_path(self.handler_path)).write_bytes(code)
        _write_json(folder / "version.json", {"version": number, "handler": self.handler_path,
                                              "sha256": digest, "published": iso(now_ms())})
        return number

    # ---------------------------------------------------------------- the alias

    @property
    def _alias_file(self) -> Path:
        return self.folder / f"alias-{ALIAS}.json"

    def alias(self) -> Alias | None:
        """The alias as now on disk (None: never deployed); re-read when the file changes."""
        try:
            stat = self._alias_file.stat()
        except FileNotFoundError:
            return None
        seen = (stat.st_ino, stat.st_mtime_ns)  # each write replaces the file: a new inode
        with self._lock:
            if self._alias is None or self._alias[0] != seen:
                self._alias = (seen, Alias(**json.loads(self._alias_file.read_text())))
            return self._alias[1]

    def point(self, alias: Alias) -> Alias:
        known = set(self.numbers())
        for number in (alias.version, alias.additional):
            if number is not None and number not in known:
                raise VersionError(f"{self.function} has no version {number}")
        if not 0 <= alias.weight <= 1:
            raise VersionError(f"weight {alias.weight}: must be between 0 and 1")
        _write_json(self._alias_file, asdict(alias))
        return alias

    def deploy(self, code: bytes, canary: float | None = None) -> Alias:
        """Publish `code` and point the alias at it: all at once, or, with `canary`, that
        share of invocations while the rest stay on the version the alias points at."""
        number, current = self.publish(code), self.alias()
        if canary is None or current is None or current.version == number:
            return self.point(Alias(number))
        return self.point(Alias(current.version, number, canary))

    def shift(self, weight: float) -> Alias:
        """Move a deployment's traffic: `weight` to the new version (1: all of it)."""
        current = self.alias()
        if current is None or current.additional is None:
            raise VersionError(f"{self.function}: no deployment under way to shift")
        if weight >= 1:
            return self.point(Alias(current.additional))
        return self.point(Alias(current.version, current.additional, weight))

    def rollback(self) -> Alias:
        """A deployment under way: all traffic back on the version it started from; else the
        alias moves to the version before the one it points at."""
        current = self.alias()
        if current is None:
            raise VersionError(f"{self.function} was never deployed")
        if current.additional is not None:
            return self.point(Alias(current.version))
        older = [n for n in self.numbers() if n < current.version]
        if not older:
            raise VersionError(f"{self.function}: version {current.version} is the first")
        return self.point(Alias(older[-1]))

    # ---------------------------------------------------------------- running them

    def handler(self, number: int) -> Any:
        """Version `number`'s handler, its module loaded once under a name of its own."""
        with self._lock:
            if number not in self._handlers:
                module, _, attribute = self.handler_path.rpartition(".")
                path = self.folder / "versions" / str(number) / module_path(self.handler_path)
                name = f"{module}__{self.function}_v{number}"
                spec = importlib.util.spec_from_file_location(name, path)
                assert spec is not None and spec.loader is not None
                loaded = importlib.util.module_from_spec(spec)
                sys.modules[name] = loaded
                spec.loader.exec_module(loaded)
                self._handlers[number] = getattr(loaded, attribute)
            return self._handlers[number]


def _write_json(path: Path, value: dict[str, Any]) -> None:
    """Whole or not at all: a runtime reading the alias never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(value))
    os.replace(partial, path)
