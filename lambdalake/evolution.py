"""Schema evolution: which changes of an event type the master dataset written before it can
still be read with, and a refusal naming the view and the field for those it cannot.

Master objects keep the columns their type had when they were written; every schema they
were written with is recorded (`lambdalake.master.record_schema`, `master/_schemas/`), and
`lambdalake.batch.objects` reads old objects with today's schema. Readable changes:
- a field added: optional (`"string?"`), as events written before have no value for it;
- a field renamed through `EventSchema.aliases` (old name -> new name);
- a field removed that no view reads (a view that reads it fails the project's own check);
- a type widened: int to float; int to decimal(p,s) with p - s >= 19 (every int64 fits);
  float to decimal(p,s) (each value cast to the nearest at the scale, ties to even: a float
  written from an amount with at most s decimals becomes that amount); decimal(p,s) to
  decimal(p',s') with s' >= s and p' - s' >= p - s.
Anything else (a narrowing, a type changed for another) is refused at start-up.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from lambdalake.events import DecimalType, EventSchema
from lambdalake.project import Project

INT64_DIGITS = 19


class SchemaChangeRefused(ValueError):
    """An event type changed in a way its master data cannot be read with; says what."""


def readable_as(old: str, new: str) -> bool:
    """Whether values stored as field type `old` read as `new` without loss of meaning."""
    if old == new or (old, new) == ("int", "float"):
        return True
    wider, narrower = DecimalType.named(new), DecimalType.named(old)
    if wider is None:
        return False
    integer_digits = wider.precision - wider.scale
    if old == "int":
        return integer_digits >= INT64_DIGITS
    if old == "float":
        return True
    return narrower is not None and wider.scale >= narrower.scale and (
        integer_digits >= narrower.precision - narrower.scale
    )


Written = Mapping[str, Sequence[Mapping[str, str]]]  # event type -> each schema's fields


def breaking_changes(project: Project, written: Written) -> list[str]:
    """What keeps today's schemas from reading the data written with the `written` ones
    (event type -> each schema's fields, as declared), one sentence each."""
    problems: list[str] = []
    for event_type, schema in project.schemas.items():
        for old_fields in written.get(event_type, ()):
            problems += [p for name in schema.fields
                         if (p := _change(project, schema, name, old_fields)) is not None
                         and p not in problems]
    return problems


def _change(
    project: Project, schema: EventSchema, name: str, old: Mapping[str, str]
) -> str | None:
    source = next((n for n in (name, *reversed(schema.old_names(name))) if n in old), None)
    field = f"{schema.name}.{name}"
    if source is None:
        if schema.optional(name):
            return None
        return (f"{_readers(project, schema, name)} {field}, a new required field that events "
                f"written before lack: declare it optional ({schema.field_type(name)}?)")
    stored, declared = old[source].rstrip("?"), schema.field_type(name)
    if readable_as(stored, declared):
        return None
    return (f"{_readers(project, schema, name)} {field}, stored as {stored} but now declared "
            f"{declared}: not a widening (keep {stored}, or widen it)")


def _readers(project: Project, schema: EventSchema, name: str) -> str:
    views = sorted(v.name for v in project.views_of(schema.name) if name in v.fields_read())
    return f"view {', '.join(views)} reads" if views else "no view reads"


def refuse_breaking_changes(project: Project, written: Written) -> None:
    problems = breaking_changes(project, written)
    if problems:
        raise SchemaChangeRefused("schema change refused: " + "; ".join(problems))
