"""A project: the event schemas and the views over them, loaded by `module:attribute`."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

from lambdalake.events import DecimalType, EventSchema
from lambdalake.views import View


@dataclass(frozen=True)
class Project:
    schemas: dict[str, EventSchema]
    views: dict[str, View]

    @classmethod
    def of(cls, schemas: Iterable[EventSchema], views: Iterable[View]) -> Project:
        project = cls({s.name: s for s in schemas}, {v.name: v for v in views})
        for view in project.views.values():
            project._check(view)
        return project

    def _check(self, view: View) -> None:
        schema = self.schemas.get(view.event_type)
        if schema is None:
            raise ValueError(f"view {view.name}: no schema for event type {view.event_type!r}")
        for name in view.fields_read():
            if name not in schema.fields:
                raise ValueError(f"view {view.name}: {view.event_type} has no field {name!r}")
        for name, metric in view.metrics.items():
            field_type = schema.field_type(metric.field) if metric.field else None
            decimal = field_type is not None and DecimalType.named(field_type) is not None
            numeric = field_type in ("int", "float") or decimal
            if metric.numeric and not numeric:
                raise ValueError(f"view {view.name}: metric {name} needs a numeric field")
            if metric.hashes and decimal:
                raise ValueError(f"view {view.name}: metric {name} cannot hash the decimal "
                                 f"field {metric.field!r}; count distinct values of a string")

    def views_of(self, event_type: str) -> list[View]:
        return [v for v in self.views.values() if v.event_type == event_type]

    @cached_property
    def fingerprints(self) -> dict[str, str]:
        """view name -> a digest of everything its rows depend on: the event type, keys,
        bucket, filter, metrics (kind, field, parameters, in order) and the declared types of
        the fields it reads. Equal digests: a table computed under one definition is valid
        under the other. Stable across processes and versions (no Python `hash`)."""
        return {name: self._fingerprint(view) for name, view in self.views.items()}

    @cached_property
    def digest(self) -> str:
        """One digest of every view's fingerprint: which definitions a state reflects."""
        return _digest(sorted(self.fingerprints.items()))

    def only(self, names: Iterable[str]) -> Project:
        """This project with only the views named (same schemas)."""
        return Project(self.schemas, {name: self.views[name] for name in names})

    def _fingerprint(self, view: View) -> str:
        schema = self.schemas[view.event_type]
        return _digest({
            "event_type": view.event_type,
            "keys": list(view.keys),
            "bucket": view.bucket,
            "where": [[c.field, c.op, type(c.value).__name__, c.value] for c in view.where],
            "metrics": [[name, m.kind, dataclasses.asdict(m)] for name, m in view.metrics.items()],
            "types": {f: schema.fields[f] for f in sorted(view.fields_read())},
        })


def _digest(definition: object) -> str:
    canonical = json.dumps(definition, sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


class ProjectError(ValueError):
    """The project setting names nothing loadable; the message says what and why."""


def load_project(spec: str) -> Project:
    """The `Project` at `module:attribute` (attribute default `project`)."""
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any failure of the user's module: one clear line, not a trace
        raise ProjectError(f"project {spec!r}: cannot import {module_name!r}: "
                           f"{type(exc).__name__}: {exc}") from None
    project = getattr(module, attribute or "project", None)
    if not isinstance(project, Project):
        raise ProjectError(f"project {spec!r}: {module_name}.{attribute or 'project'} is not "
                           "a lambdalake Project (set LAMBDALAKE_PROJECT=module:attribute)")
    return project
