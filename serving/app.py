"""The serving API on FastAPI: queries answered as batch(cut C) ⊕ real-time cells ≥ C."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib.metadata import version
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST

from lambdalake.events import iso
from lambdalake.project import Project
from lambdalake.query import parse
from lambdalake.realtime import RealtimeCells
from lambdalake.settings import Settings
from lambdalake.storage import ObjectStore
from lambdalake.views import View
from serving.batch_views import BatchViews, Snapshot
from serving.errors import ApiError, install_error_handlers
from serving.metrics import RequestMetrics, ServingMetrics
from serving.models import (
    Errors,
    Freshness,
    Health,
    Readiness,
    SqlAnswer,
    SqlRequest,
    ViewAnswer,
    ViewInfo,
    ViewList,
)
from serving.query import DuckDB, run_sql, view_rows

_QUERY_PARAMETERS = {"from", "to", "bucket", "group_by", "order_by", "limit", "quantiles"}
_API_KEY = APIKeyHeader(name="X-API-Key", auto_error=False)
_BEARER = HTTPBearer(auto_error=False)


@dataclass(frozen=True)
class Serving:
    settings: Settings
    project: Project
    views: BatchViews
    duck: DuckDB
    metrics: ServingMetrics


def _serving(request: Request) -> Serving:
    return request.app.state.serving


ServingDep = Annotated[Serving, Depends(_serving)]
public = APIRouter(tags=["operations"])
api = APIRouter(responses={401: {"model": Errors, "description": "No valid API key"}})


def require_api_key(
    serving: ServingDep,
    key: Annotated[str | None, Security(_API_KEY)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_BEARER)],
) -> None:
    offered = (key or (bearer.credentials if bearer else "")).encode()
    if not any(hmac.compare_digest(offered, k.encode()) for k in serving.settings.api_keys):
        field = "Authorization" if bearer and not key else "X-API-Key"
        rule = "missing or unknown API key; send X-API-Key: <key> or Authorization: Bearer <key>"
        raise ApiError(401, field, rule, headers={"WWW-Authenticate": "Bearer"})


@public.get("/healthz")
def healthz() -> Health:
    """Liveness: the process answers."""
    return Health(status="ok")


@public.get("/readyz", responses={503: {"model": Errors, "description": "Not loaded yet"}})
def readyz(serving: ServingDep) -> Readiness:
    """Readiness: the published batch views have been looked up (and loaded, if any)."""
    if not serving.views.ready:
        raise ApiError(503, "batch", "the published batch views have not been loaded yet")
    return Readiness(status="ready", batch_version=serving.views.snapshot.version)


@api.get("/views", tags=["views"])
def list_views(serving: ServingDep) -> ViewList:
    """Every view: its dimensions, metrics and bucket, and how fresh its answers are."""
    fresh = freshness(serving.views, serving.views.snapshot)
    infos = [ViewInfo(**v.describe(), freshness=fresh) for v in serving.project.views.values()]
    return ViewList(views=infos)


@api.get(
    "/views/{view}",
    tags=["views"],
    responses={400: {"model": Errors}, 404: {"model": Errors, "description": "No such view"}},
)
def query_view(
    view: str,
    request: Request,
    serving: ServingDep,
    start: Annotated[str | None, Query(alias="from", description="Event time, inclusive: "
                                       "ISO 8601 or epoch ms on a bucket boundary")] = None,
    end: Annotated[str | None, Query(alias="to", description="Event time, exclusive")] = None,
    bucket: Annotated[str | None, Query(description="minute, hour, day or total; "
                                        "default the view's own")] = None,
    group_by: Annotated[str | None, Query(description="dim,dim; default every "
                                          "dimension; empty for none")] = None,
    order_by: Annotated[str | None, Query(description="metric (descending), or "
                                          "name:asc / name:desc")] = None,
    limit: Annotated[int | None, Query(description="At most this many rows")] = None,
    quantiles: Annotated[str | None, Query(description="Ranks quantiles metrics answer, "
                                           "e.g. 0.5,0.9,0.99 (the default)")] = None,
) -> ViewAnswer:
    """A view's merged answer. Any other query parameter filters a dimension: `url=/home`."""
    definition = _known_view(serving.project, view)
    query = parse(
        definition, serving.project.schemas[definition.event_type], start=start, end=end,
        bucket=bucket, group_by=group_by, filters=_dimension_filters(request),
        order_by=order_by, limit=limit, quantiles=quantiles,
    )
    reading = serving.views.read([view])
    rows = view_rows(serving.duck, reading, definition, query)
    return ViewAnswer(view=view, rows=rows, freshness=freshness(serving.views, reading.snapshot))


@api.post("/sql", tags=["views"], responses={400: {"model": Errors}})
def sql(body: SqlRequest, serving: ServingDep) -> SqlAnswer:
    """Read-only SQL over tables named after the views: merged rows at each view's bucket
    (`bucket` a UTC timestamp), exact metrics, approx distinct estimates, quantile and
    distinct-set sketches for `kll_quantile`, `kll_merge`, `theta_estimate`, `theta_union`
    and `theta_intersection`; at most 10,000 rows."""
    result = run_sql(serving.duck, serving.views, body.sql)
    fresh = freshness(serving.views, result.snapshot)
    return SqlAnswer(columns=result.columns, rows=result.rows, truncated=result.truncated,
                     freshness=fresh)


@api.get("/metrics", tags=["operations"], response_class=Response)
def metrics(serving: ServingDep) -> Response:
    """Prometheus metrics, in the text exposition format."""
    return Response(serving.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


def freshness(views: BatchViews, snapshot: Snapshot) -> Freshness:
    cut = iso(snapshot.cut) if snapshot.manifest else None
    return Freshness(batch_version=snapshot.version, cut=cut,
                     realtime_lag_ms=views.realtime_lag_ms())


def _known_view(project: Project, name: str) -> View:
    if name not in project.views:
        known = ", ".join(sorted(project.views))
        raise ApiError(404, "view", f"no view named {name!r}; known: {known}")
    return project.views[name]


def _dimension_filters(request: Request) -> dict[str, str]:
    filters: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        if name in filters:
            raise ApiError(400, name, "given more than once; a filter takes one value")
        if name not in _QUERY_PARAMETERS:
            filters[name] = value
    return filters


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    serving: Serving = app.state.serving
    serving.views.start()
    try:
        yield
    finally:
        serving.views.stop()
        serving.duck.close()


def create_app(
    settings: Settings,
    project: Project,
    store: ObjectStore,
    realtime: RealtimeCells,
    *,
    poll_seconds: float = 1.0,
) -> FastAPI:
    """The serving API; it follows the published batch version while it runs."""
    views = BatchViews(project, store, realtime, poll_seconds)
    serving = Serving(settings, project, views, DuckDB(), ServingMetrics(views))
    app = FastAPI(title="lambdalake serving API", version=version("lambdalake"),
                  lifespan=_lifespan)
    app.state.serving = serving
    app.include_router(public)
    app.include_router(api, dependencies=[Security(require_api_key)] if settings.api_keys else [])
    install_error_handlers(app)
    app.add_middleware(RequestMetrics, metrics=serving.metrics)
    return app
