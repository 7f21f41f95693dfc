"""The serving API on FastAPI: queries answered as batch(cut C) ⊕ real-time cells ≥ C."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from importlib.metadata import version
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response, Security
from fastapi.security import APIKeyHeader, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST

from lambdalake.auth import KEY_HEADER, AuthError, Keyring, Scope
from lambdalake.events import iso
from lambdalake.loops import Loops
from lambdalake.project import Project
from lambdalake.query import parse
from lambdalake.realtime import RealtimeCells
from lambdalake.serving.batch_views import BatchViews, Snapshot
from lambdalake.serving.errors import ApiError, error_response, install_error_handlers
from lambdalake.serving.metrics import RequestMetrics, ServingMetrics
from lambdalake.serving.models import (
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
from lambdalake.serving.query import SQL_MAX_ROWS, DuckDB, run_sql, sql_answer_json, view_rows
from lambdalake.serving.sql_sandbox import SandboxBusy, SandboxLimits, SqlSandbox
from lambdalake.settings import Settings
from lambdalake.storage import ObjectStore
from lambdalake.views import View

log = logging.getLogger("lambdalake.serving")
# Declare the two ways to send a key in the OpenAPI document; `require` checks the key.
_KEY_SCHEMES = [Security(APIKeyHeader(name=KEY_HEADER, auto_error=False)),
                Security(HTTPBearer(auto_error=False))]
_QUERY_PARAMETERS = {"from", "to", "bucket", "group_by", "order_by", "limit", "quantiles"}


@dataclass(frozen=True)
class Serving:
    settings: Settings
    project: Project
    views: BatchViews
    duck: DuckDB
    metrics: ServingMetrics
    loops: Loops
    keyring: Keyring
    sql: SqlSandbox


def _serving(request: Request) -> Serving:
    return request.app.state.serving


ServingDep = Annotated[Serving, Depends(_serving)]
public = APIRouter(tags=["operations"])
api = APIRouter(responses={401: {"model": Errors, "description": "No valid API key"},
                           403: {"model": Errors, "description": "Key lacks the scope"}})
_RESTORING = {503: {"model": Errors, "description": "Restoring state; see Retry-After"}}


def require(scope: Scope) -> Callable[[Request, Serving], None]:
    """A dependency refusing requests without a key holding `scope`: 401 or 403."""

    def authorized(request: Request, serving: ServingDep) -> None:
        try:
            serving.keyring.authorize(request.headers, scope)
        except AuthError as refused:
            raise ApiError(refused.status, refused.header, refused.rule, refused.headers) from None

    return authorized


@public.get("/healthz", response_model=Health,
            responses={503: {"model": Errors, "description": "A loop is dead or stuck"}})
def healthz(serving: ServingDep) -> Health | Response:
    """Liveness: the process answers and every long-running loop of it is alive, none stuck."""
    unhealthy = _loop_problems(serving)
    if unhealthy:
        return error_response(503, unhealthy)
    return Health(status="ok", loops={
        loop.name: f"retrying: {loop.last_error}" if loop.consecutive_errors else "ok"
        for loop in serving.loops})


@public.get("/readyz", response_model=Readiness,
            responses={503: {"model": Errors, "description": "Not ready yet"}})
def readyz(serving: ServingDep) -> Readiness | Response:
    """Readiness: the published batch views loaded, the real-time state restored, and every
    loop alive. A real-time lag past its bound does not count: answers say `stale`."""
    require_restored(serving)
    unhealthy = _loop_problems(serving)
    if unhealthy:
        return error_response(503, unhealthy)
    return Readiness(status="ready", batch_version=serving.views.snapshot.version)


def _loop_problems(serving: Serving) -> list[tuple[str, str]]:
    return [(f"loop {name}", problem) for name, problem in serving.loops.problems().items()]


def require_restored(serving: ServingDep) -> None:
    """Answers only from whole state: a partial one would undercount."""
    problem = restoring_problem(serving)
    if problem:
        header = "batch" if not serving.views.ready else "realtime"
        raise ApiError(503, header, problem, headers={"Retry-After": "1"})


def restoring_problem(serving: Serving) -> str | None:
    """Why the state is not whole yet, or None."""
    if not serving.views.ready:
        return "the published batch views have not been loaded yet"
    if not serving.views.realtime.restored.is_set():
        return ("the real-time state is being restored (speed checkpoint and log replay); "
                "retry shortly")
    return None


@api.get("/views", tags=["views"], dependencies=[Depends(require_restored)],
         responses=_RESTORING)
def list_views(serving: ServingDep) -> ViewList:
    """Every view: its dimensions, metrics and bucket, and how fresh its answers are."""
    fresh = freshness(serving, serving.views.snapshot)
    infos = [ViewInfo(**v.describe(), freshness=fresh) for v in serving.project.views.values()]
    return ViewList(views=infos)


@api.get(
    "/views/{view}",
    tags=["views"],
    dependencies=[Depends(require_restored)],
    responses={400: {"model": Errors}, 404: {"model": Errors, "description": "No such view"},
               **_RESTORING},
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
    return ViewAnswer(view=view, rows=rows, freshness=freshness(serving, reading.snapshot))


@api.post(
    "/sql",
    tags=["views"],
    response_model=SqlAnswer,
    dependencies=[Depends(require_restored)],
    responses={400: {"model": Errors}, **_RESTORING,
               429: {"model": Errors, "description": "Too many statements at once"}},
)
async def sql(body: SqlRequest, serving: ServingDep) -> Response:
    """Read-only SQL over tables named after the views: merged rows at each view's bucket
    (`bucket` a UTC timestamp), exact metrics, approx distinct estimates, quantile and
    distinct-set sketches for `kll_quantile`, `kll_merge`, `theta_estimate`, `theta_union`
    and `theta_intersection`; at most 10,000 rows and `sql_max_bytes` bytes, within
    `sql_timeout_seconds` and `sql_memory_mb`."""
    try:
        result = await serving.sql.run(partial(run_sql, serving.duck, serving.views, body.sql))
    except SandboxBusy as busy:
        raise ApiError(429, "sql", str(busy), headers={"Retry-After": "1"}) from None
    answer = sql_answer_json(result, freshness(serving, result.snapshot))
    return Response(answer, media_type="application/json")


@api.get("/metrics", tags=["operations"], response_class=Response)
def metrics(serving: ServingDep) -> Response:
    """Prometheus metrics, in the text exposition format."""
    return Response(serving.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


def freshness(serving: Serving, snapshot: Snapshot) -> Freshness:
    cut = iso(snapshot.cut) if snapshot.manifest else None
    lag = serving.views.realtime_lag_ms()
    stale = lag is None or lag > serving.settings.realtime_stale_ms
    return Freshness(batch_version=snapshot.version, cut=cut, realtime_lag_ms=lag, stale=stale)


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
        serving.sql.close()
        serving.duck.close()


def create_app(
    settings: Settings,
    project: Project,
    store: ObjectStore,
    realtime: RealtimeCells,
    *,
    poll_seconds: float = 1.0,
    loops: Loops | None = None,
) -> FastAPI:
    """The serving API; it follows the published batch version while it runs. `loops`: the
    process's long-running loops, which /healthz reports (the view refresh joins them)."""
    loops = Loops() if loops is None else loops
    views = BatchViews(project, store, realtime, poll_seconds, loops)
    keyring = settings.keyring
    if keyring.open:
        log.warning("no API keys configured: the API is open to anyone")
    else:
        log.info("API keys", extra={"keys": keyring.described()})
    metrics = ServingMetrics(views, loops)
    sandbox = SqlSandbox(SandboxLimits.of(settings, SQL_MAX_ROWS), metrics.registry)
    serving = Serving(settings, project, views, DuckDB(), metrics, loops, keyring, sandbox)
    app = FastAPI(title="lambdalake serving API", version=version("lambdalake"),
                  lifespan=_lifespan)
    app.state.serving = serving
    app.include_router(public)
    # every route of `api` (the views, /sql and /metrics) needs the `query` scope
    guard = [] if keyring.open else [*_KEY_SCHEMES, Depends(require("query"))]
    app.include_router(api, dependencies=guard)
    install_error_handlers(app)
    app.add_middleware(RequestMetrics, metrics=serving.metrics)
    return app
