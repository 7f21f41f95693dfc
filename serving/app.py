"""The serving API on FastAPI: queries answered as batch(cut C) ⊕ real-time cells ≥ C."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from importlib.metadata import version
from importlib.resources import files
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, FastAPI, Request, Response, Security
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.security import APIKeyHeader, HTTPBearer
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from swagger_ui_bundle import swagger_ui_path

from lambdalake.auth import KEY_HEADER, AuthError, Keyring, Scope
from lambdalake.events import iso
from lambdalake.limits import ConcurrencyLimiter, Limited, RateLimiter
from lambdalake.loops import Loops
from lambdalake.project import Project
from lambdalake.query import page
from lambdalake.realtime import RealtimeCells
from lambdalake.serving.batch_views import BatchViews, Snapshot
from lambdalake.serving.errors import ApiError, error_response, install_error_handlers
from lambdalake.serving.formats import arrow_stream, csv_text, flat_table
from lambdalake.serving.metrics import RequestMetrics, ServingMetrics
from lambdalake.serving.models import (
    Errors,
    Freshness,
    Health,
    Readiness,
    SqlAnswer,
    SqlRequest,
    ViewInfo,
    ViewList,
)
from lambdalake.serving.query import (
    SQL_MAX_ROWS,
    DuckDB,
    layer_rows,
    run_sql,
    sql_answer_json,
    view_page,
)
from lambdalake.serving.sql_sandbox import SandboxBusy, SandboxLimits, SqlSandbox
from lambdalake.serving.view_routes import MEDIA_TYPES, ViewRequest, view_router
from lambdalake.settings import Settings
from lambdalake.storage import ObjectStore

log = logging.getLogger("lambdalake.serving")
# Declare the two ways to send a key in the OpenAPI document; `require` checks the key.
_KEY_SCHEMES = [Security(APIKeyHeader(name=KEY_HEADER, auto_error=False)),
                Security(HTTPBearer(auto_error=False))]
STATIC = files("lambdalake.serving") / "static"


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
    rate: RateLimiter
    sql_per_key: ConcurrencyLimiter


async def _serving(request: Request) -> Serving:
    # async, as `authorized`: FastAPI runs a plain function in its thread pool, a hop to a
    # worker thread and back for no blocking work (the two cost 0.4 ms of CPU per request)
    return request.app.state.serving


ServingDep = Annotated[Serving, Depends(_serving)]
public = APIRouter(tags=["operations"])
# FastAPI's `responses` type: a dict[int, ...] would not do, dict being invariant
Responses = dict[int | str, dict[str, Any]]
_GUARDED: Responses = {401: {"model": Errors, "description": "No valid API key"},
                       403: {"model": Errors, "description": "Key lacks the scope"},
                       429: {"model": Errors, "description": "Past the key's request rate; "
                             "see Retry-After"}}
api = APIRouter(responses=_GUARDED)
_RESTORING: Responses = {503: {"model": Errors, "description": "Restoring state; see Retry-After"}}


def require(scope: Scope) -> Callable[[Request, Serving], Awaitable[None]]:
    """A dependency refusing requests without a key holding `scope` (401 or 403), or past
    the key's request rate (429). The key's name is kept for per-key limits further on."""

    async def authorized(request: Request, serving: ServingDep) -> None:
        try:
            key = serving.keyring.authorize(request.headers, scope)
        except AuthError as refused:
            raise ApiError(refused.status, refused.header, refused.rule, refused.headers) from None
        request.state.key = key.label if key else f"client {_client(request)}"
        try:
            serving.rate.take(request.state.key)
        except Limited as limited:
            raise ApiError(429, "rate", limited.rule, limited.headers) from None

    return authorized


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


@public.get("/", response_class=HTMLResponse, tags=["dashboard"])
def dashboard() -> HTMLResponse:
    """The live dashboard. The page holds no data: it asks the views API for it, with the key
    it prompts for when the API needs one."""
    return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))


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


def answer_view(request: Request, asked: ViewRequest) -> Response:
    """A view's merged answer (GET /views/<name>): a page of rows, the range covered, the
    cursor to the next page; in JSON, CSV or Arrow; with layers=1 the two layers too."""
    serving: Serving = request.app.state.serving
    require_restored(serving)
    view, query = asked.view, asked.query
    reading = serving.views.read([view.name])
    answered = view_page(serving.duck, reading, view, query)
    if asked.format != "json":
        return _tabular(asked, answered.rows)
    start, end = query.covered(view)
    body = {
        "view": view.name,
        "rows": answered.rows,
        "range": {"from": _maybe_iso(start), "to": _maybe_iso(end)},
        "next_cursor": None if answered.next_offset is None else query.cursor(
            answered.next_offset),
        "truncated": answered.next_offset is not None,
        "freshness": freshness(serving, reading.snapshot).model_dump(),
    }
    if asked.layers:
        body["layers"] = {name: page(query, rows).rows for name, rows in
                          layer_rows(serving.duck, reading, view, query).items()}
    return Response(orjson.dumps(body), media_type="application/json")


def _maybe_iso(ms: int | None) -> str | None:
    return None if ms is None else iso(ms)


def _tabular(asked: ViewRequest, rows: list[dict]) -> Response:
    view, query = asked.view, asked.query
    dims = view.keys if query.group_by is None else query.group_by
    quantiles = {name for name, metric in view.metrics.items() if metric.kind == "quantiles"}
    table = flat_table(rows, ["bucket", *dims, *view.metrics], query.quantiles, quantiles,
                       query.tz)
    body = arrow_stream(table) if asked.format == "arrow" else csv_text(table)
    return Response(body, media_type=MEDIA_TYPES[asked.format])


@api.post(
    "/sql",
    tags=["views"],
    response_model=SqlAnswer,
    dependencies=[Depends(require_restored)],
    responses={400: {"model": Errors}, **_RESTORING,
               429: {"model": Errors, "description": "Too many statements at once"}},
)
async def sql(body: SqlRequest, request: Request, serving: ServingDep) -> Response:
    """Read-only SQL over tables named after the views: merged rows at each view's bucket
    (`bucket` a UTC timestamp), exact metrics, approx distinct estimates, quantile and
    distinct-set sketches for `kll_quantile`, `kll_merge`, `theta_estimate`, `theta_union`
    and `theta_intersection`; at most 10,000 rows and `sql_max_bytes` bytes, within
    `sql_timeout_seconds` and `sql_memory_mb`."""
    key = getattr(request.state, "key", None) or f"client {_client(request)}"
    try:
        with serving.sql_per_key.hold(key):
            result = await serving.sql.run(
                partial(run_sql, serving.duck, serving.views, body.sql))
    except SandboxBusy as busy:
        raise ApiError(429, "sql", str(busy), headers={"Retry-After": "1"}) from None
    except Limited as limited:
        raise ApiError(429, "sql", limited.rule, limited.headers) from None
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
    duck = DuckDB()
    views = BatchViews(project, store, realtime, poll_seconds, loops, prepare=duck.cache)
    keyring = settings.keyring
    if keyring.open:
        log.warning("no API keys configured: the API is open to anyone")
    else:
        log.info("API keys", extra={"keys": keyring.described()})
    metrics = ServingMetrics(views, loops)
    sandbox = SqlSandbox(SandboxLimits.of(settings, SQL_MAX_ROWS), metrics.registry)
    serving = Serving(settings, project, views, duck, metrics, loops, keyring, sandbox,
                      RateLimiter(settings.api_rate_per_key, settings.api_burst_per_key),
                      ConcurrencyLimiter(settings.sql_concurrency_per_key, "SQL statements"))
    app = FastAPI(title="lambdalake serving API", version=version("lambdalake"),
                  lifespan=_lifespan, docs_url=None, redoc_url=None)
    app.state.serving = serving
    app.include_router(public)
    install_docs(app)
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    # every route of `api` (the views, /sql and /metrics) needs the `query` scope
    guard = [*([] if keyring.open else _KEY_SCHEMES), Depends(require("query"))]
    app.include_router(api, dependencies=guard)
    app.include_router(view_router(project, answer_view, {**_GUARDED, **_RESTORING}),
                       dependencies=guard)
    install_error_handlers(app)
    app.add_middleware(RequestMetrics, metrics=serving.metrics)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["GET", "POST"], max_age=600,
                           allow_headers=[KEY_HEADER, "Authorization", "Content-Type"])
    return app


_ASSETS = "/docs/assets"


def install_docs(app: FastAPI) -> None:
    """Swagger UI at /docs from the assets shipped in `swagger-ui-bundle`: nothing from a CDN."""
    app.mount(_ASSETS, StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs() -> Response:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} docs",
            swagger_js_url=f"{_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{_ASSETS}/favicon-32x32.png")
