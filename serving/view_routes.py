"""One GET route per view, built from the project, so the OpenAPI document says exactly what
each view takes and answers: its buckets and orderings as enums, its dimension filters as
parameters, its rows typed. The routes parse the request into a kernel `Query`; `answer`
(the serving app's) runs it.

No `from __future__ import annotations` here: each route's annotations are built per view
at definition time, and FastAPI reads them as they are.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeAlias

from fastapi import APIRouter, Query, Request, Response

from lambdalake.project import Project
from lambdalake.query import MAX_ROWS, QueryError, parse
from lambdalake.query import Query as ViewQuery
from lambdalake.serving.errors import ApiError
from lambdalake.serving.models import Errors, answer_model
from lambdalake.views import BUCKET_MS, View

Format = Literal["json", "csv", "arrow"]
MEDIA_TYPES: dict[str, str] = {
    "json": "application/json",
    "csv": "text/csv",
    "arrow": "application/vnd.apache.arrow.stream",
}
PREFIX = ".prefix"


@dataclass(frozen=True)
class ViewRequest:
    view: View
    query: ViewQuery
    layers: bool
    format: str


Answer = Callable[[Request, ViewRequest], Response]


def view_router(project: Project, answer: Answer, responses: dict[int | str, Any]) -> APIRouter:
    router = APIRouter(tags=["views"])
    for view in project.views.values():
        _add_route(router, project, view, answer, responses)

    def unknown_view(view: str) -> Response:
        known = ", ".join(sorted(project.views))
        raise ApiError(400, "view", f"no view named {view!r}; known: {known}")

    router.add_api_route("/views/{view}", unknown_view, methods=["GET"], include_in_schema=False)
    return router


def _add_route(
    router: APIRouter, project: Project, view: View, answer: Answer,
    responses: dict[int | str, Any],
) -> None:
    schema = project.schemas[view.event_type]
    coarser = list(BUCKET_MS)[list(BUCKET_MS).index(view.bucket):]
    Bucket: TypeAlias = Literal[tuple([*coarser, "total"])]  # type: ignore[valid-type]  # noqa: N806
    sortable = ["bucket", *view.keys, *(n for n, m in view.metrics.items() if m.ordered)]
    Order: TypeAlias = Literal[tuple(f"{n}{d}" for n in sortable for d in ("", ":asc", ":desc"))]  # type: ignore[valid-type]  # noqa: N806
    instant = ("Event time, ISO 8601 or epoch ms, any instant: the answer covers the buckets "
               "starting in [from, to) and says so in `range`")

    def query_view(
        request: Request,
        start: Annotated[str | None, Query(alias="from", description=instant + "; inclusive",
                                           examples=["1795392012345"])] = None,
        end: Annotated[str | None, Query(alias="to", description="Exclusive; as from",
                                         examples=["2026-11-24T00:00:00Z"])] = None,
        bucket: Annotated[Bucket | None, Query(description=f"Roll up; default {view.bucket}")] = None,  # noqa: E501
        group_by: Annotated[str | None, Query(
            description=f"Dimensions, comma-separated, of {', '.join(view.keys)}; default "
            "every one; empty for none", examples=[",".join(view.keys)])] = None,
        order_by: Annotated[Order | None, Query(
            description="A metric sorts descending, anything else ascending, unless :asc or "
            ":desc; default bucket then dimensions")] = None,
        limit: Annotated[int | None, Query(ge=1, le=MAX_ROWS, description="Rows per page (top "
                                           f"N); at most {MAX_ROWS}, the default")] = None,
        quantiles: Annotated[str | None, Query(description="Ranks quantiles metrics answer",
                                               examples=["0.5,0.9,0.99"])] = None,
        tz: Annotated[str | None, Query(
            description="An IANA zone: bucket=day rolls hour and minute buckets into its local "
            "days; buckets are labelled in its local time", examples=["Europe/Paris"])] = None,
        cursor: Annotated[str | None, Query(description="`next_cursor` of the previous page, "
                                            "with the same parameters")] = None,
        layers: Annotated[bool, Query(description="Also the batch part and the real-time "
                                      "part beside the merge (JSON only)")] = False,
        format: Annotated[Format | None, Query(  # noqa: A002
            description="json, csv or arrow (Arrow IPC stream); default from Accept, "
            "else json")] = None,
    ) -> Response:
        filters, prefixes = _dimension_filters(request)
        query = parse(view, schema, start=start, end=end, bucket=bucket, group_by=group_by,
                      filters=filters, prefixes=prefixes, order_by=order_by, limit=limit,
                      quantiles=quantiles, tz=tz, cursor=cursor)
        chosen = format or _accepted(request.headers.get("accept", ""))
        if layers and chosen != "json":
            raise QueryError("layers", "only the JSON answer carries the layers")
        return answer(request, ViewRequest(view, query, layers, chosen))

    content: dict[str, dict[str, Any]] = {
        media: {} for media in MEDIA_TYPES.values() if media != "application/json"}
    router.add_api_route(
        f"/views/{view.name}", query_view, methods=["GET"],
        name=f"query_{view.name}", summary=f"Query {view.name}",
        description=f"{view.name}: {view.event_type} events by {', '.join(view.keys)} and "
        f"{view.bucket}, merged batch ⊕ real time.",
        response_model=answer_model(schema, view),
        responses={200: {"content": content}, 400: {"model": Errors}, **responses},
        openapi_extra={"parameters": _filter_parameters(project, view)},
    )


_PARAMETERS = {"from", "to", "bucket", "group_by", "order_by", "limit", "quantiles", "tz",
               "cursor", "layers", "format"}
_JSON_TYPES = {"string": "string", "int": "integer", "float": "number", "bool": "boolean"}


def _filter_parameters(project: Project, view: View) -> list[dict[str, Any]]:
    schema = project.schemas[view.event_type]
    parameters = []
    for key in view.keys:
        kind = schema.field_type(key)
        parameters.append({
            "name": key, "in": "query", "required": False, "style": "form", "explode": True,
            "description": f"Only rows whose {key} is this; repeat the parameter for any of "
            "several (IN)",
            "schema": {"type": "array", "items": {"type": _JSON_TYPES.get(kind, "string")}},
        })
        if kind == "string":
            parameters.append({
                "name": key + PREFIX, "in": "query", "required": False,
                "description": f"Only rows whose {key} starts with this",
                "schema": {"type": "string"},
            })
    return parameters


def _dimension_filters(request: Request) -> tuple[dict[str, list[str]], dict[str, str]]:
    filters: dict[str, list[str]] = {}
    prefixes: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        if name in _PARAMETERS:
            continue
        if name.endswith(PREFIX):
            if name[: -len(PREFIX)] in prefixes:
                raise ApiError(400, name, "given more than once; a prefix takes one value")
            prefixes[name[: -len(PREFIX)]] = value
        else:
            filters.setdefault(name, []).append(value)
    return filters, prefixes


def _accepted(accept: str) -> str:
    """The format an Accept header asks for; JSON unless it names CSV or Arrow."""
    for name in ("arrow", "csv"):
        if MEDIA_TYPES[name] in accept:
            return name
    return "json"
